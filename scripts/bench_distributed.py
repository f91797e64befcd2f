"""Time one optimizer step when N processes split the orthogonalization (modules/optimizer/distributed.py).

    python scripts/bench_distributed.py --model sdxl --rank 16 --processes 1 2
    python scripts/bench_distributed.py --model sdxl --full --processes 1 2 4 --optimizer adamuon_adv

For each N, N local processes (gloo on CPU, NCCL with --device cuda and one GPU per process) hold the same
parameters and gradients (the real LoRA / full-slice shapes of scripts/bench_optimizer.py) and step the optimizer;
a step's time is the slowest rank's (ranks start each step together), median over --steps. CPU threads are split
evenly between the processes (--threads is the total), so N = 1 and N = 2 use the same cores.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def _worker(rank: int, world_size: int, args: argparse.Namespace, port: int, results) -> None:
    import torch
    import torch.distributed as dist

    from lab.optimizer_bench import _optimizers, build_workload

    torch.set_num_threads(max(1, args.threads // world_size))
    device = f"cuda:{rank}" if args.device == "cuda" else "cpu"
    if args.device == "cuda":
        torch.cuda.set_device(rank)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=rank, world_size=world_size)
    try:
        work = build_workload(args.model, rank=None if args.full else args.rank, full=args.full, device=device)
        opt = _optimizers(work)[args.optimizer]()
        times = []
        for i in range(args.warmup + args.steps):
            dist.barrier()
            start = time.perf_counter()
            opt.step()
            if args.device == "cuda":
                torch.cuda.synchronize()
            dist.barrier()  # the step is done when the slowest rank is
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        counts = [None] * world_size
        dist.all_gather_object(counts, opt.orthogonalized_last_step)
        if rank == 0:
            results.put({"processes": world_size, "median_ms": statistics.median(times) * 1e3, "per_rank": counts})
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sdxl", help="built-in architecture name (default sdxl)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--full", action="store_true", help="full finetuning of a representative slice instead of LoRA")
    parser.add_argument("--optimizer", default="muon_adv", choices=["muon_adv", "muon_adv_product", "adamuon_adv", "lora_muon"])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts to time (default 1 2)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads in all (split between processes)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    import torch.multiprocessing as mp

    rows = []
    for n in args.processes:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        results = mp.get_context("spawn").SimpleQueue()
        mp.spawn(_worker, args=(n, args, port, results), nprocs=n, join=True)
        rows.append(results.get())
    base = rows[0]["median_ms"]
    if args.json:
        print(json.dumps({"model": args.model, "rank": None if args.full else args.rank, "optimizer": args.optimizer, "results": rows}))
        return 0
    what = f"{args.model} {'full slice' if args.full else f'LoRA r{args.rank}'}, {args.optimizer}, {args.device}, {args.threads} threads"
    print(what)
    print("| processes | step (median) | vs first | matrices per rank |\n| --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['processes']} | {row['median_ms']:.0f} ms | {row['median_ms'] / base:.2f}x | {row['per_rank']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
