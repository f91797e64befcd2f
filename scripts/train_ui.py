"""Browser GUI: ``python scripts/train_ui.py [--host H] [--port P]`` (serves on 127.0.0.1 by default)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from tuneonce.ui.server import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
