#!/usr/bin/env python
"""LR sweep (lab code, run from a checkout; see lab.sweep.cli):

    python scripts/sweep_lr.py --config sweeps/default.yaml --out runs/sweep_default
    python scripts/sweep_lr.py --quick --out /tmp/sweep_quick
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # lab/ is importable from the checkout only
from lab.sweep.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
