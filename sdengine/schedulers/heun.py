"""Heun's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without churn): diffusers
``HeunDiscreteScheduler``, two model calls per step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from .base import LINEAR_BETA_DEFAULTS, BaseScheduler
from .euler import discrete_sigmas, k_diffusion_denoised, sigma_schedule
from .schedule import Forms, Schedule


@dataclass(frozen=True)
class Heun(BaseScheduler):
    """``HeunDiscreteScheduler`` as a table (history: h_1 = the step's start sample, h_2 = its slope).

    Each step from sigma to sigma' is two calls: an Euler step, x_e = x + d (sigma' - sigma) with
    d = (x - x0(x, sigma)) / sigma, then the UNet again at x_e and sigma', and the step taken again from x
    with the mean of the two slopes, x' = x + (d + d') / 2 (sigma' - sigma). The last step, to sigma' = 0,
    is the Euler step alone (diffusers lists every sigma but the first and the last twice: 2N - 1 calls).

    diffusers' image-to-image slices the calls ``timesteps[t_start * order:]`` (order 2), so a run from
    step ``t_start`` starts at call ``2 t_start``, on an Euler call, the scheduler fresh.
    """

    name: str = field(default="heun", init=False)

    diffusers_class: ClassVar[str] = "HeunDiscreteScheduler"
    takes_custom: ClassVar[tuple[str, ...]] = ("timesteps", "sigmas")
    order: ClassVar[int] = 2
    defaults: ClassVar[dict[str, Any]] = {
        **LINEAR_BETA_DEFAULTS,
        "beta_start": 0.00085,  # diffusers' Heun defaults to SD's betas
        "beta_end": 0.012,
        "prediction_type": "epsilon",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
    }

    def _validate(self, params: dict[str, Any]) -> None:
        super()._validate(params)
        self.refuse_flags(params, "clip_sample")

    def _build(self, n: int, t_start: int) -> Schedule:
        p = self.params
        spacing = self.sigma_spacing(p)
        steps_timesteps, steps_sigmas = discrete_sigmas(
            p, self.alphas_cumprod(), n, spacing=spacing, custom=self.custom
        )
        # per call: t_0, t_1, t_1, ..., t_{N-1}, t_{N-1}; sigmas s_0, s_1, s_1, ..., s_{N-1}, s_{N-1}, 0
        timesteps = np.concatenate([steps_timesteps[:1], np.repeat(steps_timesteps[1:], 2)])
        sigmas = np.concatenate([steps_sigmas[:1], np.repeat(steps_sigmas[1:-1], 2), steps_sigmas[-1:]])
        f = Forms(2)
        start, slope = f.history(1), f.history(2)
        rows = []
        first_call = 2 * t_start
        for i in range(first_call, len(timesteps)):
            if (i - first_call) % 2 == 0:  # an Euler step, remembered for the correction
                sigma, sigma_next = sigmas[i], sigmas[i + 1]
                x0 = k_diffusion_denoised(p["prediction_type"], sigma, f.sample, f.model_output)
                d = (f.sample - x0) / sigma
                rows.append([f.sample + d * (sigma_next - sigma), f.sample, d])
            else:  # the correction, from the remembered start with the mean slope
                sigma, sigma_next = sigmas[i - 1], sigmas[i]
                x0 = k_diffusion_denoised(p["prediction_type"], sigma_next, f.sample, f.model_output)
                d = ((f.sample - x0) / sigma_next + slope) / 2
                rows.append([start + d * (sigma_next - sigma), f.zero, f.zero])
        return sigma_schedule(
            self,
            timesteps=timesteps,
            sigmas=sigmas,
            rows=rows,
            n=n,
            t_start=t_start,
            history_size=2,
            order=self.order,
        )


@dataclass(frozen=True)
class HeunKarras(Heun):
    """``heun`` with ``use_karras_sigmas`` forced on (Karras et al. 2022, eq. 5, rho = 7)."""

    name: str = field(default="heun_karras", init=False)

    diffusers_overrides: ClassVar[dict[str, Any]] = {
        "use_karras_sigmas": True,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
    }
