"""Block offloading (modules/model/offload.py) on CPU: the hooks swap each offloaded block's frozen tensors between
their storage copy and a compute copy just in time, forward and backward (recomputation), and training through
train() is bit-identical to the same run without offloading."""
from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from tuneonce.model.offload import BlockOffloader, block_names
from tuneonce.model.tiny_flow import tiny_flow_pipeline_dir
from tuneonce.trainer.memory_measure import add_default_lora, reduced_model, step_inputs
from tuneonce.trainer.train import train
from tests.builders import FLOW_RUN, tiny_train_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def lora_step(model, inputs):
    out = model(**inputs)[0]
    out.float().pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["flux-dev", "qwen-image", "sdxl"])
def test_hooks_stream_blocks_just_in_time_and_change_nothing(arch):
    base = reduced_model(arch, blocks=2, heads=1)
    add_default_lora(base, rank=4)
    base.enable_gradient_checkpointing()
    inputs = step_inputs(base, 64, 1, 8)
    offloaded_model = copy.deepcopy(base)
    reference = lora_step(base, inputs)

    prefixes = ("down_blocks.", "mid_block.", "up_blocks.") if arch == "sdxl" else None  # the family's block lists
    order = block_names(offloaded_model, prefixes)
    chosen = order[:-1]  # all blocks but the last
    offloader = BlockOffloader(offloaded_model, chosen, storage="cpu", compute="cpu", order=order)
    masters = {name: {t.data_ptr() for t in offloader.masters[order.index(name)]} for name in chosen}
    calls: list[str] = []

    def check(block, path):
        def hook(module, args):  # registered after the offloader's: runs once the block has arrived
            frozen = [p for p in module.parameters(recurse=False) if not p.requires_grad]
            assert not any(p.data_ptr() in masters.get(block, set()) for p in frozen), f"{path} ran on storage"
            assert len(offloader.resident) + len(offloader.arriving) <= 2
            if path == block:
                calls.append(block)
        return hook

    for block in order:  # every module, since checkpointing recomputes parts of a block (UNet resnets)
        for path, sub in offloaded_model.get_submodule(block).named_modules(prefix=block):
            sub.register_forward_pre_hook(check(block, path))
    got = lora_step(offloaded_model, inputs)

    assert torch.equal(got[0], reference[0])
    assert got[1].keys() == reference[1].keys() and all(torch.equal(got[1][k], reference[1][k]) for k in got[1])
    if arch != "sdxl":  # DiTs checkpoint whole blocks: forward in order, then recomputed in reverse
        assert calls == order + order[::-1]
    assert offloader.copies >= 2 * len(chosen) - 1 and offloader.peak_resident <= 2
    # between uses the offloaded blocks point back at their storage copies (only the last used may stay)
    at_rest = [n for n in chosen if not offloader.is_resident(n)]
    assert len(at_rest) >= len(chosen) - 2
    for name in at_rest:
        block = offloaded_model.get_submodule(name)
        assert {p.data_ptr() for p in block.parameters() if not p.requires_grad} <= masters[name]


def test_unknown_block_and_too_many_blocks_are_named():
    model = reduced_model("flux-dev", blocks=1, heads=1)
    with pytest.raises(ValueError, match="memory.offload_blocks: nope is not a residual block"):
        BlockOffloader(model, ["nope"], compute="cpu")
    from tuneonce.model.offload import offload_backbone

    with pytest.raises(ValueError, match="memory.offload_blocks: 9 is more than the 2 residual blocks"):
        offload_backbone(model, ("transformer_blocks.", "single_transformer_blocks."), 9, compute="cpu")


def test_offloaded_training_is_bit_identical(tmp_path_factory, data_dirs):
    base = tiny_flow_pipeline_dir("flux-dev", tmp_path_factory)
    results = {}
    for offload in (0, 5):  # tiny Flux: 2 double + 4 single blocks
        out = tmp_path_factory.mktemp(f"offload{offload}")
        cfg = tiny_train_config("flux", base, data_dirs, out, defaults=FLOW_RUN, schedule={"max_steps": 3},
                                training={"gradient_checkpointing": True}, validation={"every_n_steps": 3},
                                memory={"offload_blocks": offload, "quantize": {"denoiser": "int8"}})  # fmt: skip
        results[offload] = train(cfg, show_progress=False)
    plain, streamed = results[0], results[5]
    assert streamed.val_losses == plain.val_losses and streamed.final_loss == plain.final_loss
    a, b = load_file(str(plain.saved[0])), load_file(str(streamed.saved[0]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k or "lora_up" in k)


def test_offload_needs_checkpointing_and_lora(tmp_path, data_dirs):
    base = tmp_path / "base"
    with pytest.raises(ValidationError, match="memory.offload_blocks: .*training.gradient_checkpointing: true"):
        tiny_train_config("flux", base, data_dirs, tmp_path, defaults=FLOW_RUN, memory={"offload_blocks": 2})
    with pytest.raises(ValidationError, match="memory.offload_blocks: offloading streams frozen weights only"):
        tiny_train_config("flux", base, data_dirs, tmp_path, defaults=FLOW_RUN, method="finetune",
                          training={"gradient_checkpointing": True}, memory={"offload_blocks": 2})
