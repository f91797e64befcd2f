"""Train from a YAML config or a preset: ``python scripts/train.py --config training_presets/demo_sdxl_lora.yaml``.

A thin wrapper of ``tuneonce-train`` (tuneonce.trainer.cli); it needs the package installed (``pip install -e .``).
"""
import sys

try:
    from tuneonce.trainer.cli import main
except ModuleNotFoundError as error:  # the checkout is no longer put on sys.path: the package is `tuneonce`
    if error.name != "tuneonce":
        raise
    sys.exit("error: tuneonce is not installed in this Python: pip install -c requirements/lock.txt -e . (README)")

if __name__ == "__main__":
    sys.exit(main())
