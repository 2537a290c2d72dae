"""Floating-point operations of each model call, counted once per model and shape with torch's counter.

Counts come from ``torch.utils.flop_counter`` on the PyTorch modules the ONNX models were exported from
(matmuls and convolutions, which dominate), and are cached in ``flops.json`` beside the ONNX models.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from sdengine.model_specs import TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE_DECODER

CACHE_NAME = "flops.json"


def _key(component: str, batch: int, height: int, width: int, controlnets: int = 0) -> str:
    with_controlnets = f"+{controlnets}controlnets" if controlnets and component == UNET else ""
    return f"{component}{with_controlnets}@b{batch}x{height}x{width}"


def count_flops(
    checkpoint: Path, component: str, batch: int, height: int, width: int, controlnets: Sequence[str] = ()
) -> int:
    """FLOPs of one call of ``component`` (the UNet with ``controlnets`` inside, as exported)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from export.controlnet import with_controlnets
    from export.wrappers import load_export_module, sample_inputs, text_vocab_size
    from sdengine.model_dir import open_checkpoint_dir

    controlnets = [Path(c) for c in controlnets] if component == UNET else []
    arch = with_controlnets(open_checkpoint_dir(checkpoint).arch, controlnets)
    vocab_size = text_vocab_size(checkpoint, component)
    inputs = sample_inputs(arch, component, batch=batch, height=height, width=width, vocab_size=vocab_size)
    module = load_export_module(checkpoint, component, controlnets, arch.xl)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(*inputs.values())
    return int(counter.get_total_flops())


def stage_flops(
    checkpoint: Path,
    onnx_dir: Path,
    *,
    batch: int,
    height: int,
    width: int,
    cfg: bool,
    controlnets: Sequence[str] = (),
) -> dict[str, int]:
    """FLOPs of one call of each model stage (UNet and text encoder at twice the batch with CFG; the UNet
    with the ControlNets an export holds; SDXL's text encoder stage runs both its text encoders)."""
    cache_path = onnx_dir / CACHE_NAME
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    text_batch = 2 * batch if cfg else batch
    xl = (onnx_dir / TEXT_ENCODER_2 / "model.onnx").is_file()
    wanted = {
        "text_encoder": [(TEXT_ENCODER, text_batch), *([(TEXT_ENCODER_2, text_batch)] if xl else [])],
        "unet": [(UNET, text_batch)],
        "vae_decode": [(VAE_DECODER, batch)],
    }
    result = {}
    for stage, calls in wanted.items():
        result[stage] = 0
        for component, b in calls:
            key = _key(component, b, height, width, len(controlnets))
            if key not in cache:
                cache[key] = count_flops(checkpoint, component, b, height, width, controlnets)
                cache_path.write_text(json.dumps(cache, indent=2, sort_keys=True) + "\n")
            result[stage] += cache[key]
    return result
