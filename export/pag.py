"""Perturbed-attention guidance traced into the UNet (``sdengine export --pag-layers``; ``sdengine.pag``).

The layers are chosen as diffusers' PAG pipelines choose them (``PAGMixin._set_pag_attn_processor``, called
here on the UNet itself, so ``mid``, ``down_blocks.1`` or a regular expression select the same
self-attention modules). Each chosen module keeps its own attention processor for the ordinary rows and
gains the identity for the perturbed ones, as diffusers' ``PAGIdentitySelfAttnProcessor2_0`` computes it
(the value projection, then the output projection: each token attends to itself alone); the UNet's
``pag_rows`` input says which rows are which. Both are computed for every row and one is picked per row
(``torch.where``, exact), so a row that is not perturbed gets exactly the plain UNet's result.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from export.records import write_record
from sdengine.errors import InvalidArgumentError
from sdengine.pag import PAG_CONFIG


class PerturbableSelfAttention:
    """An attention processor: ``base``'s attention for rows where ``rows`` is 0, the identity where it
    is 1. ``rows`` (the UNet batch's, (N,)) is set before each call of the UNet."""

    def __init__(self, base: Any) -> None:
        self.base = base
        self.rows: torch.Tensor | None = None

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        out = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if self.rows is None:
            raise RuntimeError("PerturbableSelfAttention called without its rows")
        return torch.where(
            self.rows.view(-1, *([1] * (out.dim() - 1))) > 0.5, identity(attn, hidden_states, temb), out
        )


def identity(attn: nn.Module, hidden_states: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
    """Self-attention with each token attending to itself alone: diffusers' perturbed path."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    shape = hidden_states.shape
    if hidden_states.dim() == 4:
        hidden_states = hidden_states.flatten(2).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    hidden_states = attn.to_out[1](attn.to_out[0](attn.to_v(hidden_states)))
    if len(shape) == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(shape)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


def perturb_self_attention(unet: nn.Module, layers: Sequence[str]) -> list[PerturbableSelfAttention]:
    """Make the self-attention modules ``layers`` select (diffusers' rule) perturbable; their processors.
    InvalidArgumentError for a layer that selects none (or an invalid regular expression)."""
    from diffusers.pipelines.pag.pag_utils import PAGMixin

    for layer in layers:
        try:
            re.compile(layer)
        except re.error as exc:
            raise InvalidArgumentError(f"--pag-layers {layer!r} is no regular expression: {exc}") from None
    originals = {
        name: module.processor for name, module in unet.named_modules() if hasattr(module, "processor")
    }
    chosen = object()  # what diffusers' selection gives each module it picks
    try:
        PAGMixin._set_pag_attn_processor(
            SimpleNamespace(unet=unet, _pag_attn_processors=(chosen, chosen)), list(layers), True
        )
    except ValueError as exc:  # "Cannot find PAG layer to set attention processor for: ..."
        raise InvalidArgumentError(f"--pag-layers: {exc}") from None
    processors = []
    for name, module in unet.named_modules():
        if getattr(module, "processor", None) is chosen:
            module.processor = PerturbableSelfAttention(originals[name])
            processors.append(module.processor)
    return processors


def check_pag_layers(unet: nn.Module, layers: Sequence[str]) -> None:
    """InvalidArgumentError, before any run, for ``layers`` that select no self-attention of ``unet`` (whose
    processors are left as they were)."""
    originals = unet.attn_processors
    try:
        perturb_self_attention(unet, layers)
    finally:
        unet.set_attn_processor(originals)


class PerturbableUNetExport(nn.Module):
    """A UNet export wrapper (``export.wrappers``) whose last input is ``pag_rows``, which reaches the
    perturbable self-attention modules before the wrapped UNet runs on the other inputs."""

    def __init__(self, inner: nn.Module, processors: list[PerturbableSelfAttention]) -> None:
        super().__init__()
        self.inner = inner
        self.processors = processors

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        *others, rows = inputs
        for processor in self.processors:
            processor.rows = rows
        return self.inner(*others)


def write_pag_config(out_dir: Path, layers: Sequence[str]) -> None:
    """Record the export's PAG layers (``pag/config.json``, which ``sdengine.model_dir`` reads), or remove
    the record of an earlier export into the same directory."""
    write_record(out_dir, PAG_CONFIG, {"layers": list(layers)} if layers else None)
