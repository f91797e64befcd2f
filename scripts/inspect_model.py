"""Show what tuneonce's optimizer will see of a model (same as ``tuneonce-inspect``; see tuneonce.trainer.inspect_cli).

    python scripts/inspect_model.py sdxl --lora-rank 16
    python scripts/inspect_model.py flux-dev --memory --budget-gb 12
"""
import sys

from tuneonce.trainer.inspect_cli import main, memory_main  # noqa: F401  (tests call main)

if __name__ == "__main__":
    sys.exit(main())
