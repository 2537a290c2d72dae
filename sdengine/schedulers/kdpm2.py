"""DPM-Solver-2 in k-diffusion form (k-diffusion ``sample_dpm_2``; Karras et al. 2022's sampler family):
diffusers ``KDPM2DiscreteScheduler``, two model calls per step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from . import tables
from .base import LINEAR_BETA_DEFAULTS, BaseScheduler
from .euler import discrete_sigmas, init_noise_sigma, k_diffusion_denoised
from .schedule import Forms, Schedule, make_schedule, sigma_noise_scales


@dataclass(frozen=True)
class KDPM2(BaseScheduler):
    """``KDPM2DiscreteScheduler`` as a table (history: h_1 = the step's start sample).

    Each step from sigma to sigma' is two calls: a half step to the geometric mean sigma_m = sqrt(sigma
    sigma'), x_m = x + d (sigma_m - sigma) with d = (x - x0(x, sigma)) / sigma; then the UNet at x_m and
    sigma_m, and the whole step from x with that midpoint's slope, x' = x + d_m (sigma' - sigma). The last
    step, to sigma' = 0, is the Euler step alone (2N - 1 calls). The midpoint calls' timesteps are their
    sigmas' positions in the training schedule (log-sigma interpolation), fractional as diffusers makes them.

    Image to image starts at call ``2 t_start`` (diffusers slices ``timesteps[t_start * order:]``).
    """

    name: str = field(default="dpm2", init=False)

    diffusers_class: ClassVar[str] = "KDPM2DiscreteScheduler"
    takes_custom: ClassVar[tuple[str, ...]] = ("sigmas",)
    order: ClassVar[int] = 2
    defaults: ClassVar[dict[str, Any]] = {
        **LINEAR_BETA_DEFAULTS,
        "beta_start": 0.00085,  # diffusers' KDPM2 defaults to SD's betas
        "beta_end": 0.012,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "prediction_type": "epsilon",
        "timestep_spacing": "linspace",
        "steps_offset": 0,
    }

    def _validate(self, params: dict[str, Any]) -> None:
        super()._validate(params)

    def _build(self, n: int, t_start: int) -> Schedule:
        p = self.params
        abar = self.alphas_cumprod()
        spacing = self.sigma_spacing(p)
        steps_timesteps, steps_sigmas = discrete_sigmas(p, abar, n, spacing=spacing, custom=self.custom)
        # diffusers rounds KDPM2's Karras timesteps (not its exponential ones); custom sigmas take their place
        if spacing == "karras" or self.custom_sigmas is not None:
            steps_timesteps = np.round(steps_timesteps.astype(np.float64))
        # midpoints: the geometric mean of each sigma and the one before it (0 for the step to sigma' = 0)
        with np.errstate(divide="ignore"):
            logs = np.log(steps_sigmas)
        midpoints = tables.f32(np.exp((logs[1:] + logs[:-1]) / 2))  # (N,): steps 0..N-1
        train_sigmas = tables.sigmas_from_alphas_cumprod(abar)
        mid_timesteps = tables.sigma_to_t(midpoints[:-1], train_sigmas)
        # per call: t_0, then (midpoint k, t_k) for k = 1..N-1; the sigma each call's input is scaled by
        timesteps = np.concatenate(
            [steps_timesteps[:1], np.stack([mid_timesteps, steps_timesteps[1:]], 1).ravel()]
        )
        call_sigmas = np.concatenate(
            [steps_sigmas[:1], np.stack([midpoints[:-1], steps_sigmas[1:-1]], 1).ravel()]
        )
        f = Forms(1)
        start = f.history(1)
        rows = []
        first_call = 2 * t_start
        for i in range(first_call, len(timesteps)):
            k = (i + 1) // 2  # the step this call belongs to (its first call is at 2k)
            if i % 2 == 0:  # a half step to the midpoint, the step's start remembered
                sigma, sigma_mid = steps_sigmas[k], midpoints[k]
                x0 = k_diffusion_denoised(p["prediction_type"], sigma, f.sample, f.model_output)
                d = (f.sample - x0) / sigma
                rows.append([f.sample + d * (sigma_mid - sigma), f.sample])
            else:  # the whole step from the start with the midpoint's slope
                sigma, sigma_mid, sigma_next = steps_sigmas[k - 1], midpoints[k - 1], steps_sigmas[k]
                x0 = k_diffusion_denoised(p["prediction_type"], sigma_mid, f.sample, f.model_output)
                d = (f.sample - x0) / sigma_mid
                rows.append([start + d * (sigma_next - sigma), f.zero])
        return make_schedule(
            timesteps=timesteps,
            input_scale=1.0 / np.sqrt(call_sigmas**2 + 1.0),
            rows=rows,
            init_noise_sigma=init_noise_sigma(p["timestep_spacing"], steps_sigmas),
            # add_noise reads diffusers' sigmas list, s_0, s_1, s_1, s_2, s_2, ...: no midpoints in it
            noise_scales=sigma_noise_scales(steps_sigmas[(np.arange(len(timesteps)) + 1) // 2]),
            history_size=1,
            num_inference_steps=n,
            t_start=t_start,
            scheduler=self.name,
            order=self.order,
        )


@dataclass(frozen=True)
class KDPM2Karras(KDPM2):
    """``dpm2`` with ``use_karras_sigmas`` forced on (Karras et al. 2022, eq. 5, rho = 7)."""

    name: str = field(default="dpm2_karras", init=False)

    diffusers_overrides: ClassVar[dict[str, Any]] = {
        "use_karras_sigmas": True,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
    }
