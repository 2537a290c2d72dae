"""DDIM (Song et al. 2021), deterministic (eta = 0): diffusers ``DDIMScheduler``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from . import tables
from .base import LINEAR_BETA_DEFAULTS, BaseScheduler
from .schedule import Forms, Schedule, make_schedule, vp_noise_scales, vp_predictions


@dataclass(frozen=True)
class DDIM(BaseScheduler):
    """``DDIMScheduler.step(eta=0)``: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps (Song et al., eq. 12).

    As in diffusers the previous timestep is ``t - T // N`` whatever the spacing, and a negative one reads
    ``final_alpha_cumprod`` (1 with ``set_alpha_to_one``, else alpha-bar_0).
    """

    name: str = field(default="ddim", init=False)

    diffusers_class: ClassVar[str] = "DDIMScheduler"
    defaults: ClassVar[dict[str, Any]] = {
        **LINEAR_BETA_DEFAULTS,
        "clip_sample": True,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    }

    def _validate(self, params: dict[str, Any]) -> None:
        super()._validate(params)
        self.refuse_flags(params, "thresholding", "clip_sample")

    def _build(self, n: int, t_start: int) -> Schedule:
        p = self.params
        n_train = p["num_train_timesteps"]
        abar = self.alphas_cumprod()
        final_abar = 1.0 if p["set_alpha_to_one"] else abar[0]
        ts = tables.integer_timesteps(
            tables.spaced_timesteps(p["timestep_spacing"], n_train, n, p["steps_offset"]), n_train
        )
        f = Forms(0)
        rows = []
        for t in ts[t_start:]:  # stateless: image-to-image keeps the last rows
            prev_t = t - n_train // n
            a, a_prev = abar[t], (abar[prev_t] if prev_t >= 0 else final_abar)
            x0, eps = vp_predictions(p["prediction_type"], a, f.sample, f.model_output)
            rows.append([np.sqrt(a_prev) * x0 + np.sqrt(1.0 - a_prev) * eps])
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
