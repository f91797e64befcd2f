"""``python -m tuneonce.train --config PRESET_OR_FILE``: the training CLI (same as ``tuneonce-train``)."""
import sys

from tuneonce.trainer.cli import main

if __name__ == "__main__":
    sys.exit(main())
