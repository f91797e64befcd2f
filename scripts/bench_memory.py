"""Measured vs predicted memory of one LoRA step per weight storage mode, on reduced-depth real architectures.

    python scripts/bench_memory.py --model flux-dev --json
    python scripts/bench_memory.py --model qwen-image --device cuda --blocks 4 --heads 24 --resolution 1024

Modes: bf16, float8, int8, nf4 (memory.quantize.denoiser) and nf4+offload (all blocks but the last streamed from CPU
memory, with gradient checkpointing; a UNet's blocks are its down, mid and up blocks). The model is the real
diffusers class built from the bundled published config
with `--blocks` blocks per block list and `--heads` heads (modules/trainer/memory_measure.py), LoRA rank 4 on the
default targets, AdamW. On CPU the peak is counted exactly (tensor bytes + saved activations, see
modules/model/activations.py) and the model computes in float32 (weights stored per mode); with --device cuda it is
torch.cuda.max_memory_allocated() in bfloat16. `predicted_peak_bytes` is the planner's (modules/trainer/memory_plan.py).
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402

from tuneonce.model.offload import block_names  # noqa: E402
from tuneonce.trainer.memory_measure import REDUCIBLE, measure_step, reduced_model, step_inputs  # noqa: E402
from tuneonce.trainer.memory_plan import PlanSettings, plan_memory  # noqa: E402

MODES = {"bf16": "bfloat16", "float8": "float8", "int8": "int8", "nf4": "nf4", "nf4+offload": "nf4"}


def measure_cuda(model, inputs, *, mode: str, rank: int, checkpointing: bool, offload_blocks: int, steps: int) -> dict:
    """One mode on the GPU: peak allocated bytes over `steps` training steps and their median time (not run in the
    CPU-only sessions this was written in: the CUDA path is designed, its figures are not measured yet)."""
    from tuneonce.model.offload import BlockOffloader, block_names
    from tuneonce.model.quantize import quantize_linears
    from tuneonce.trainer.memory_measure import add_default_lora

    device = torch.device("cuda")
    model.to(torch.bfloat16)
    quantize_linears(model, mode)
    add_default_lora(model, rank)
    if checkpointing:
        model.enable_gradient_checkpointing()
    torch.cuda.reset_peak_memory_stats(device)
    if offload_blocks:
        order = block_names(model)
        BlockOffloader(model, order[:offload_blocks], storage="cpu", compute=device, order=order).place()
    else:
        model.to(device)
    weight_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]
                       if t.device.type == "cuda" and not t.requires_grad)  # frozen weights on the GPU
    inputs = {k: v.to(device, torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point()
              else v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}  # fmt: skip
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    times = []
    for _ in range(steps):
        torch.cuda.synchronize(device)
        started = time.perf_counter()
        opt.zero_grad()
        model(**inputs)[0].float().pow(2).mean().backward()
        opt.step()
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    later = sorted(times[1:] or times)
    return {"peak_bytes": torch.cuda.max_memory_allocated(device), "weight_bytes": weight_bytes,
            "step_s": later[len(later) // 2]}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="flux-dev", help=f"architecture: {', '.join(REDUCIBLE)}")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--blocks", type=int, default=2, help="blocks per block list (default 2)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--resolution", type=int, default=256, help="image side in px (default 256)")
    parser.add_argument("--text-tokens", type=int, default=64, help="text tokens (default 64)")
    parser.add_argument("--steps", type=int, default=3, help="steps per mode; step_s is the median after the first")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.model not in REDUCIBLE:
        print(f"error: --model: expected one of {', '.join(REDUCIBLE)}, got {args.model!r}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device here", file=sys.stderr)
        return 2
    backbone = "unet" if args.model == "sdxl" else "transformer"
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    results = {}
    for name, mode in MODES.items():
        offload = name.endswith("+offload")
        model = reduced_model(args.model, blocks=args.blocks, heads=args.heads)
        n_offload = len(block_names(model)) - 1 if offload else 0
        settings = PlanSettings(resolution=args.resolution, batch=1, train_dtype=dtype, activation_dtype=dtype,
                                quantize={backbone: mode}, lora_rank=4, optimizer="adamw", text_tokens=args.text_tokens,
                                checkpointing=offload, offload_blocks=n_offload)  # fmt: skip
        predicted = plan_memory({backbone: model}, settings)
        inputs = step_inputs(model, args.resolution, 1, args.text_tokens)
        if args.device == "cuda":
            row = measure_cuda(model, inputs, mode=mode, rank=4, checkpointing=offload, offload_blocks=n_offload,
                               steps=args.steps)  # fmt: skip
        else:
            m = measure_step(model, inputs, mode=mode, rank=4, checkpointing=offload, offload_blocks=n_offload,
                             steps=args.steps)  # fmt: skip
            row = {"peak_bytes": m.peak, "weight_bytes": m.weight_bytes, "activation_bytes": m.activations,
                   "step_s": round(m.seconds, 4)}  # fmt: skip
        row.update(predicted_peak_bytes=int(predicted.peak), predicted_activation_bytes=int(predicted.activations),
                   offload_blocks=n_offload, checkpointing=offload)  # fmt: skip
        results[name] = row
    report = {"model": args.model, "device": args.device, "blocks": args.blocks, "heads": args.heads,
              "resolution": args.resolution, "text_tokens": args.text_tokens, "results": results}  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.model} ({args.blocks} blocks per list, {args.heads} heads) at {args.resolution}px on {args.device}")
    print(f"{'mode':<13}{'peak MiB':>10}{'predicted':>11}{'weights MiB':>13}{'step s':>9}")
    for name, row in results.items():
        print(f"{name:<13}{row['peak_bytes'] / 2**20:>10.1f}{row['predicted_peak_bytes'] / 2**20:>11.1f}"
              f"{row['weight_bytes'] / 2**20:>13.1f}{row['step_s']:>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
