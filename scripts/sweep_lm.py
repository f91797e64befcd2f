#!/usr/bin/env python
"""LR transfer on a second, non-diffusion task: LoRA finetunes of a tiny pretrained LM (lab code; see lab.lm_task):

    python scripts/sweep_lm.py --out runs/lm_sweep [--axes width] [--optimizers adamw muon_tuned] [--seeds 0]
    python scripts/sweep_lm.py --quick --out /tmp/lm_quick
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # lab/ is importable from the checkout only
from lab.lm_task import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
