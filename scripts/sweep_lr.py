#!/usr/bin/env python
"""LR sweep (same as ``tuneonce-sweep``; see tuneonce.sweep.cli):

    python scripts/sweep_lr.py --config sweeps/default.yaml --out runs/sweep_default
    python scripts/sweep_lr.py --quick --out /tmp/sweep_quick
"""
from tuneonce.sweep.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
