"""Euler's method on the probability-flow ODE in k-diffusion form (Karras et al. 2022, Algorithm 1 without
churn): diffusers ``EulerDiscreteScheduler``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from . import tables
from .base import LINEAR_BETA_DEFAULTS, BaseScheduler
from .custom import CustomSteps
from .schedule import Forms, Schedule, make_schedule, sigma_noise_scales, vp_predictions


def discrete_sigmas(
    params: Mapping[str, Any],
    abar: np.ndarray,
    n: int,
    *,
    spacing: str = "",
    custom: CustomSteps | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas) of diffusers' Euler schedulers: float32 timesteps (fractional for ``linspace``),
    and the N + 1 sigmas ending in 0 (or sigma_min with ``final_sigmas_type="sigma_min"``).

    Sigmas are the training sigmas interpolated linearly at the timesteps; with a ``spacing`` ("karras",
    "exponential") they are replaced by sigmas of that spacing spanning the interpolated range (or config
    ``sigma_min``/``sigma_max``) and the timesteps by their log-sigma interpolated positions
    (:func:`tables.sigma_to_t`). ``custom`` timesteps take the spaced ones' place; custom sigmas are the
    sigmas, the last one included, at timesteps interpolated as a spacing's are (diffusers'
    ``set_timesteps(sigmas=...)``).
    """
    n_train = params["num_train_timesteps"]
    train_sigmas = tables.sigmas_from_alphas_cumprod(abar)
    if custom is not None and custom.kind == "sigmas":
        sigmas = tables.f32(custom.values)
        return tables.f32(tables.sigma_to_t(sigmas[:-1], train_sigmas)), sigmas
    if custom is not None:
        timesteps = tables.f32(custom.values)
    else:
        timesteps = tables.f32(
            tables.spaced_timesteps(params["timestep_spacing"], n_train, n, params["steps_offset"])
        )
    tables.check_timesteps(timesteps, n_train)
    sigmas = np.interp(timesteps, np.arange(n_train), train_sigmas)
    if spacing:
        sigma_min = params.get("sigma_min")
        sigma_max = params.get("sigma_max")
        sigmas = tables.spaced_sigmas(
            spacing,
            sigmas[-1] if sigma_min is None else sigma_min,
            sigmas[0] if sigma_max is None else sigma_max,
            n,
        )
        timesteps = tables.f32(tables.sigma_to_t(sigmas, train_sigmas))
    sigma_last = train_sigmas[0] if params.get("final_sigmas_type") == "sigma_min" else 0.0
    return timesteps, tables.f32(np.concatenate([sigmas, [sigma_last]]))


def init_noise_sigma(spacing: str, sigmas: np.ndarray) -> float:
    """diffusers: the largest sigma for linspace/trailing spacing, sqrt(sigma_max^2 + 1) for leading."""
    sigma_max = float(sigmas.max())
    if spacing in ("linspace", "trailing"):
        return sigma_max
    return float(tables.f32((sigma_max**2 + 1) ** 0.5))


def sigma_schedule(
    scheduler: BaseScheduler,
    *,
    timesteps: np.ndarray,
    sigmas: np.ndarray,
    rows: list,
    n: int,
    t_start: int,
    history_size: int,
    order: int = 1,
) -> Schedule:
    """:func:`make_schedule` for a sigma-parametrised (k-diffusion) scheduler that calls the UNet at
    ``sigmas[:-1]`` (the last is the run's end): its input scaled by 1 / sqrt(sigma^2 + 1), ``add_noise``
    adding sigma times the noise, and diffusers' initial sigma for its timestep spacing."""
    return make_schedule(
        timesteps=timesteps,
        input_scale=1.0 / np.sqrt(sigmas[:-1] ** 2 + 1.0),
        rows=rows,
        init_noise_sigma=init_noise_sigma(scheduler.params["timestep_spacing"], sigmas),
        noise_scales=sigma_noise_scales(sigmas[:-1]),
        history_size=history_size,
        num_inference_steps=n,
        t_start=t_start,
        scheduler=scheduler.name,
        order=order,
    )


def k_diffusion_denoised(prediction_type: str, sigma: float, x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """x0 predicted from a k-diffusion sample x = x0 + sigma eps, whose VP form is x / sqrt(sigma^2 + 1)
    (epsilon: x0 = x - sigma m; v: x0 = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) m)."""
    scale = 1.0 / np.sqrt(sigma**2 + 1.0)
    return vp_predictions(prediction_type, scale**2, scale * x, m)[0]


@dataclass(frozen=True)
class Euler(BaseScheduler):
    """``EulerDiscreteScheduler`` (s_churn = 0): x' = x + (x - x0) / sigma * (sigma' - sigma), and the UNet
    sees x / sqrt(sigma^2 + 1)."""

    name: str = field(default="euler", init=False)

    diffusers_class: ClassVar[str] = "EulerDiscreteScheduler"
    takes_custom: ClassVar[tuple[str, ...]] = ("timesteps", "sigmas")
    sigmas_end_anywhere: ClassVar[bool] = True
    defaults: ClassVar[dict[str, Any]] = {
        **LINEAR_BETA_DEFAULTS,
        "prediction_type": "epsilon",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_spacing": "linspace",
        "timestep_type": "discrete",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "final_sigmas_type": "zero",
    }

    def _validate(self, params: dict[str, Any]) -> None:
        super()._validate(params)
        self.require(params, "interpolation_type", ("linear",))
        self.require(params, "timestep_type", ("discrete", "continuous"))
        self.require(params, "final_sigmas_type", ("zero", "sigma_min"))

    def _build(self, n: int, t_start: int) -> Schedule:
        p = self.params
        abar = self.alphas_cumprod(zero_snr_floor=True)
        spacing = "" if self.custom is not None else self.sigma_spacing(p)
        timesteps, sigmas = discrete_sigmas(p, abar, n, spacing=spacing, custom=self.custom)
        if p["timestep_type"] == "continuous" and p["prediction_type"] == "v_prediction":
            # diffusers feeds such models c_noise = log(sigma) / 4 (Karras et al. 2022, Table 1).
            timesteps = tables.f32(0.25 * np.log(sigmas[:-1]))
        f = Forms(0)
        rows = []
        # stateless: image-to-image keeps the last rows
        for sigma, sigma_next in zip(sigmas[t_start:-1], sigmas[t_start + 1 :], strict=True):
            x0 = k_diffusion_denoised(p["prediction_type"], sigma, f.sample, f.model_output)
            derivative = (f.sample - x0) / sigma
            rows.append([f.sample + derivative * (sigma_next - sigma)])
        return sigma_schedule(
            self,
            timesteps=timesteps,
            sigmas=sigmas,
            rows=rows,
            n=n,
            t_start=t_start,
            history_size=0,
        )


@dataclass(frozen=True)
class EulerKarras(Euler):
    """``euler`` with ``use_karras_sigmas`` forced on (Karras et al. 2022, eq. 5, rho = 7)."""

    name: str = field(default="euler_karras", init=False)

    diffusers_overrides: ClassVar[dict[str, Any]] = {
        "use_karras_sigmas": True,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
    }
