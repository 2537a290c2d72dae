"""Linear multistep (Adams-Bashforth in sigma) on the probability-flow ODE, as k-diffusion's ``sample_lms``:
diffusers ``LMSDiscreteScheduler``, and with Karras sigmas (``lms_karras``, the web UI's "LMS Karras")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from numpy.polynomial import polynomial

from .base import LINEAR_BETA_DEFAULTS, BaseScheduler
from .euler import discrete_sigmas, k_diffusion_denoised, sigma_schedule
from .schedule import Forms, Schedule

#: The order diffusers' ``step`` uses (its default, which the pipelines keep).
ORDER = 4


def lms_coefficient(sigmas: np.ndarray, i: int, order: int, j: int) -> float:
    """The weight of the derivative ``j`` steps back in step ``i``: the integral, from sigma_i to
    sigma_{i+1}, of the Lagrange polynomial that is 1 at sigma_{i-j} and 0 at the other ``order - 1`` of
    sigma_i ... sigma_{i-order+1}. diffusers integrates it numerically (scipy's ``quad``); it is a
    polynomial, integrated here exactly."""
    basis = np.array([1.0])
    for k in range(order):
        if k != j:
            factor = np.array([-sigmas[i - k], 1.0]) / (sigmas[i - j] - sigmas[i - k])
            basis = polynomial.polymul(basis, factor)
    antiderivative = polynomial.polyint(basis)
    return float(
        polynomial.polyval(sigmas[i + 1], antiderivative) - polynomial.polyval(sigmas[i], antiderivative)
    )


@dataclass(frozen=True)
class LMS(BaseScheduler):
    """``LMSDiscreteScheduler``: d_i = (x - x0) / sigma_i, x' = x + sum_j c_ij d_{i-j} over the last 4
    derivatives (history: h_1..h_3 = d_{i-1}..d_{i-3}), and the UNet sees x / sqrt(sigma^2 + 1).

    diffusers quirk kept: the polynomial's order is min(i + 1, 4) with ``i`` the step's index in the full
    schedule, also for image to image, which starts with one derivative; its weights are then those of the
    higher order, for the derivatives it has (the others are not there to weigh)."""

    name: str = field(default="lms", init=False)

    diffusers_class: ClassVar[str] = "LMSDiscreteScheduler"
    takes_custom: ClassVar[tuple[str, ...]] = ("sigmas",)
    defaults: ClassVar[dict[str, Any]] = {
        **LINEAR_BETA_DEFAULTS,
        "prediction_type": "epsilon",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
    }

    def _validate(self, params: dict[str, Any]) -> None:
        super()._validate(params)

    def _build(self, n: int, t_start: int) -> Schedule:
        p = self.params
        abar = self.alphas_cumprod()
        timesteps, sigmas = discrete_sigmas(p, abar, n, spacing=self.sigma_spacing(p), custom=self.custom)
        sigmas64 = sigmas.astype(np.float64)
        f = Forms(ORDER - 1)
        history = [f.history(j) for j in range(1, ORDER)]  # d_{i-1}, d_{i-2}, d_{i-3}
        rows = []
        for i in range(t_start, n):
            x0 = k_diffusion_denoised(p["prediction_type"], sigmas64[i], f.sample, f.model_output)
            derivatives = [(f.sample - x0) / sigmas64[i], *history]
            have = min(i - t_start + 1, ORDER)  # derivatives made since the run began
            order = min(i + 1, ORDER)
            update = sum(
                lms_coefficient(sigmas64, i, order, j) * derivatives[j] for j in range(min(have, order))
            )
            rows.append([f.sample + update, derivatives[0], *derivatives[1 : ORDER - 1]])
        return sigma_schedule(
            self,
            timesteps=timesteps,
            sigmas=sigmas,
            rows=rows,
            n=n,
            t_start=t_start,
            history_size=ORDER - 1,
        )


@dataclass(frozen=True)
class LMSKarras(LMS):
    """``LMSDiscreteScheduler`` with ``use_karras_sigmas=True``."""

    name: str = field(default="lms_karras", init=False)

    diffusers_overrides: ClassVar[dict[str, Any]] = {
        "use_karras_sigmas": True,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
    }
