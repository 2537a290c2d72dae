"""Adaptive projected guidance (Sadat et al. 2024, "Eliminating Oversaturation and Artifacts of High Guidance
Scales in Diffusion Models"), as diffusers' ``AdaptiveProjectedGuidance`` guider computes it
(``normalized_guidance``), in place of classifier-free guidance's plain combination.

Per image, with ``d = cond - uncond`` (the UNet's two predictions):

- momentum ``m``: ``d`` is replaced by the running average ``a <- d + m a`` (from ``a = 0`` at a run's first
  call; 0: no momentum, diffusers' ``None``);
- norm threshold ``r`` (> 0): ``d`` is scaled down to norm ``r`` where its norm is larger (0: none);
- ``d`` is split into its part parallel to ``cond`` and the part orthogonal to it, and the parallel part,
  which oversaturates at high guidance, weighed by ``eta``;
- ``eps = uncond + g (d_orthogonal + eta d_parallel)``.

With ``eta = 1``, no threshold and no momentum this is classifier-free guidance exactly. diffusers' guider
defaults to ``eta = 1``, ``r = 15`` and no momentum; the paper's experiments mostly use ``eta = 0`` and a
negative momentum (-0.5). It runs inside the step model (:mod:`sdengine.step_graph`), so on a GPU it is part
of each captured step; the running average lives in the step model's last history buffer, which no
scheduler uses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from sdengine.errors import InvalidArgumentError
from sdengine.number_lists import parse_numbers


class APG(NamedTuple):
    """Adaptive projected guidance's settings (diffusers' defaults)."""

    eta: float = 1.0
    norm_threshold: float = 15.0
    momentum: float = 0.0


APG_NAMES = APG._fields


def check_apg(settings: bool | Sequence[float] | Mapping[str, float] | None) -> APG | None:
    """APG's settings from ``True`` (diffusers' defaults), ``(eta, norm_threshold, momentum)`` or a mapping of
    any of those names (the others at their defaults); None and False: off. ``eta`` and ``momentum`` finite
    numbers, ``norm_threshold`` >= 0 (0: none)."""
    if settings is None or settings is False:
        return None
    if settings is True:
        return APG()
    if isinstance(settings, Mapping):
        unknown = sorted(set(settings) - set(APG_NAMES))
        if unknown:
            raise InvalidArgumentError(
                f"apg takes {', '.join(APG_NAMES)}; unknown: {', '.join(map(str, unknown))}"
            )
        values = [settings.get(name, default) for name, default in zip(APG_NAMES, APG(), strict=True)]
    elif isinstance(settings, (list, tuple)) and len(settings) == len(APG_NAMES):
        values = list(settings)
    else:
        raise InvalidArgumentError(
            f"apg takes True or three numbers, {', '.join(APG_NAMES)}; got {settings!r}"
        )
    for name, value in zip(APG_NAMES, values, strict=True):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidArgumentError(f"apg's {name} must be a finite number, got {value!r}")
    checked = APG(*(float(v) for v in values))
    if checked.norm_threshold < 0:
        raise InvalidArgumentError(
            f"apg's norm_threshold must be >= 0 (0: none), got {checked.norm_threshold}"
        )
    return checked


def parse_apg(text: str) -> APG:
    """``ETA,THRESHOLD,MOMENTUM`` (the command line's ``--apg``) as checked settings."""
    takes = "three numbers ETA,THRESHOLD,MOMENTUM (such as 0,15,-0.5)"
    checked = check_apg(list(parse_numbers(text, "--apg", takes, len(APG_NAMES))))
    assert checked is not None
    return checked


def apg_input(settings: APG) -> np.ndarray:
    """The step model's ``apg`` input: (eta, norm_threshold, momentum) float32."""
    return np.array(settings, np.float32)
