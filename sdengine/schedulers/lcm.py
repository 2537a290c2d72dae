"""Latent Consistency Model multistep sampling (Luo et al. 2023, Algorithm 1): diffusers ``LCMScheduler``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..errors import InvalidArgumentError
from .base import BaseScheduler
from .schedule import Forms, Schedule, make_schedule, vp_noise_scales, vp_predictions

#: sigma_data of the consistency-model boundary condition (Song et al. 2023, "Consistency Models", App. C).
SIGMA_DATA = 0.5


@dataclass(frozen=True)
class LCM(BaseScheduler):
    """Each step maps x_t to the consistency function f(x_t, t) = c_skip(t) x_t + c_out(t) x0(x_t, t), with
    c_skip = s^2 / (u^2 + s^2), c_out = u / sqrt(u^2 + s^2), u = t * timestep_scaling, s = sigma_data, then
    re-noises it to the next timestep t': x' = sqrt(a') f + sqrt(1 - a') noise; the last step returns f.

    Timesteps are N of the ``original_inference_steps`` distillation timesteps (k - 1, 2k - 1, ..., with
    k = T // original_inference_steps), picked by ``floor(linspace(0, M, N, endpoint=False))`` from the top;
    ``timestep_spacing`` and ``steps_offset`` are ignored, as in diffusers.
    """

    name: str = field(default="lcm", init=False)

    diffusers_class: ClassVar[str] = "LCMScheduler"
    defaults: ClassVar[dict[str, Any]] = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "original_inference_steps": 50,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "timestep_scaling": 10.0,
        "rescale_betas_zero_snr": False,
    }

    def _validate(self, params: dict[str, Any]) -> None:
        super()._validate(params)
        self.refuse_flags(params, "thresholding", "clip_sample")

    def _build(self, n: int, t_start: int) -> Schedule:
        p = self.params
        n_train, original = p["num_train_timesteps"], p["original_inference_steps"]
        if not 1 <= original <= n_train:
            raise InvalidArgumentError(
                f"lcm: original_inference_steps must be in [1, {n_train}], got {original}"
            )
        if n > original:
            raise InvalidArgumentError(
                f"lcm: steps must be <= original_inference_steps ({original}), got {n}"
            )
        k = n_train // original
        origin = (np.arange(1, original + 1) * k - 1)[::-1]
        ts = origin[np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)]
        abar = self.alphas_cumprod()
        f = Forms(0)
        rows = []
        for i in range(t_start, n):  # stateless: image-to-image keeps the last rows (i is absolute)
            t = ts[i]
            u = t * p["timestep_scaling"]
            c_skip = SIGMA_DATA**2 / (u**2 + SIGMA_DATA**2)
            c_out = u / np.sqrt(u**2 + SIGMA_DATA**2)
            x0 = vp_predictions(p["prediction_type"], abar[t], f.sample, f.model_output)[0]
            denoised = c_out * x0 + c_skip * f.sample
            if i == n - 1:
                rows.append([denoised])
            else:
                a_next = abar[ts[i + 1]]
                rows.append([np.sqrt(a_next) * denoised + np.sqrt(1.0 - a_next) * f.noise])
        return make_schedule(
            timesteps=ts,
            input_scale=1.0,
            rows=rows,
            init_noise_sigma=1.0,
            noise_scales=vp_noise_scales(abar[ts]),
            history_size=0,
            num_inference_steps=n,
            t_start=t_start,
            scheduler=self.name,
        )
