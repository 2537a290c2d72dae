"""The denoising loop and its step: classifier-free guidance, then the scheduler's table-driven update."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from sdengine.backends.base import Backend
from sdengine.schedulers import Schedule, initial_history, step
from sdengine.timing import StageTimes

Progress = Callable[[Iterable[int]], Iterable[int]]


def apply_guidance(noise_pred: np.ndarray, guidance: float) -> np.ndarray:
    """Classifier-free guidance on a [negative; positive] batch: uncond + g * (cond - uncond)."""
    uncond, cond = np.split(noise_pred, 2)
    return uncond + guidance * (cond - uncond)


def denoise(
    backend: Backend,
    schedule: Schedule,
    latents: np.ndarray,
    context: np.ndarray,
    guidance: float | None,
    noise_rng: np.random.Generator,
    times: StageTimes,
    progress: Progress | None = None,
) -> np.ndarray:
    """Run every model call of ``schedule`` from ``latents``; ``guidance`` None means no guidance (one batch).

    With guidance, ``context`` holds the negative embeddings first; the UNet runs once on the doubled batch.
    """
    history = initial_history(schedule, latents.shape, latents.dtype)
    indices = range(len(schedule.timesteps))
    for i in progress(indices) if progress else indices:
        model_input = latents * schedule.input_scale[i]
        if guidance is not None:
            model_input = np.concatenate([model_input, model_input])
        with times.time("unet"):
            noise_pred = backend.predict_noise(model_input, float(schedule.timesteps[i]), context)
        with times.time("step"):
            if guidance is not None:
                noise_pred = apply_guidance(noise_pred, guidance)
            noise = (
                noise_rng.standard_normal(latents.shape, dtype=np.float32)
                if schedule.needs_noise[i]
                else None
            )
            latents, history = step(schedule.coeffs[i], latents, noise_pred, noise, history)
    return latents
