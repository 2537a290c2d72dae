"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models"), B(h) variants: diffusers ``UniPCMultistepScheduler``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from math import factorial
from typing import Any, ClassVar

import numpy as np

from ..errors import UnsupportedConfigError
from . import tables
from .base import LINEAR_BETA_DEFAULTS, BaseScheduler
from .schedule import Forms, Schedule, make_schedule, vp_predictions


def bh_weights(
    hh: float, rks: Sequence[float], solver_type: str, corrector: bool
) -> tuple[float, np.ndarray]:
    """``(B(h), rhos)``: the weights of one UniP / UniC update of order ``p = len(rks) + 1``.

    ``hh`` is the signed step in lambda (-h for data prediction, h for noise prediction), ``rks`` the ratios
    r_m = (lambda_{s_m} - lambda_s) / h of the previous points. UniC-p (Theorem 3.1) takes p differences, the
    last one at the new point (r_p = 1), with weights a solving R_p a = g / B(h), R_p[k, m] = r_m^k and
    g_k = hh phi_{k+1}(hh) k! (phi_1(z) = (e^z - 1) / z, phi_{k+1}(z) = (phi_k(z) - 1 / k!) / z); UniP-p
    (Corollary 3.2) drops the new point and solves the leading (p - 1) x (p - 1) block. B(h) = hh ("bh1")
    or e^hh - 1 ("bh2"). As in the authors' code (and diffusers), the one-difference cases take the constant
    1/2 (the h -> 0 limit) instead of solving: UniP-2, and UniC-1.
    """
    b_h = hh if solver_type == "bh1" else float(np.expm1(hh))
    order = len(rks) + 1
    if (order == 1 and corrector) or (order == 2 and not corrector):
        return b_h, np.array([0.5])
    if order == 1:
        return b_h, np.zeros(0)
    g = np.zeros(order)
    phi = np.expm1(hh) / hh - 1.0  # hh phi_2(hh)
    for k in range(1, order + 1):
        g[k - 1] = phi * factorial(k)
        phi = phi / hh - 1.0 / factorial(k + 1)  # hh phi_{k+2}(hh)
    ratios = np.array([*rks, 1.0])
    vandermonde = ratios[np.newaxis, :] ** np.arange(order)[:, np.newaxis]
    if corrector:
        return b_h, np.linalg.solve(vandermonde, g / b_h)
    return b_h, np.linalg.solve(vandermonde[:-1, :-1], g[:-1] / b_h)


@dataclass(frozen=True)
class UniPCMultistep(BaseScheduler):
    """Multistep UniPC-p, p = ``solver_order`` in 1..3, on the data (x0) or noise prediction.

    With k-diffusion sigma s: alpha = 1 / sqrt(s^2 + 1), sigma = s alpha, lambda = -log s. One update from
    s to s' with model outputs m_0 (at s) and m_1..m_{p-1} (at earlier s_1, s_2, ...) is, for data
    prediction (hh = -h, h = lambda' - lambda, D_m = (m_m - m_0) / r_m)::

        x' = (sigma'/sigma) x - alpha' (e^hh - 1) m_0 - alpha' B(h) sum_m rho_m D_m

    (noise prediction: alpha'/alpha, sigma' and hh = h in place of sigma'/sigma, alpha' and -h). Call i:

    1. m_i, the model output converted to x0 (or eps) at sigma_i, from the sample it got;
    2. UniC: unless it is the first call or ``i - 1`` is in ``disable_corrector``, the sample is replaced
       by the corrected update from the previous call's input sample x_{i-1}^c (a stored buffer), with
       m_{i-1}, m_{i-2}, ... and the new point m_i, at the previous call's order;
    3. UniP: the next sample is the update from the corrected sample with m_i, m_{i-1}, ... at order
       min(p, calls made + 1), and min(p, N - i) on the last calls with ``lower_order_final``.

    History: h_1 = x_{i-1}^c, h_{1+k} = m_{i-k} for k = 1..p (the corrector at order p reaches back p
    outputs). The final sample is not corrected (no call follows). Image-to-image restarts at the first
    kept call (no corrector, first order); step indices, ``disable_corrector`` and "last calls" stay those
    of the full schedule, as in diffusers.
    """

    name: str = field(default="unipc", init=False)

    diffusers_class: ClassVar[str] = "UniPCMultistepScheduler"
    takes_custom: ClassVar[tuple[str, ...]] = ("sigmas",)
    defaults: ClassVar[dict[str, Any]] = {
        **LINEAR_BETA_DEFAULTS,
        "solver_order": 2,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "predict_x0": True,
        "solver_type": "bh2",
        "lower_order_final": True,
        "disable_corrector": [],
        "solver_p": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "final_sigmas_type": "zero",
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
        "sigma_min": None,
        "sigma_max": None,
        "shift_terminal": None,
    }

    def _adjust(self, params: dict[str, Any]) -> None:
        # diffusers' constructor maps DPM-Solver names onto UniPC's (configs converted from DPM-Solver).
        if params["solver_type"] in ("midpoint", "heun", "logrho"):
            params["solver_type"] = "bh2"
        params["disable_corrector"] = tuple(params["disable_corrector"])

    def _validate(self, params: dict[str, Any]) -> None:
        super()._validate(params)
        self.require(params, "solver_order", (1, 2, 3))
        self.require(params, "solver_type", ("bh1", "bh2"))
        self.require(params, "final_sigmas_type", ("zero", "sigma_min"))
        self.require(params, "solver_p", (None,))
        self.require(params, "shift_terminal", (None,))
        self.refuse_flags(
            params,
            "thresholding",
            "use_flow_sigmas",
            "use_dynamic_shifting",
        )
        if params["final_sigmas_type"] == "zero":
            # At sigma' = 0, lambda' = inf: B(h) = -h and (noise prediction) sigma' (e^h - 1) are 0 * inf.
            if not params["predict_x0"]:
                raise UnsupportedConfigError(
                    f"{self.name}: predict_x0=False needs final_sigmas_type='sigma_min' "
                    "(diffusers' last step is NaN with 'zero')"
                )
            if params["solver_type"] == "bh1":
                raise UnsupportedConfigError(
                    f"{self.name}: solver_type='bh1' needs final_sigmas_type='sigma_min' "
                    "(diffusers' last step is NaN with 'zero')"
                )

    def _build(self, n: int, t_start: int) -> Schedule:
        p = self.params
        abar = self.alphas_cumprod(zero_snr_floor=True)
        timesteps, sigmas = self._sigmas(n, abar)
        steps, order = len(timesteps), p["solver_order"]
        with np.errstate(divide="ignore"):
            lambdas = -np.log(sigmas)  # log alpha - log sigma; inf at a final sigma of 0
        x0_form = p["predict_x0"]

        def this_order(i: int) -> int:
            """The UniP order of call i (diffusers' ``this_order``, warm-up from call t_start)."""
            last = steps - i if p["lower_order_final"] else order
            return min(order, last, i - t_start + 1)

        def update(
            i: int,
            i_next: int,
            x: np.ndarray,
            m0: np.ndarray,
            prev: list[tuple[int, np.ndarray]],
            new: np.ndarray | None = None,
        ) -> np.ndarray:
            """The UniP (``new`` None) or UniC update from sigma_i to sigma_{i_next} (see the class doc)."""
            s, s_next = sigmas[i], sigmas[i_next]
            alpha, alpha_next = 1.0 / np.sqrt(s**2 + 1.0), 1.0 / np.sqrt(s_next**2 + 1.0)
            h = lambdas[i_next] - lambdas[i]
            if x0_form:
                hh, ratio, scale = -h, (s_next * alpha_next) / (s * alpha), alpha_next
            else:
                hh, ratio, scale = h, alpha_next / alpha, s_next * alpha_next
            rks = [(lambdas[k] - lambdas[i]) / h for k, _ in prev]
            b_h, rhos = bh_weights(hh, rks, p["solver_type"], corrector=new is not None)
            diffs = [(m - m0) / r for (_, m), r in zip(prev, rks, strict=True)]
            if new is not None:
                diffs.append(new - m0)
            out = ratio * x - scale * np.expm1(hh) * m0
            if diffs:
                out = out - scale * b_h * sum(rho * d for rho, d in zip(rhos, diffs, strict=True))
            return out

        f = Forms(order + 1)
        last_sample, outputs = f.history(1), [f.history(1 + k) for k in range(1, order + 1)]
        rows = []
        for i in range(t_start, steps):
            alpha = 1.0 / np.sqrt(sigmas[i] ** 2 + 1.0)
            x0, eps = vp_predictions(p["prediction_type"], alpha**2, f.sample, f.model_output)
            m = x0 if x0_form else eps
            x = f.sample
            if i > t_start and i - 1 not in p["disable_corrector"]:
                prev = [(i - 1 - k, outputs[k]) for k in range(1, this_order(i - 1))]
                x = update(i - 1, i, last_sample, outputs[0], prev, new=m)
            k_p = this_order(i)
            if k_p > 1 and sigmas[i + 1] == 0.0:
                raise UnsupportedConfigError(
                    f"{self.name}: lower_order_final=False needs final_sigmas_type='sigma_min' "
                    "(diffusers' last step is not finite with 'zero')"
                )
            prev = [(i - k, outputs[k - 1]) for k in range(1, k_p)]
            rows.append([update(i, i + 1, x, m, prev), x, m, *outputs[:-1]])
        alphas = 1.0 / np.sqrt(sigmas[:-1] ** 2 + 1.0)
        return make_schedule(
            timesteps=timesteps,
            input_scale=1.0,
            rows=rows,
            init_noise_sigma=1.0,
            noise_scales=np.stack([alphas, sigmas[:-1] * alphas], axis=-1),  # alpha_t x0 + sigma_t noise
            history_size=order + 1,
            num_inference_steps=n,
            t_start=t_start,
            scheduler=self.name,
        )

    def _sigmas(self, n: int, abar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """diffusers' UniPC (integer timesteps, N + 1 float32 sigmas): N of N + 1 evenly spaced timesteps
        (the smallest dropped) for linspace/leading, DPM-Solver's trailing ones; with ``use_karras_sigmas``
        Karras sigmas over the training range (or config ``sigma_min``/``sigma_max``) at their rounded
        log-sigma positions, ending at the smallest Karras sigma for ``final_sigmas_type="sigma_min"``."""
        p = self.params
        n_train = p["num_train_timesteps"]
        train_sigmas = tables.sigmas_from_alphas_cumprod(abar)
        custom = self.custom_sigmas  # in the place of Karras sigmas
        spacing = "karras" if custom is not None else self.sigma_spacing(p)
        if spacing:
            lo, hi = p["sigma_min"], p["sigma_max"]
            sigmas = (
                custom
                if custom is not None
                else tables.spaced_sigmas(
                    spacing, train_sigmas[0] if lo is None else lo, train_sigmas[-1] if hi is None else hi, n
                )
            )
            t = tables.sigma_to_t(sigmas, train_sigmas)  # Karras' rounded, exponential ones truncated
            timesteps = (np.round(t) if spacing == "karras" else np.trunc(t)).astype(np.int64)
            sigma_min = sigmas[-1]
        else:
            if p["timestep_spacing"] == "trailing":
                ts = np.arange(n_train, 0, -n_train / n).round() - 1
            else:
                ts = tables.spaced_timesteps(p["timestep_spacing"], n_train, n + 1, p["steps_offset"])[:-1]
            timesteps = tables.integer_timesteps(ts, n_train)
            sigmas, sigma_min = train_sigmas[timesteps], train_sigmas[0]
        sigma_last = sigma_min if p["final_sigmas_type"] == "sigma_min" else 0.0
        return timesteps, tables.f32(np.concatenate([sigmas, [sigma_last]]))


@dataclass(frozen=True)
class UniPCMultistepKarras(UniPCMultistep):
    """``unipc`` with ``use_karras_sigmas`` forced on (Karras et al. 2022, eq. 5, rho = 7)."""

    name: str = field(default="unipc_karras", init=False)

    diffusers_overrides: ClassVar[dict[str, Any]] = {
        "use_karras_sigmas": True,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
    }
