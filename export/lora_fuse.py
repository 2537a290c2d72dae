"""Fuse LoRA files into a PyTorch component before it is exported (``sdengine export --lora``), so that
TensorRT engines, which hold their weights, get them too. The arithmetic is ``sdengine.lora``'s."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from export.wrappers import exported_component
from sdengine.lora import LoraFile, LoraLayer, canonical_module, resolve
from sdengine.model_specs import TEXT_ENCODER_2, UNET


def _layers(component: nn.Module) -> dict[str, nn.Module]:
    """The Linear and Conv2d layers of a component, by the names LoRA files give them."""
    return {
        canonical_module(path): layer
        for path, layer in component.named_modules()
        if isinstance(layer, nn.Linear | nn.Conv2d)
    }


def _targets(
    component: nn.Module, name: str, loras: Sequence[tuple[LoraFile, float]]
) -> Iterator[tuple[nn.Module, LoraLayer, float]]:
    """(layer of ``component``, LoRA layer, scale) for every LoRA layer that updates component ``name``;
    InvalidArgumentError for one that names no layer of it."""
    layers = _layers(component)
    names = {layer: (layer, False) for layer in layers}
    flat_names = {layer.replace(".", "_"): layer for layer in layers}
    for lora, scale in loras:
        for lora_layer in lora.layers:
            if lora_layer.component == name:
                yield layers[resolve(lora_layer, names, flat_names)], lora_layer, scale


def check_loras(checkpoint: Path, components: Iterable[str], loras: Sequence[tuple[LoraFile, float]]) -> None:
    """Refuse, before anything is exported, a LoRA layer that names no layer of the checkpoint or whose
    update has another shape: each component is built from its config on PyTorch's meta device (no weights,
    no memory), so this costs seconds, not the minutes an export would run before it found out."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    wanted = {layer.component for lora, _ in loras for layer in lora.layers} & set(components)
    for component in sorted(wanted):
        with torch.device("meta"):
            if component == UNET:
                model = UNet2DConditionModel.from_config(
                    UNet2DConditionModel.load_config(checkpoint / "unet")
                )
            elif component == TEXT_ENCODER_2:  # SDXL's
                model = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(checkpoint / component))
            else:
                model = CLIPTextModel(CLIPTextConfig.from_pretrained(checkpoint / "text_encoder"))
        for layer, lora_layer, _ in _targets(model, component, loras):
            lora_layer.delta(tuple(layer.weight.shape), 0.0)  # refuses an update of another shape


def fuse_loras(module: nn.Module, component: str, loras: Sequence[tuple[LoraFile, float]]) -> int:
    """Add every LoRA layer of ``component`` to ``module`` (a wrapper of the component:
    :func:`export.wrappers.exported_component`; ControlNets beside it are left alone, as diffusers leaves
    them), in place. Returns how many layers were fused."""
    inner = exported_component(module)[1]
    fused = 0
    with torch.no_grad():
        for layer, lora_layer, scale in _targets(inner, component, loras):
            delta = lora_layer.delta(tuple(layer.weight.shape), scale)
            layer.weight += torch.from_numpy(delta).to(layer.weight.dtype)
            fused += 1
    return fused
