"""A random LoRA for an export's UNet and text encoder(s) (the demo's and the benchmarks'), in the PEFT layout
diffusers' ``save_lora_weights`` writes. Reads the layers and their shapes from the ONNX models' named
weights, so it needs no torch."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from safetensors.numpy import save_file

from sdengine.lora import named_weights
from sdengine.model_specs import TEXT_ENCODER, TEXT_ENCODER_2, UNET

#: The layers LoRA trainers target by default: attention projections, and the text encoder's.
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")


def write_random_lora(
    onnx_dir: str | os.PathLike,
    path: str | os.PathLike,
    *,
    rank: int = 4,
    seed: int = 0,
    strength: float = 0.1,
) -> Path:
    """Write a rank-``rank`` LoRA of the attention layers of ``onnx_dir``'s UNet and text encoder (both of
    SDXL's) to ``path``; ``strength``: the up weights' standard deviation (the down weights' is 1 / rank)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for component in (UNET, TEXT_ENCODER, TEXT_ENCODER_2):
        file = Path(onnx_dir) / component / "model.onnx"
        if component == TEXT_ENCODER_2 and not file.is_file():  # not an SDXL export
            continue
        model = onnx.load(str(file), load_external_data=False)
        dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
        for layer, (name, transposed) in sorted(named_weights(model).items()):
            if not layer.endswith(ATTENTION):
                continue
            out_features, in_features = dims[name][::-1] if transposed else dims[name]
            down = rng.standard_normal((rank, in_features)) / rank
            up = strength * rng.standard_normal((out_features, rank))
            # text encoders' layers as CLIP nests them (transformers 5 flattens CLIPTextModel, not SDXL's
            # second encoder, CLIPTextModelWithProjection): the names LoRA files give them
            key = f"{component}.{'' if component == UNET else 'text_model.'}{layer}"
            tensors[f"{key}.lora_A.weight"] = down.astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = up.astype(np.float32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path
