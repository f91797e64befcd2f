"""Which hidden state each pipeline reads from its text encoders.

Values are the ``hidden_states`` index the diffusers pipeline uses (index k >= 0: the output of layer k;
-2: the penultimate layer). Components not listed use every layer (last hidden state or pooled output).
SDXL reads CLIP-L at -2 but also takes CLIP-G's pooled output, so CLIP-G uses all of its layers.
"""
from __future__ import annotations

TEXT_READOUT: dict[str, dict[str, int]] = {
    "StableDiffusionXLPipeline": {"text_encoder": -2},
    "StableDiffusionXLImg2ImgPipeline": {"text_encoder": -2},
    "StableDiffusionXLInpaintPipeline": {"text_encoder": -2},
    "ZImagePipeline": {"text_encoder": -2},
    "Lumina2Pipeline": {"text_encoder": -2},
    "Flux2Pipeline": {"text_encoder": 30},  # stacks layers (10, 20, 30)
    "Flux2KleinPipeline": {"text_encoder": 27},  # stacks layers (9, 18, 27)
}

# pipeline component names that hold the denoiser (the "backbone" a bare `depth: N` refers to)
BACKBONE_COMPONENTS = ("unet", "transformer", "transformer_2", "prior", "decoder")


def layers_used(readout: int | None, num_layers: int) -> int:
    """Number of layers a prompt passes through for a hidden_states index (None: all of them)."""
    if readout is None:
        return num_layers
    used = readout if readout >= 0 else num_layers + 1 + readout
    if not 1 <= used <= num_layers:
        raise ValueError(f"text encoder readout {readout} is outside its {num_layers} layers")
    return used
