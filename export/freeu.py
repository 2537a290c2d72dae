"""FreeU traced into the UNet (``sdengine export --freeu``; ``sdengine.freeu``).

diffusers' up blocks call ``apply_freeu`` before each layer concatenates its skip connection, when their
``s1``, ``s2``, ``b1``, ``b2`` attributes are set (``UNet2DConditionModel.enable_freeu``). The export sets
them, so those calls are traced, and while the UNet runs it puts :func:`apply_freeu` here in diffusers'
place: the same operations on the scales of the UNet's ``freeu`` input, a tensor, where diffusers bakes in
Python numbers.

diffusers' ``fourier_filter`` scales a 2-D FFT's lowest modes and transforms back (``torch.fft``). Here
the same filter is matrix products: the modes it scales are frequencies 0 and -1 along each side (0 alone
on a side of 1), so with ``x`` real the filtered ``x`` is ``x + (s - 1) Re(R x C^T)``, where ``R`` and
``C`` project each side onto those modes (``R[n, m] = (1 + e^(-2 pi i (n - m) / H)) / H``). The matrices
are computed in the graph from the sides, so the export runs at every size; in float32, as diffusers
computes the FFT (an fp16 export runs them in float16, as its other activations: the GPU check compares it
with diffusers in float16). Every backend has matrix products; few have ONNX's DFT.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from export.records import write_record
from sdengine.freeu import FREEU_CONFIG, FREEU_SCALES


def low_modes(x: torch.Tensor) -> torch.Tensor:
    """The part of ``x`` (..., H, W) in its four lowest 2-D Fourier modes (frequencies 0 and -1 of each
    side; 0 alone on a side of 1), in float32: the real part of their inverse transform."""
    rows_re, rows_im = _side_projection(x.shape[-2])
    cols_re, cols_im = _side_projection(x.shape[-1])
    x = x.float()
    return rows_re @ x @ cols_re.transpose(0, 1) - rows_im @ x @ cols_im.transpose(0, 1)


def _side_projection(size: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The real and imaginary parts of the (size, size) projection onto frequencies 0 and -1. ``size`` is
    traced (a dynamic side), so it is read back from ``arange`` as a tensor."""
    n = torch.arange(size, dtype=torch.float32)
    side = n[-1:] + 1
    second = torch.clamp(side - 1, 0, 1)  # frequency -1 is a mode of its own on sides of 2 and more
    angle = (2 * math.pi) * (n[:, None] - n[None, :]) / side
    return (1 + second * torch.cos(angle)) / side, -second * torch.sin(angle) / side


def fourier_filter(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """diffusers' ``fourier_filter(x, threshold=1, scale)``: ``x`` with its four lowest modes times
    ``scale``."""
    return (x.float() + (scale - 1) * low_modes(x)).to(x.dtype)


def scale_first_half(hidden_states: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """The first half of the channels (rounded down) times ``factor``, the rest as they are."""
    channels = hidden_states.shape[1]
    half = channels // 2
    ones = torch.ones(channels - half, dtype=hidden_states.dtype)
    weights = torch.cat([factor.to(hidden_states.dtype).expand(half), ones])
    return hidden_states * weights.view(1, channels, 1, 1)


class FreeUUNetExport(nn.Module):
    """A UNet export wrapper (``inner``, from ``export.wrappers``) whose last input is ``freeu``, FreeU's
    scales ``(s1, s2, b1, b2)``, which the UNet's up blocks apply while the wrapped UNet runs on the other
    inputs."""

    def __init__(self, inner: nn.Module, unet: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        unet.enable_freeu(*(1.0,) * len(FREEU_SCALES))  # turns the up blocks' calls on; the values: ours

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        *others, scales = inputs
        with scaled_by(scales):
            return self.inner(*others)


@contextlib.contextmanager
def scaled_by(scales: torch.Tensor) -> Iterator[None]:
    """diffusers' up blocks apply FreeU with ``scales`` (s1, s2, b1, b2) within the block."""
    from diffusers.models.unets import unet_2d_blocks

    def apply_freeu(
        resolution_idx: int, hidden_states: torch.Tensor, res_hidden_states: torch.Tensor, **_: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if resolution_idx in (0, 1):
            skip, backbone = scales[resolution_idx], scales[2 + resolution_idx]
            hidden_states = scale_first_half(hidden_states, backbone)
            res_hidden_states = fourier_filter(res_hidden_states, skip)
        return hidden_states, res_hidden_states

    original = unet_2d_blocks.apply_freeu
    unet_2d_blocks.apply_freeu = apply_freeu
    try:
        yield
    finally:
        unet_2d_blocks.apply_freeu = original


def write_freeu_config(out_dir: Path, freeu: bool) -> None:
    """Record that the export's UNet takes FreeU's scales (``freeu/config.json``, which
    ``sdengine.model_dir`` reads), or remove the record of an earlier export into the same directory."""
    write_record(out_dir, FREEU_CONFIG, {"scales": list(FREEU_SCALES)} if freeu else None)
