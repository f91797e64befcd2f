"""A second, non-diffusion task for the LR-transfer study (docs/lr_transfer.md, issue 17): LoRA finetunes of a tiny
causal LM, measured with the diffusion sweep's metric (the cost of one LR, lab.sweep.report).

Language: "op x1..x8 = y1..y8" over Z_17 with y_i = x_i + k (mod 17). A transformers LlamaForCausalLM (head dim 16,
width = the axis, no download) is pretrained with AdamW on the shifts k in {0, 1, 2, 3}; the finetune teaches a rule
it has not seen, k = -1 (a new op token), with LoRA on every attention and MLP projection (alpha = rank). A share of
every answer (pretraining and finetune) is replaced by a random number, so the best reachable loss is a known floor
above 0 (the ratio of two losses stays meaningful when a cell learns the rule) and the pretrained model is not
arbitrarily confident (a noise-free pretraining put the best finetune LRs above the v2 grids: >= 6.4e-2 for
muon_tuned). Llama, not GPT-2: GPT-2's Conv1D stores its weight as (in, out), and
tuneonce.optimizer.groups.peft_param_infos reads the base layer's fans from weight.shape, swapped.

Optimizers come from tuneonce's own construction (peft_param_infos + build_optimizer with a pydantic
OptimizerConfig) at the residual depth tuneonce.model.depth counts (one per decoder layer); the schedule is
tuneonce's warm-up + cosine and the gradient is clipped at 1, as in the diffusion sweep's preset.

    python scripts/sweep_lm.py --out runs/lm_sweep [--axes width] [--optimizers adamw muon_tuned] [--seeds 0]
    python scripts/sweep_lm.py --out runs/lm_sweep --variant 'a_adam={"like": "muon_tuned", "lora_a_optimizer": "adam"}'
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import ValidationError

from lab.sweep.report import markdown_report
from lab.sweep.runner import RESULTS_NAME, read_results
from lab.sweep.spec import AxisSpec, ModelSpec, OptimizerVariant, RunPlan, SweepError, SweepSpec, restrict

MOD, LIST_LEN, VOCAB = 17, 8, 32
EQ, OP0 = MOD, MOD + 1  # tokens: 0..16 numbers, 17 '=', 18.. one op token per shift
PRETRAIN_SHIFTS, FINETUNE_SHIFT = (0, 1, 2, 3), -1
SEQ = 2 + 2 * LIST_LEN  # op, x1..x8, '=', y1..y8
LABEL_NOISE = 0.1  # share of answer tokens drawn uniformly (pretraining, finetune train and validation)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The variants of sweeps/v2.yaml, as OptimizerConfig fields (lr_center: the grid's centre; grid_key: what it varies).
# The grid centres are 4x v2's (1e-3, 4e-3): on v2's grids every width's best LR was the grid's top (seed 0, losses
# falling monotonically up to 8e-3 / 3.2e-2), so the cost of one LR could not be measured.
VARIANTS: dict[str, dict] = {
    "adamw": {"lr_center": 4e-3, "type": "adamw", "weight_decay": 0.01},
    "muon_tuned": {"lr_center": 1.6e-2, "type": "muon_adv", "spectral_scaling": True, "depth_scaled_eps": True,
                   "width_scaled_weight_decay": True, "lora_b_orthogonalize": True, "lora_a_optimizer": "muon"},
    "prodigy": {"lr_center": 1.0, "points": 3, "grid_key": "prodigy_d_coef", "fixed_lr": 1.0, "type": "prodigy",
                "lr": 1.0, "weight_decay": 0.01, "adam_betas": [0.9, 0.99], "prodigy_use_bias_correction": True,
                "prodigy_safeguard_warmup": True},
}  # fmt: skip
_META = ("like", "lr_center", "points", "grid_key", "fixed_lr")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Sizes and schedules of a sweep (FULL or QUICK); everything of the pretraining is in the cache key."""

    layers: int = 4
    widths: tuple[int, ...] = (32, 64, 128)
    ranks: tuple[int, ...] = (2, 8, 32)
    pretrain_steps: int = 1000
    pretrain_lr: float = 3e-3
    pretrain_batch: int = 64
    steps: int = 200
    warmup: int = 20
    batch: int = 32
    train_size: int = 1024
    val_size: int = 512
    eval_every: int = 50
    lr_points: int = 6
    seeds: tuple[int, ...] = (0, 1, 2)


FULL = Recipe()
QUICK = Recipe(layers=2, widths=(32, 64), ranks=(2, 8), pretrain_steps=30, steps=20, warmup=4, train_size=128,
               val_size=64, eval_every=10, lr_points=2, seeds=(0,))  # fmt: skip


def make_batch(shift: int, n: int, gen: torch.Generator, noise: float = 0.0) -> torch.Tensor:
    """n sequences "op x = (x + shift) mod 17"; `noise` of the answer tokens are replaced by uniform numbers."""
    x = torch.randint(0, MOD, (n, LIST_LEN), generator=gen)
    y = (x + shift) % MOD
    if noise > 0:
        y = torch.where(torch.rand(y.shape, generator=gen) < noise, torch.randint(0, MOD, y.shape, generator=gen), y)
    shifts = (*PRETRAIN_SHIFTS, FINETUNE_SHIFT)  # each shift has its own op token
    op = torch.full((n, 1), OP0 + shifts.index(shift))
    return torch.cat([op, x, torch.full((n, 1), EQ), y], dim=1)


def noise_floor(noise: float = LABEL_NOISE) -> float:
    """The lowest expected answer loss under label noise (the entropy of the noisy answer), in nats."""
    right = 1 - noise + noise / MOD
    return -(right * math.log(right) + (MOD - 1) * (noise / MOD) * math.log(noise / MOD))


def ideal_loss(seqs: torch.Tensor, shift: int, noise: float = LABEL_NOISE) -> float:
    """The answer loss of the Bayes predictor (the rule's number, noise/17 on every other) on these sequences: the
    floor a model can reach on a finite validation set, whose share of random answers is not exactly `noise`."""
    x, y = seqs[:, 1 : 1 + LIST_LEN], seqs[:, 2 + LIST_LEN :]
    right = (y == (x + shift) % MOD).double()
    return -(right * math.log(1 - noise + noise / MOD) + (1 - right) * math.log(noise / MOD)).mean().item()


def finetune_data(recipe: Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed finetune training and held-out validation sequences of the new rule (the same for every run)."""
    gen = torch.Generator().manual_seed(1)
    return tuple(make_batch(FINETUNE_SHIFT, n, gen, LABEL_NOISE) for n in (recipe.train_size, recipe.val_size))


def answer_loss(model: torch.nn.Module, seqs: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy on the answer tokens y1..y8 (predicted from position '=' onwards)."""
    logits = model(input_ids=seqs).logits[:, LIST_LEN + 1 : SEQ - 1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), seqs[:, LIST_LEN + 2 :].reshape(-1))


def build_model(width: int, layers: int) -> torch.nn.Module:
    """A tiny transformers Llama (head dim 16, MLP 4x width) at torch's current random state."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                         num_attention_heads=width // 16, num_key_value_heads=width // 16, max_position_embeddings=32,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)  # fmt: skip
    return LlamaForCausalLM(config).float()


def pretrained(width: int, recipe: Recipe, cache: Path, log: Callable[[str], None] = print) -> dict:
    """The pretrained weights of width `width` (a state dict): from <cache>/<key>.safetensors when present, else
    trained (seed 0, AdamW, warm-up + cosine) and written there atomically with a .json of its losses."""
    from safetensors.torch import load_file, save_file

    from tuneonce.trainer.schedule import build_lr_scheduler

    fields = ("layers", "pretrain_steps", "pretrain_lr", "pretrain_batch")
    key = {"task": [MOD, LIST_LEN, VOCAB, PRETRAIN_SHIFTS, LABEL_NOISE], "width": width,
           **{f: getattr(recipe, f) for f in fields}}
    path = cache / f"w{width}_{hashlib.sha1(json.dumps(key).encode()).hexdigest()[:10]}.safetensors"
    if path.is_file():
        log(f"pretrained w{width}: loaded {path}")
        return load_file(path)
    torch.manual_seed(0)
    model = build_model(width, recipe.layers)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.pretrain_lr, weight_decay=0.01)
    sched = build_lr_scheduler(opt, kind="cosine", warmup_steps=recipe.pretrain_steps // 20,
                               total_steps=recipe.pretrain_steps)  # fmt: skip
    gen, started = torch.Generator().manual_seed(0), time.perf_counter()
    for _ in range(recipe.pretrain_steps):
        shift = PRETRAIN_SHIFTS[int(torch.randint(len(PRETRAIN_SHIFTS), (1,), generator=gen))]
        loss = answer_loss(model, make_batch(shift, recipe.pretrain_batch, gen, LABEL_NOISE))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad()
    val_gen = torch.Generator().manual_seed(12345)
    with torch.no_grad():
        losses = {k: answer_loss(model, make_batch(k, 256, val_gen, LABEL_NOISE)).item() for k in PRETRAIN_SHIFTS}
    meta = {**key, "seconds": round(time.perf_counter() - started, 1), "val_loss": losses}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(meta) + "\n", encoding="utf-8")
    log(f"pretrained w{width}: {meta['seconds']} s, answer loss per shift {meta['val_loss']} -> {path}")
    return model.state_dict()


def optimizer_config(variant: dict, value: float):
    """The validated OptimizerConfig of a variant with its grid key set to `value` (a bad field: ValidationError)."""
    from tuneonce.config.schema import OptimizerConfig

    fields = {k: v for k, v in variant.items() if k not in _META}
    return OptimizerConfig(**{**fields, variant.get("grid_key", "lr"): value})


def finetune(state: dict, width: int, recipe: Recipe, variant: dict, plan: RunPlan, data: tuple) -> dict:
    """One LoRA finetune on the new rule; its record in lab.sweep.runner's format (None where not finite)."""
    from peft import LoraConfig, inject_adapter_in_model

    from tuneonce.model.depth import component_depth
    from tuneonce.optimizer.factory import build_optimizer
    from tuneonce.optimizer.groups import peft_param_infos
    from tuneonce.trainer.schedule import build_lr_scheduler

    started = time.perf_counter()
    model = build_model(width, recipe.layers)
    model.load_state_dict(state)
    model.requires_grad_(False)
    torch.manual_seed(plan.seed)  # the LoRA init
    config = LoraConfig(r=plan.rank, lora_alpha=plan.rank, target_modules=LORA_TARGETS, init_lora_weights=True)
    inject_adapter_in_model(config, model)
    infos = peft_param_infos(model, component_depth(model).depth)
    optimizer = build_optimizer(optimizer_config(variant, plan.lr), infos)
    sched = build_lr_scheduler(optimizer, kind="cosine", warmup_steps=recipe.warmup, total_steps=plan.steps)
    params = [i.param for i in infos]
    train, val = data
    order = torch.Generator().manual_seed(plan.seed)  # the batch order

    def evaluate() -> float | None:
        with torch.no_grad():
            loss = answer_loss(model, val).item()
        return loss if math.isfinite(loss) else None

    curve, batches, train_loss = [[0, evaluate()]], torch.empty(0, dtype=torch.long), None
    for step in range(1, plan.steps + 1):
        if len(batches) < recipe.batch:
            batches = torch.randperm(len(train), generator=order)
        index, batches = batches[: recipe.batch], batches[recipe.batch :]
        loss = answer_loss(model, train[index])
        train_loss = loss.item() if math.isfinite(loss.item()) else None
        if train_loss is None:
            curve.append([step, None])  # diverged: the run stops here
            break
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step(), sched.step(), optimizer.zero_grad()
        if step % recipe.eval_every == 0 or step == plan.steps:
            curve.append([step, evaluate()])
    final = curve[-1][1]
    return {"id": plan.run_id, "optimizer": plan.optimizer, "model": plan.model, "rank": plan.rank, "lr": plan.lr,
            "seed": plan.seed, "steps": plan.steps, "val_loss": final, "val_loss_start": curve[0][1],
            "val_curve": curve, "train_loss": train_loss, "diverged": final is None,
            "seconds": round(time.perf_counter() - started, 2)}  # fmt: skip


def sweep_spec(recipe: Recipe, variants: dict[str, dict]) -> SweepSpec:
    """The sweep as a lab.sweep SweepSpec (so its grids, run ids and report apply): a width axis at rank 8 and a
    rank axis at the middle width; base point = the middle width at rank 8 (the reference of both axes)."""
    names = [f"w{w}" for w in recipe.widths]
    base = names[len(names) // 2]
    models = {n: ModelSpec(name=n, family="llama", source="lm_task") for n in names}
    optimizers = {name: OptimizerVariant(name, float(v["lr_center"]), {k: x for k, x in v.items() if k not in _META},
                                         v.get("fixed_lr"), v.get("grid_key", "lr"),
                                         min(int(v.get("points", 0)) or recipe.lr_points, recipe.lr_points))
                  for name, v in variants.items()}  # fmt: skip (the quick toy caps every grid at its 2 points)
    axes = (AxisSpec("width", "model", tuple(names), tuple(variants)),
            AxisSpec("rank", "rank", recipe.ranks, tuple(variants)))  # fmt: skip
    return SweepSpec(name="lm_shift", base_config=Path(__file__), overrides={}, steps=recipe.steps, seeds=recipe.seeds,
                     lr_points=recipe.lr_points, base_model=base, base_rank=8, models=models, optimizers=optimizers,
                     axes=axes, train_images=recipe.train_size, val_images=recipe.val_size)  # fmt: skip


def parse_variant(text: str, variants: dict[str, dict]) -> tuple[str, dict]:
    """NAME=JSON: OptimizerConfig fields (and lr_center, points, grid_key, fixed_lr), optionally "like": a variant
    whose settings it starts from. A bad JSON, base or field is a SweepError naming it."""
    name, _, body = text.partition("=")
    try:
        fields = json.loads(body)
    except ValueError as e:
        raise SweepError(f"--variant {name}: not a JSON object ({e})") from None
    if not name or not isinstance(fields, dict):
        raise SweepError(f"--variant {text!r}: expected NAME={{...}} with a JSON object")
    like = fields.pop("like", None)
    if like is not None and like not in variants:
        raise SweepError(f"--variant {name}: like {like!r} is not a variant ({', '.join(variants)})")
    variant = {**variants.get(like, {}), **fields}
    center = variant.get("lr_center")
    if isinstance(center, bool) or not isinstance(center, (int, float)) or not (0 < center < math.inf):
        raise SweepError(f"--variant {name}: lr_center must be a positive number (or use like), got {center!r}")
    try:
        optimizer_config(variant, float(center))
    except ValidationError as e:
        first = e.errors()[0]
        raise SweepError(f"--variant {name}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    return name, variant


def run(spec: SweepSpec, recipe: Recipe, variants: dict[str, dict], out: Path, limit: int | None = None,
        log: Callable[[str], None] = print) -> list[dict]:
    """Run every plan of `spec` not yet in <out>/results.jsonl (at most `limit`); returns the file's records."""
    results = out / RESULTS_NAME
    out.mkdir(parents=True, exist_ok=True)
    done = {r["id"] for r in read_results(results) if "error" not in r}
    todo = [p for p in spec.runs() if p.run_id not in done][:limit]
    log(f"lm sweep: {len(spec.runs())} runs, {len(todo)} to run")
    data = finetune_data(recipe)
    states: dict[str, dict] = {}
    for i, plan in enumerate(todo, 1):
        width = int(plan.model[1:])
        if plan.model not in states:
            states[plan.model] = pretrained(width, recipe, out / "models", log)
        try:
            record = finetune(states[plan.model], width, recipe, variants[plan.optimizer], plan, data)
        except Exception as e:  # recorded and retried on the next invocation; the sweep goes on
            record = {"id": plan.run_id, "error": f"{type(e).__name__}: {e}"}
        with results.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        log(f"[{i}/{len(todo)}] {plan.run_id}: {record.get('error') or record['val_loss']} ({record.get('seconds')} s)")
    return read_results(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sweep_lm.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (results.jsonl, table.md, models/)")
    parser.add_argument("--seeds", type=int, nargs="+", help="run only these seeds")
    parser.add_argument("--optimizers", nargs="+", help="run only these variants")
    parser.add_argument("--axes", nargs="+", help="run only these axes (width, rank)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                        help='add a variant, e.g. \'muon_adam_a={"like": "muon_tuned", "lora_a_optimizer": "adam"}\'')
    parser.add_argument("--limit", type=int, help="run at most this many of the remaining runs, then report")
    parser.add_argument("--report-only", action="store_true", help="only rewrite table.md from results.jsonl")
    parser.add_argument("--quick", action="store_true", help="toy size (2 layers, 20 steps, 2 LRs, 1 seed), for tests")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    recipe = QUICK if args.quick else FULL
    try:
        variants = dict(VARIANTS)
        for text in args.variant:
            name, variant = parse_variant(text, variants)
            variants[name] = variant
        full = sweep_spec(recipe, variants)
        spec = restrict(full, seeds=args.seeds, optimizers=args.optimizers, axes=args.axes)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.report_only:
        records = read_results(args.out / RESULTS_NAME)
    else:
        torch.set_num_threads(args.threads)
        records = run(spec, recipe, variants, args.out, args.limit)
    table = markdown_report(full, records) + (
        f"\nTask: LoRA finetune of a pretrained tiny Llama ({recipe.layers} layers) to the unseen rule y = x - 1 mod "
        f"{MOD}; loss = answer-token cross-entropy on {recipe.val_size} held-out sequences, "
        f"{LABEL_NOISE:.0%} of answers random (loss floor {noise_floor():.4f} nats expected, "
        f"{ideal_loss(finetune_data(recipe)[1], FINETUNE_SHIFT):.4f} on this validation set). "
        "Prodigy's grid is its d_coef (kept: 1).\n")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "table.md.tmp"
    tmp.write_text(table, encoding="utf-8")
    os.replace(tmp, args.out / "table.md")
    print(table)
    return 0
