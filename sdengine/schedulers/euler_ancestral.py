"""Ancestral Euler sampling (k-diffusion ``sample_euler_ancestral``): diffusers
``EulerAncestralDiscreteScheduler``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from .base import LINEAR_BETA_DEFAULTS, BaseScheduler
from .euler import discrete_sigmas, k_diffusion_denoised, sigma_schedule
from .schedule import Forms, Schedule


@dataclass(frozen=True)
class EulerAncestral(BaseScheduler):
    """Each step from sigma to sigma' splits sigma' into a deterministic and a fresh-noise part::

        sigma_up = sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2),  sigma_down = sqrt(sigma'^2 - sigma_up^2)
        x' = x + (x - x0) / sigma * (sigma_down - sigma) + sigma_up * noise

    The last step (sigma' = 0) adds no noise.
    """

    name: str = field(default="euler_a", init=False)

    diffusers_class: ClassVar[str] = "EulerAncestralDiscreteScheduler"
    takes_custom: ClassVar[tuple[str, ...]] = ("sigmas",)
    defaults: ClassVar[dict[str, Any]] = {
        **LINEAR_BETA_DEFAULTS,
        "prediction_type": "epsilon",
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }

    def _build(self, n: int, t_start: int) -> Schedule:
        p = self.params
        abar = self.alphas_cumprod(zero_snr_floor=True)
        timesteps, sigmas = discrete_sigmas(p, abar, n, custom=self.custom)
        f = Forms(0)
        rows = []
        # stateless: image-to-image keeps the last rows
        for sigma, sigma_next in zip(sigmas[t_start:-1], sigmas[t_start + 1 :], strict=True):
            sigma_up = np.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
            sigma_down = np.sqrt(sigma_next**2 - sigma_up**2)
            x0 = k_diffusion_denoised(p["prediction_type"], sigma, f.sample, f.model_output)
            derivative = (f.sample - x0) / sigma
            rows.append([f.sample + derivative * (sigma_down - sigma) + sigma_up * f.noise])
        return sigma_schedule(
            self,
            timesteps=timesteps,
            sigmas=sigmas,
            rows=rows,
            n=n,
            t_start=t_start,
            history_size=0,
        )
