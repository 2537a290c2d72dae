"""The denoising loop: every step is one call, whatever the backend."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from sdengine.backends.base import Backend, DenoisePlan
from sdengine.timing import StageTimes

Progress = Callable[[Iterable[int]], Iterable[int]]


def denoise(
    backend: Backend, plan: DenoisePlan, times: StageTimes, progress: Progress | None = None
) -> np.ndarray:
    """Run every model call of ``plan`` and return the final latents (on the host)."""
    denoiser = backend.denoiser(plan, times)
    calls = range(plan.tables.num_calls)
    for _ in progress(calls) if progress else calls:
        with times.time("step_call"):  # host time per step: the whole step on the CPU, its launch on a GPU
            denoiser.step()
    return denoiser.latents()
