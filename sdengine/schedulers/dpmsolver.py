"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): diffusers ``DPMSolverMultistepScheduler``
with ``algorithm_type="dpmsolver++"`` and ``solver_order=2``, optionally on Karras sigmas; and its stochastic
variant, ``algorithm_type="sde-dpmsolver++"`` (A1111's "DPM++ 2M SDE")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..errors import InvalidArgumentError, UnsupportedConfigError
from . import tables
from .base import LINEAR_BETA_DEFAULTS, BaseScheduler
from .schedule import Forms, Schedule, make_schedule, vp_predictions


@dataclass(frozen=True)
class DPMSolverMultistep(BaseScheduler):
    """Multistep DPM-Solver++ of order 2 on the data prediction x0 (history: h_1 = previous x0).

    With the VP parameters of k-diffusion sigma s: alpha = 1 / sqrt(s^2 + 1), sigma = s alpha,
    lambda = -log s, and h = lambda' - lambda (so exp(-h) = s' / s), one step from s to s' is

    * first order (DDIM in x0 form, eq. 5): x' = (sigma'/sigma) x + alpha' (1 - exp(-h)) x0
    * second order, midpoint (eq. 8 with r = h_prev / h, D1 = (x0 - x0_prev) / r):
      x' = (sigma'/sigma) x + alpha' (1 - exp(-h)) (x0 + D1 / 2)
    * second order, heun: x' = (sigma'/sigma) x + alpha' (1 - exp(-h)) x0 - alpha' ((exp(-h) - 1) / h + 1) D1

    diffusers quirks kept: the first step is first order; the last one too when ``euler_at_final``, when
    ``final_sigmas_type="zero"`` (then x' = x0), or with ``lower_order_final`` and fewer than 15 steps.
    Image-to-image restarts at first order on its first call; "last" and "fewer than 15" still count the
    full schedule's steps.
    """

    name: str = field(default="dpmpp_2m", init=False)

    diffusers_class: ClassVar[str] = "DPMSolverMultistepScheduler"
    takes_custom: ClassVar[tuple[str, ...]] = ("timesteps", "sigmas")
    whole_timesteps: ClassVar[bool] = True
    #: the one ``algorithm_type`` this class implements (the SDE subclass fixes it by ``diffusers_overrides``)
    algorithm_type: ClassVar[str] = "dpmsolver++"
    defaults: ClassVar[dict[str, Any]] = {
        **LINEAR_BETA_DEFAULTS,
        "solver_order": 2,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"),
        "variance_type": None,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    }

    def _adjust(self, params: dict[str, Any]) -> None:
        # diffusers' constructor maps DEIS / UniPC names onto DPM-Solver's (configs converted from those).
        if params["algorithm_type"] == "deis":
            if params["final_sigmas_type"] == "zero":
                # diffusers checks the algorithm it was given, before the remapping, and raises.
                raise UnsupportedConfigError(
                    f"{self.name}: algorithm_type='deis' needs final_sigmas_type='sigma_min' (diffusers too)"
                )
            params["algorithm_type"] = "dpmsolver++"
        if params["solver_type"] in ("logrho", "bh1", "bh2"):
            params["solver_type"] = "midpoint"

    def _validate(self, params: dict[str, Any]) -> None:
        super()._validate(params)
        self.require(params, "algorithm_type", (self.algorithm_type,))
        self.require(params, "solver_order", (2,))
        self.require(params, "solver_type", ("midpoint", "heun"))
        self.require(params, "final_sigmas_type", ("zero", "sigma_min"))
        self.require(params, "variance_type", (None,))
        self.refuse_flags(
            params,
            "thresholding",
            "use_lu_lambdas",
            "use_flow_sigmas",
            "use_dynamic_shifting",
        )

    def _build(self, n: int, t_start: int) -> Schedule:
        p = self.params
        n_train = p["num_train_timesteps"]
        abar = self.alphas_cumprod(zero_snr_floor=True)
        train_sigmas = tables.sigmas_from_alphas_cumprod(abar)
        timesteps = self._timesteps(n, abar)
        custom = self.custom_sigmas  # in the place of Karras sigmas
        spacing = "karras" if custom is not None else self.sigma_spacing(p)
        if spacing:
            # diffusers reads config sigma_min / sigma_max even though they are not DPM-Solver arguments: they
            # are kept in its config when present in the JSON (e.g. converted from an Euler config).
            sigma_min, sigma_max = self.config.get("sigma_min"), self.config.get("sigma_max")
            sigmas = (
                custom
                if custom is not None
                else tables.spaced_sigmas(
                    spacing,
                    train_sigmas[0] if sigma_min is None else sigma_min,
                    train_sigmas[-1] if sigma_max is None else sigma_max,
                    n,
                )
            )
            t = tables.sigma_to_t(sigmas, train_sigmas)
            # Karras' rounded, except for squaredcos_cap_v2; the rest truncated by diffusers' int64 cast
            rounded = spacing == "karras" and p["beta_schedule"] != "squaredcos_cap_v2"
            timesteps = (np.round(t) if rounded else np.trunc(t)).astype(np.int64)
        else:
            sigmas = np.interp(timesteps, np.arange(n_train), train_sigmas)
        sigma_last = train_sigmas[0] if p["final_sigmas_type"] == "sigma_min" else 0.0
        sigmas = tables.f32(np.concatenate([sigmas, [sigma_last]]))

        steps = len(timesteps)
        if t_start >= steps:  # lambda_min_clipped with trailing spacing can give fewer than n timesteps
            raise InvalidArgumentError(
                f"{self.name}: this strength skips all {steps} timesteps; raise strength or steps"
            )
        alphas = 1.0 / np.sqrt(sigmas[:-1].astype(np.float64) ** 2 + 1.0)
        sde = p["algorithm_type"] == "sde-dpmsolver++"
        f = Forms(1)
        x, prev_x0 = f.sample, f.history(1)
        rows = []
        for i in range(t_start, steps):
            s, s_next = sigmas[i], sigmas[i + 1]
            alpha, alpha_next = 1.0 / np.sqrt(s**2 + 1.0), 1.0 / np.sqrt(s_next**2 + 1.0)
            x0 = vp_predictions(p["prediction_type"], alpha**2, x, f.model_output)[0]
            ratio = s_next / s  # exp(-h); also sigma'/sigma = ratio * alpha'/alpha
            # The SDE's coefficients: the ODE's with h doubled (exp(-h) squared), see DPMSolverMultistepSDE.
            decay = ratio * ratio if sde else ratio
            new_x = decay * alpha_next / alpha * x + alpha_next * (1.0 - decay) * x0
            if sde:  # sigma'_VP sqrt(1 - exp(-2h)) noise, sigma'_VP = s' alpha'
                new_x = new_x + s_next * alpha_next * np.sqrt(1.0 - decay) * f.noise
            last = i == steps - 1
            lower_order_final = last and (
                p["euler_at_final"]
                or (p["lower_order_final"] and steps < 15)
                or p["final_sigmas_type"] == "zero"
            )
            # The first call of a run has no previous x0 (diffusers' lower_order_nums starts at 0).
            if i > t_start and not lower_order_final:
                h = np.log(s / s_next)
                r = np.log(sigmas[i - 1] / s) / h  # h_prev / h, the step ratio, for SDE and ODE alike
                d1 = (x0 - prev_x0) / r
                if p["solver_type"] == "midpoint":
                    new_x = new_x + 0.5 * alpha_next * (1.0 - decay) * d1
                else:
                    h_eff = 2.0 * h if sde else h
                    new_x = new_x + alpha_next * ((decay - 1.0) / h_eff + 1.0) * d1
            rows.append([new_x, x0])
        return make_schedule(
            timesteps=timesteps,
            input_scale=1.0,
            rows=rows,
            init_noise_sigma=1.0,
            noise_scales=np.stack([alphas, sigmas[:-1] * alphas], axis=-1),  # alpha_t x0 + sigma_t noise
            history_size=1,
            num_inference_steps=n,
            t_start=t_start,
            scheduler=self.name,
        )

    def _timesteps(self, n: int, abar: np.ndarray) -> np.ndarray:
        """diffusers' DPM-Solver timesteps: N of N + 1 evenly spaced ones (the smallest dropped), below the
        ``lambda_min_clipped`` cut (lambda = log alpha - log sigma, half the log-SNR); or the custom ones,
        which no cut applies to."""
        p = self.params
        n_train = p["num_train_timesteps"]
        if self.custom is not None and self.custom.kind == "timesteps":
            return tables.integer_timesteps(np.asarray(self.custom.values), n_train)
        lambdas = 0.5 * (np.log(abar) - np.log1p(-abar))
        clipped = int(np.searchsorted(lambdas[::-1], p["lambda_min_clipped"]))
        last = n_train - clipped
        spacing = p["timestep_spacing"]
        if spacing == "trailing":
            ts = np.arange(last, 0, -n_train / n).round() - 1
        elif spacing == "linspace":
            ts = tables.spaced_timesteps("linspace", last, n + 1)[:-1]
        else:
            ts = tables.spaced_timesteps("leading", last, n + 1, p["steps_offset"])[:-1]
        if ts.size == 0:
            raise UnsupportedConfigError(f"{self.name}: lambda_min_clipped leaves no timesteps")
        return tables.integer_timesteps(ts, n_train)


@dataclass(frozen=True)
class DPMSolverMultistepKarras(DPMSolverMultistep):
    """``dpmpp_2m`` with ``use_karras_sigmas`` forced on (Karras et al. 2022, eq. 5, rho = 7)."""

    name: str = field(default="dpmpp_2m_karras", init=False)

    diffusers_overrides: ClassVar[dict[str, Any]] = {
        "use_karras_sigmas": True,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
    }


@dataclass(frozen=True)
class DPMSolverMultistepSDE(DPMSolverMultistep):
    """SDE-DPM-Solver++(2M): the multistep data-prediction solver of the diffusion SDE instead of its ODE.

    Over a step the reverse SDE's linear part and its noise are integrated exactly, with x0 as in the ODE
    solver (held at x0, or extrapolated by D1). In the ODE's terms (``DPMSolverMultistep``: sigma, alpha the
    VP parameters, h = lambda' - lambda), the Ito integral of the noise gives a Gaussian of variance
    sigma'^2 (1 - exp(-2h)), and the drift's decay is exp(-2h) instead of exp(-h):

    * first order: x' = (sigma'/sigma) exp(-h) x + alpha' (1 - exp(-2h)) x0 + sigma' sqrt(1 - exp(-2h)) z
    * midpoint: adds alpha' (1 - exp(-2h)) D1 / 2;  heun: adds alpha' ((exp(-2h) - 1) / (2h) + 1) D1

    i.e. the ODE step with h replaced by 2h (D1 still divides by r = h_prev / h), plus the noise: the same
    update as k-diffusion's ``sample_dpmpp_2m_sde`` at eta = 1. z is a fresh unit Gaussian on every call
    (diffusers draws one on every call, the last included); on a last step to sigma' = 0 its weight is 0 and
    x' = x0, as in the ODE solver. Orders, image-to-image restarts and ``add_noise`` are ``dpmpp_2m``'s.
    """

    name: str = field(default="dpmpp_2m_sde", init=False)

    algorithm_type: ClassVar[str] = "sde-dpmsolver++"
    diffusers_overrides: ClassVar[dict[str, Any]] = {"algorithm_type": "sde-dpmsolver++"}


@dataclass(frozen=True)
class DPMSolverMultistepSDEKarras(DPMSolverMultistepSDE):
    """``dpmpp_2m_sde`` with ``use_karras_sigmas`` forced on (A1111's "DPM++ 2M SDE Karras")."""

    name: str = field(default="dpmpp_2m_sde_karras", init=False)

    diffusers_overrides: ClassVar[dict[str, Any]] = {
        "algorithm_type": "sde-dpmsolver++",
        "use_karras_sigmas": True,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
    }
