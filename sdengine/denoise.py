"""The denoising loop: every step is one call, whatever the backend."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from sdengine.backends.base import Backend, DenoisePlan
from sdengine.errors import InvalidArgumentError
from sdengine.timing import StageTimes

Progress = Callable[[Iterable[int]], Iterable[int]]
#: Asked between two steps; once it answers True the run ends with the latents so far.
Stop = Callable[[], bool]


@dataclass(frozen=True)
class Preview:
    """Look at the latents part way: ``callback(calls_done, latents)`` after every ``every`` UNet calls
    (not after the last: that is the result). On a GPU each look waits for the device, once."""

    callback: Callable[[int, np.ndarray], object]
    every: int = 1

    def __post_init__(self) -> None:
        if not callable(self.callback):
            raise InvalidArgumentError(f"preview must be callable, not {type(self.callback).__name__}")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise InvalidArgumentError(f"preview_every must be a whole number >= 1, got {self.every!r}")

    def shifted(self, calls: int) -> Preview:
        """This preview for a run that follows one of ``calls`` calls (the hires fix's second pass): its
        callback counts on from there."""
        return Preview(lambda done, latents: self.callback(calls + done, latents), self.every)

    def due(self, calls_done: int, num_calls: int) -> bool:
        return calls_done % self.every == 0 and calls_done < num_calls


def denoise(
    backend: Backend,
    plan: DenoisePlan,
    times: StageTimes,
    progress: Progress | None = None,
    preview: Preview | None = None,
    stop: Stop | None = None,
) -> np.ndarray:
    """Run every model call of ``plan`` (or, asked after each call but the last, those until ``stop``
    answers True) and return the final latents (on the host)."""
    denoiser = backend.denoiser(plan, times)
    num_calls = plan.tables.num_calls
    calls = range(num_calls)
    for call in progress(calls) if progress else calls:
        if call and stop is not None and stop():
            break
        with times.time("step_call"):  # host time per step: the whole step on the CPU, its launch on a GPU
            denoiser.step()
        if preview and preview.due(call + 1, num_calls):
            preview.callback(call + 1, np.array(denoiser.latents(final=False)))  # a copy: the run goes on
    return denoiser.latents()
