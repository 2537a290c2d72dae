"""The :class:`Schedule` table and the helpers schedulers use to write its rows.

Every supported scheduler update is linear in (sample, model_output, noise, history buffers), so step ``i`` is
a matrix ``coeffs[i]`` of shape ``(1 + K, 3 + K)``::

    [new_sample, new_h_1, ..., new_h_K] = coeffs[i] @ [sample, model_output, noise, h_1, ..., h_K]

A scheduler builds each output as a *linear form*: a float64 vector over those ``3 + K`` inputs, combined with
ordinary arithmetic (see :class:`Forms`), so the table code reads like the update equations it encodes.

Image-to-image runs only the calls ``t_start, t_start + 1, ...`` of the full schedule, with a fresh scheduler
(diffusers' img2img pipeline slices ``scheduler.timesteps`` and calls ``set_begin_index``). Every scheduler
builds its rows the same way: ``for i in range(t_start, S)``, reading the full-schedule tables at ``i`` (step
indices stay absolute) and its multistep state from ``i - t_start`` (the calls made since it was fresh);
:func:`make_schedule` then keeps the per-call tables from ``t_start`` on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgumentError, UnsupportedConfigError

SAMPLE, MODEL_OUTPUT, NOISE = 0, 1, 2
#: Column of history buffer ``h_1`` in a row; ``h_j`` is column ``HISTORY + j - 1``.
HISTORY = 3


@dataclass(frozen=True, eq=False)
class Schedule:
    """Everything a denoising loop needs for ``num_inference_steps`` steps, as host-side tables.

    ``S = len(timesteps)`` model calls (PNDM makes ``num_inference_steps + 1``, like diffusers). For call
    ``i`` the UNet gets ``input_scale[i] * sample`` at timestep ``timesteps[i]``, then
    :func:`sdengine.schedulers.step` applies ``coeffs[i]``. Arrays are read-only.

    The first sample is ``init_noise_sigma * noise`` for text-to-image, and ``a * image_latents + b * noise``
    with ``(a, b) = image_noise`` for image-to-image (the scheduler's ``add_noise`` at ``timesteps[0]``; it
    is filled at strength 1 too). ``noise_scales[i]`` is that ``(a, b)`` at call ``i``'s timestep, as
    ``add_noise`` gives it once ``i`` calls have run (inpainting with a plain UNet noises the image to the
    next call's timestep after every step). A schedule for ``strength`` < 1 leaves out the first ``t_start``
    steps of the full ``num_inference_steps`` schedule (``order * t_start`` calls, for a scheduler of
    ``order`` calls per step, as diffusers' image-to-image slices them); ``t_start`` is 0 at strength 1.
    """

    timesteps: np.ndarray  # (S,) float32
    input_scale: np.ndarray  # (S,) float32
    coeffs: np.ndarray  # (S, 1 + K, 3 + K) float32
    needs_noise: np.ndarray  # (S,) bool
    init_noise_sigma: float
    noise_scales: np.ndarray  # (S, 2) float64: add_noise's (image, noise) factors at each call's timestep
    history_size: int
    num_inference_steps: int
    t_start: int
    #: the whole run's timesteps before this one's first call, which image to image (or a refiner's share)
    #: leaves out: where DeepCache's helper counts a call's position from (:mod:`sdengine.deepcache`)
    lead_timesteps: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        s, k = len(self.timesteps), self.history_size
        expected = {
            "timesteps": ((s,), np.float32),
            "input_scale": ((s,), np.float32),
            "coeffs": ((s, 1 + k, 3 + k), np.float32),
            "needs_noise": ((s,), np.bool_),
            "noise_scales": ((s, 2), np.float64),
        }
        for name, (shape, dtype) in expected.items():
            value = np.asarray(getattr(self, name))
            if value.shape != shape or value.dtype != dtype:
                raise ValueError(
                    f"Schedule.{name}: expected {shape} {np.dtype(dtype)}, got {value.shape} {value.dtype}"
                )
            view = value.view()  # read-only view: the caller's own array keeps its flags
            view.setflags(write=False)
            object.__setattr__(self, name, view)

    @property
    def steps_run(self) -> int:
        """The steps this run makes: ``num_inference_steps`` less the ``t_start`` that image to image
        leaves out."""
        return self.num_inference_steps - self.t_start

    def head(self, calls: int) -> Schedule:
        """The run cut after its first ``calls`` calls (a base model's part, before its refiner takes
        over): every call keeps its row, so the calls run as they would in the whole run."""
        if not 1 <= calls <= len(self.timesteps):
            raise ValueError(f"head({calls}) of a schedule of {len(self.timesteps)} calls")
        per_call = ("timesteps", "input_scale", "coeffs", "needs_noise", "noise_scales")
        return dataclasses.replace(self, **{name: getattr(self, name)[:calls] for name in per_call})

    @property
    def image_noise(self) -> tuple[float, float]:
        """``add_noise``'s (image, noise) factors at the first call's timestep: image to image's start."""
        a, b = self.noise_scales[0]
        return float(a), float(b)


class Forms:
    """Linear forms over the step inputs ``[sample, model_output, noise, h_1..h_K]`` (float64 vectors)."""

    def __init__(self, history_size: int) -> None:
        self.history_size = history_size
        self.width = HISTORY + history_size

    def unit(self, column: int) -> np.ndarray:
        v = np.zeros(self.width)
        v[column] = 1.0
        return v

    @property
    def zero(self) -> np.ndarray:
        return np.zeros(self.width)

    @property
    def sample(self) -> np.ndarray:
        return self.unit(SAMPLE)

    @property
    def model_output(self) -> np.ndarray:
        return self.unit(MODEL_OUTPUT)

    @property
    def noise(self) -> np.ndarray:
        return self.unit(NOISE)

    def history(self, j: int) -> np.ndarray:
        """The form reading history buffer ``h_j`` (1-based, as in the docs)."""
        if not 1 <= j <= self.history_size:
            raise IndexError(j)
        return self.unit(HISTORY + j - 1)


def vp_predictions(
    prediction_type: str, alpha_prod: float, x: np.ndarray, m: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(x0, eps) predicted from a variance-preserving sample x = sqrt(a) x0 + sqrt(1-a) eps (a = alpha-bar_t).

    * epsilon (Ho et al. 2020, eq. 15): eps = m, x0 = (x - sqrt(1-a) m) / sqrt(a);
    * v_prediction (Salimans & Ho 2022, sec. 4), v = sqrt(a) eps - sqrt(1-a) x0:
      x0 = sqrt(a) x - sqrt(1-a) m, eps = sqrt(a) m + sqrt(1-a) x.

    ``x`` and ``m`` are linear forms (the sample may be a scaled or stored one). An epsilon model has no x0
    prediction where a = 0 (the last timestep of a zero-terminal-SNR schedule): that is refused.
    """
    sa, sb = np.sqrt(alpha_prod), np.sqrt(1.0 - alpha_prod)
    if prediction_type == "epsilon":
        if alpha_prod == 0.0:
            raise UnsupportedConfigError(
                "prediction_type='epsilon' cannot denoise the zero-SNR last timestep of "
                "rescale_betas_zero_snr=True (x0 = (x - eps) / 0); use a v_prediction model or another "
                "timestep_spacing/scheduler"
            )
        return (x - sb * m) / sa, m
    if prediction_type == "v_prediction":
        return sa * x - sb * m, sa * m + sb * x
    raise UnsupportedConfigError(
        f"prediction_type {prediction_type!r} is not supported (supported: epsilon, v_prediction)"
    )


def vp_noise_scales(alpha_prod: np.ndarray) -> np.ndarray:
    """``add_noise`` of the variance-preserving schedulers (DDPM's q(x_t | x_0), Ho et al. 2020, eq. 4):
    x_t = sqrt(a) x_0 + sqrt(1 - a) noise, a = alpha-bar_t; one (sqrt(a), sqrt(1 - a)) row per entry."""
    a = np.asarray(alpha_prod, dtype=np.float64)
    return np.stack([np.sqrt(a), np.sqrt(1.0 - a)], axis=-1)


def sigma_noise_scales(sigmas: np.ndarray) -> np.ndarray:
    """``add_noise`` of the sigma-parametrised (k-diffusion) schedulers: x_sigma = x_0 + sigma noise."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    return np.stack([np.ones_like(sigmas), sigmas], axis=-1)


def make_schedule(
    *,
    timesteps: np.ndarray,
    input_scale: np.ndarray | float,
    rows: Sequence[Sequence[np.ndarray]],
    init_noise_sigma: float,
    noise_scales: np.ndarray,
    history_size: int,
    num_inference_steps: int,
    t_start: int,
    scheduler: str,
    order: int = 1,
) -> Schedule:
    """A :class:`Schedule` from the full run's per-call ``timesteps``, ``input_scale`` and ``noise_scales``
    (``add_noise``'s (image, noise) factors, shape (S, 2)) and the output forms
    ``rows = [[new_sample, new_h_1..new_h_K] for calls c, c + 1, ...]`` from call ``c = order * t_start``
    on (``order``: diffusers' ``scheduler.order``, 2 for Heun's method)."""
    timesteps = np.asarray(timesteps, dtype=np.float64)
    input_scale = np.broadcast_to(np.asarray(input_scale, dtype=np.float64), timesteps.shape)
    first = order * t_start
    if first >= len(timesteps):
        raise InvalidArgumentError(
            f"{scheduler}: this strength skips all {len(timesteps)} model calls; raise strength or steps"
        )
    noise_scales = np.asarray(noise_scales, dtype=np.float64)
    if noise_scales.shape != (len(timesteps), 2):
        raise AssertionError(f"{scheduler}: noise_scales {noise_scales.shape} for {len(timesteps)} timesteps")
    lead = tuple(float(t) for t in timesteps[:first].astype(np.float32))  # the calls the run leaves out
    timesteps, input_scale, noise_scales = timesteps[first:], input_scale[first:], noise_scales[first:]
    if len(rows) != len(timesteps):
        raise AssertionError(f"{scheduler}: {len(rows)} rows for {len(timesteps)} timesteps")
    coeffs = np.array([np.stack(row) for row in rows], dtype=np.float64).reshape(
        len(rows), 1 + history_size, HISTORY + history_size
    )
    bad = np.flatnonzero(~np.isfinite(coeffs).all(axis=(1, 2)))
    if bad.size:
        raise UnsupportedConfigError(
            f"{scheduler}: this config gives non-finite step coefficients at timestep {timesteps[bad[0]]:g}"
        )
    coeffs32 = coeffs.astype(np.float32)
    return Schedule(
        timesteps=timesteps.astype(np.float32),
        input_scale=input_scale.astype(np.float32),
        coeffs=coeffs32,
        needs_noise=(coeffs32[:, :, NOISE] != 0).any(axis=1),
        init_noise_sigma=float(init_noise_sigma),
        noise_scales=noise_scales,
        history_size=history_size,
        num_inference_steps=num_inference_steps,
        t_start=t_start,
        lead_timesteps=lead,
    )
