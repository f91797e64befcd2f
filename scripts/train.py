"""Train from a YAML config: ``python scripts/train.py --config training_presets/demo_sdxl_lora.yaml``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from tuneonce.trainer.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
