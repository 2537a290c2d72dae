"""Perturbed-attention guidance (PAG; Ahn et al. 2024, "Self-Rectifying Diffusion Sampling with
Perturbed-Attention Guidance"), as diffusers' PAG pipelines run it.

One more copy of the prompt's part of the batch runs through a UNet whose self-attention in chosen layers
(``mid`` by default: the middle block's) is replaced by the identity (each token attends to itself alone,
its value passed straight on), and guidance pulls away from that degraded prediction too::

    eps = uncond + g * (cond - uncond) + s * (cond - perturbed)        (g > 1: with classifier-free guidance)
    eps = cond + s * (cond - perturbed)                                (g <= 1: without, as in diffusers)

The layers are traced into the exported UNet (``sdengine export --pag-layers``), which then takes one more
input, ``pag_rows``: 1 for each batch row whose self-attention those layers perturb, 0 for the others, so
one export serves runs with and without it. The guidance is the composable prompts' sum
(:mod:`sdengine.composable`) over two parts, the prompt and its perturbed copy, with weights that give the
formulas above. With classifier-free guidance the UNet's batch is [negative, prompt, perturbed] and::

    uncond + g * (w_1 (cond - uncond) + w_2 (perturbed - uncond)),   w_1 = (g + s) / g,  w_2 = -s / g

and without it (g <= 1, 0 included) the batch is [prompt, perturbed], as in diffusers, and the step model's
noise is the parts' sum itself, ``w_1 cond + w_2 perturbed`` with ``w_1 = 1 + s``, ``w_2 = -s``. So it runs
inside the captured steps on every backend with no step model of its own. diffusers' adaptive scale ``a``
lowers the scale as the timestep ``t`` of each UNet call falls, ``s_t = max(s - a (1000 - t), 0)``; the
weights are then a table of the calls, which the step model reads as it reads the others
(:func:`call_weights`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from sdengine.composable import Parts
from sdengine.errors import InvalidArgumentError, ModelDirectoryError

#: Where an export says which layers its UNet can perturb.
PAG_CONFIG = Path("pag") / "config.json"
#: diffusers' default layers (its PAG pipelines' ``pag_applied_layers``).
DEFAULT_PAG_LAYERS = ("mid",)


def exported_pag(config: dict[str, Any]) -> tuple[str, ...]:
    """The layers an export's ``pag/config.json`` names (empty: its UNet takes no ``pag_rows``)."""
    if not config:
        return ()
    layers = config.get("layers")
    if not isinstance(layers, list) or not layers or not all(isinstance(x, str) for x in layers):
        raise ModelDirectoryError(f"{PAG_CONFIG} is unreadable (no list of layers): export again")
    return tuple(layers)


def check_pag_scale(scale: float, adaptive: float = 0.0) -> tuple[float, float]:
    """A PAG scale and adaptive scale: finite numbers >= 0 (0: off)."""
    for name, value in (("pag_scale", scale), ("pag_adaptive_scale", adaptive)):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value < 0:
            raise InvalidArgumentError(f"{name} must be a finite number >= 0, got {value!r}")
    if adaptive and not scale:
        raise InvalidArgumentError("pag_adaptive_scale lowers a pag_scale: give one")
    return float(scale), float(adaptive)


def pag_parts(prompts: tuple[str, ...], guidance: float, scale: float) -> tuple[Parts, ...]:
    """Each image's two parts: its prompt, and the same prompt perturbed, weighted so that the composable
    sum is PAG's guidance (see the module's docstring)."""
    first, second = part_weights_at(guidance, scale)
    return tuple(((p, float(first)), (p, float(second))) for p in prompts)


def part_weights_at(guidance: float, scale: np.ndarray | float) -> tuple[Any, Any]:
    """The prompt's and the perturbed copy's weights at PAG scale(s) ``scale`` (module docstring): divided by
    ``guidance`` with classifier-free guidance (g > 1), the plain sum's without."""
    if guidance > 1.0:
        return (guidance + scale) / guidance, -scale / guidance
    return 1.0 + scale, -scale


def call_weights(
    guidance: float, scale: float, adaptive: float, timesteps: np.ndarray, batch: int
) -> np.ndarray:
    """(calls, 2, B, 1, 1, 1): each UNet call's weights of the prompt and its perturbed copy, at the scale
    the adaptive scale leaves at the call's timestep (see the module's docstring)."""
    scales = np.maximum(scale - adaptive * (1000.0 - np.asarray(timesteps, np.float64)), 0.0)
    weights = np.stack(part_weights_at(guidance, scales), axis=1)  # (calls, 2)
    return np.broadcast_to(weights[:, :, None, None, None, None], (len(scales), 2, batch, 1, 1, 1)).astype(
        np.float32
    )


def perturbed_rows(copies: int, batch: int, perturbed: bool) -> np.ndarray:
    """``pag_rows`` for a UNet batch of ``copies`` x ``batch`` rows, copies first: 1 on the last copy's rows
    when ``perturbed`` (the perturbed part is the last), 0 elsewhere."""
    rows = np.zeros((copies, batch), np.float32)
    if perturbed:
        rows[-1] = 1.0
    return rows.reshape(-1)
