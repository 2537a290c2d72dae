"""Timesteps or sigmas given by the caller instead of those a scheduler's config spaces out: diffusers'
``set_timesteps(timesteps=...)`` and ``set_timesteps(sigmas=...)``, which its pipelines take as ``timesteps``
and ``sigmas``.

Timesteps go to the schedulers whose diffusers class takes them (Euler, Heun, DPM-Solver++ 2M and 2M SDE).
Sigmas go to Euler, whose class takes them too (the last one, where the run ends, may be above 0), and to
every other sigma-based scheduler (Euler ancestral, Heun, DPM2, LMS, DPM-Solver++ 2M and 2M SDE, UniPC),
where they take the place of the scheduler's Karras sigmas, which diffusers derives the timesteps and every
other table from; there they end at 0. (:attr:`BaseScheduler.takes_custom`; the torch baseline runs the
latter with diffusers' classes given the sigmas in that place, :func:`sdengine.baseline.sigmas_in_place`.)
The run has one step per timestep, or one per sigma but the last.

:data:`PRESETS` names published schedules: ``"ays"``, NVIDIA's Align Your Steps (Sabour et al. 2024,
"Align Your Steps: Optimizing Sampling Schedules in Diffusion Models"), the 10-step schedules optimised for
Stable Diffusion 1.5 and SDXL, with the values diffusers lists in ``AysSchedules``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InvalidArgumentError
from ..number_lists import parse_numbers

#: What a custom schedule gives: the timesteps of the UNet's calls, or the sigmas of the steps' ends.
KINDS = ("timesteps", "sigmas")

#: Published schedules by name, kind and model family ("sd": SD 1.x and 2.x; "xl": SDXL).
PRESETS: dict[str, dict[str, dict[str, tuple[float, ...]]]] = {
    "ays": {
        "timesteps": {
            "sd": (999, 850, 736, 645, 545, 455, 343, 233, 124, 24),
            "xl": (999, 845, 730, 587, 443, 310, 193, 116, 53, 13),
        },
        "sigmas": {
            "sd": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.0),
            "xl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.0),
        },
    },
}


@dataclass(frozen=True)
class CustomSteps:
    """A run's own timesteps (one per step, the noisiest first) or sigmas (one per step and the final one),
    checked for their shape: numbers, strictly decreasing; sigmas >= 0 (timesteps are checked against a
    scheduler's training timesteps by the scheduler)."""

    kind: str
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidArgumentError(f"a custom schedule gives timesteps or sigmas, not {self.kind!r}")
        least = 1 if self.kind == "timesteps" else 2
        if len(self.values) < least:
            raise InvalidArgumentError(
                f"custom {self.kind} need at least {least} value(s), got {len(self.values)}"
            )
        for value in self.values:
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise InvalidArgumentError(f"custom {self.kind} must be finite numbers, got {value!r}")
        object.__setattr__(self, "values", tuple(float(value) for value in self.values))
        if any(b >= a for a, b in zip(self.values[:-1], self.values[1:], strict=True)):
            raise InvalidArgumentError(
                f"custom {self.kind} must decrease strictly (the noisiest first), got {list(self.values)}"
            )
        if self.values[-1] < 0:
            raise InvalidArgumentError(f"custom {self.kind} must be >= 0, got {self.values[-1]!r}")

    @property
    def steps(self) -> int:
        """The run's steps: a timestep each, or a sigma each but the last."""
        return len(self.values) - (self.kind == "sigmas")

    def parameters(self) -> dict[str, list[float]]:
        """For a run's record: ``{"timesteps": [...]}`` or ``{"sigmas": [...]}``."""
        return {self.kind: list(self.values)}


def custom_steps(
    timesteps: str | Sequence[float] | None = None,
    sigmas: str | Sequence[float] | None = None,
    *,
    xl: bool = False,
) -> CustomSteps | None:
    """The custom schedule that ``timesteps`` or ``sigmas`` give (at most one of them): a list of values, or
    a name of :data:`PRESETS`, taken for an SDXL model (``xl``) or an SD 1.x/2.x one. None for neither."""
    if timesteps is not None and sigmas is not None:
        raise InvalidArgumentError("give custom timesteps or custom sigmas, not both")
    kind, given = ("timesteps", timesteps) if timesteps is not None else ("sigmas", sigmas)
    if given is None:
        return None
    if isinstance(given, str):
        if given not in PRESETS:
            raise InvalidArgumentError(
                f"unknown {kind} preset {given!r}; presets: {', '.join(PRESETS)} (or a list of numbers)"
            )
        return CustomSteps(kind, PRESETS[given][kind]["xl" if xl else "sd"])
    try:
        values = tuple(given)
    except TypeError:
        raise InvalidArgumentError(f"custom {kind} must be a list of numbers or a preset name") from None
    return CustomSteps(kind, values)


def parse_custom(text: str) -> str | tuple[float, ...]:
    """A command line's custom schedule: a preset name, or numbers separated by commas."""
    text = text.strip()
    if text in PRESETS:
        return text
    takes = f"a preset ({', '.join(PRESETS)}) or numbers separated by commas"
    return parse_numbers(text, "a custom schedule", takes)
