"""Fuse LoRA files into a PyTorch component before it is exported (``sdengine export --lora``), so that
TensorRT engines, which hold their weights, get them too. The arithmetic is ``sdengine.lora``'s."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from sdengine.lora import LoraFile, canonical_module, resolve


def fuse_loras(module: nn.Module, component: str, loras: Sequence[tuple[LoraFile, float]]) -> int:
    """Add every LoRA layer of ``component`` to ``module`` (a wrapper whose single child is the component),
    in place. Returns how many layers were fused."""
    (inner,) = module.children()
    layers = {
        canonical_module(path): layer
        for path, layer in inner.named_modules()
        if isinstance(layer, nn.Linear | nn.Conv2d)
    }
    weights = {name: (name, False) for name in layers}
    flat_names = {name.replace(".", "_"): name for name in layers}
    fused = 0
    with torch.no_grad():
        for lora, scale in loras:
            for lora_layer in lora.layers:
                if lora_layer.component != component:
                    continue
                weight = layers[resolve(lora_layer, weights, flat_names)].weight
                delta = lora_layer.delta(tuple(weight.shape), scale)
                weight += torch.from_numpy(delta).to(weight.dtype)
                fused += 1
    return fused
