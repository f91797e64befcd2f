"""Steps/s of tuneonce's training loop vs a minimal hand-written diffusers loop (same model, batch, optimizer).

    python scripts/bench_train.py --json                       # the embedded demo (prepared on first use)
    python scripts/bench_train.py --config X.yaml --set training.batch_size=2 --steps 20 --rounds 5
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

DEMO_PRESET = "training_presets/demo_sdxl_lora.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEMO_PRESET, help=f"training preset (default: {DEMO_PRESET})")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. training.batch_size=2 (repeatable)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round and loop")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (ours, reference)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps of each loop first")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    from tuneonce.config.loading import load_config
    from lab.train_bench import run_benchmark

    config = load_config(args.config, args.overrides)
    result = run_benchmark(config, steps=args.steps, rounds=args.rounds, warmup=args.warmup)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['model']} {result['method']} rank {result['lora_rank']}, batch {result['batch_size']} at "
              f"{result['resolution']}px, {result['optimizer']}, {result['torch_threads']} threads")
        print(f"ours {result['ours_steps_per_s']:.2f} steps/s, reference {result['reference_steps_per_s']:.2f} steps/s, "
              f"ratio {result['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
