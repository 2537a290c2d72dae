"""FreeU (Si et al. 2024, "FreeU: Free Lunch in Diffusion U-Net"), as diffusers' ``enable_freeu`` runs it.

In the first two of the UNet's up blocks (the deepest), before each layer concatenates its skip connection,
FreeU scales the backbone's hidden states and the skip connection's lowest frequencies:

- stage ``k`` (``k`` = 1, 2: up blocks 0 and 1): the first half of the hidden states' channels times
  ``b_k``;
- the skip connection's four lowest 2-D Fourier modes (frequencies 0 and -1 along each side, diffusers'
  ``fourier_filter`` with threshold 1) times ``s_k``, the rest left as they are.

The scales are traced into the exported UNet as an input of their own (``sdengine export --freeu``), so one
export runs with any scales, FreeU off included: scales of 1 give the plain UNet's output exactly (products
by 1, and a low-pass part added times 0). The Fourier filter is traced as matrix products
(``export.freeu``), exact in real arithmetic and run by every backend, where the FFT of diffusers' own code
is an operator few of them have.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sdengine.errors import InvalidArgumentError, ModelDirectoryError
from sdengine.number_lists import parse_numbers

#: Where an export says that its UNet takes FreeU's scales.
FREEU_CONFIG = Path("freeu") / "config.json"
#: The scales' names, in the order of diffusers' ``enable_freeu`` and of the UNet's ``freeu`` input.
FREEU_SCALES = ("s1", "s2", "b1", "b2")
#: Scales that turn FreeU off: the plain UNet's output.
FREEU_OFF = (1.0, 1.0, 1.0, 1.0)

FreeUScales = tuple[float, float, float, float]


def check_freeu(scales: Sequence[float] | Mapping[str, float] | None) -> FreeUScales | None:
    """FreeU's scales as ``(s1, s2, b1, b2)``: from four numbers in that order (diffusers'
    ``enable_freeu``'s) or a mapping of those names; None stays None (FreeU off). Each must be a finite
    number."""
    if scales is None:
        return None
    if isinstance(scales, Mapping):
        unknown = sorted(set(scales) - set(FREEU_SCALES))
        missing = [name for name in FREEU_SCALES if name not in scales]
        if unknown or missing:
            raise InvalidArgumentError(
                f"freeu takes the scales {', '.join(FREEU_SCALES)}"
                + (f"; unknown: {', '.join(map(str, unknown))}" if unknown else "")
                + (f"; missing: {', '.join(missing)}" if missing else "")
            )
        scales = [scales[name] for name in FREEU_SCALES]
    values = list(scales) if isinstance(scales, (list, tuple)) else None
    if values is None or len(values) != len(FREEU_SCALES):
        raise InvalidArgumentError(f"freeu takes four scales, {', '.join(FREEU_SCALES)}; got {scales!r}")
    for name, value in zip(FREEU_SCALES, values, strict=True):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value):
            raise InvalidArgumentError(f"freeu's {name} must be a finite number, got {value!r}")
    s1, s2, b1, b2 = (float(v) for v in values)
    return (s1, s2, b1, b2)


def parse_freeu(text: str) -> FreeUScales:
    """``S1,S2,B1,B2`` (the command line's ``--freeu``) as checked scales."""
    takes = "four numbers S1,S2,B1,B2 (such as 0.9,0.2,1.5,1.6)"
    checked = check_freeu(list(parse_numbers(text, "--freeu", takes, len(FREEU_SCALES))))
    assert checked is not None
    return checked


def freeu_input(scales: FreeUScales | None) -> np.ndarray:
    """The UNet's ``freeu`` input: the scales, or those that turn FreeU off."""
    return np.asarray(FREEU_OFF if scales is None else scales, dtype=np.float32)


def exported_freeu(config: dict[str, Any]) -> bool:
    """Whether an export's ``freeu/config.json`` says its UNet takes FreeU's scales (none: it does not)."""
    if not config:
        return False
    if config.get("scales") != list(FREEU_SCALES):
        raise ModelDirectoryError(f"{FREEU_CONFIG} is unreadable (no list of its scales): export again")
    return True
