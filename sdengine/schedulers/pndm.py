"""PNDM's pseudo linear multistep method (Liu et al. 2022, PLMS): diffusers ``PNDMScheduler`` with
``skip_prk_steps=True``, Stable Diffusion 1.x's default scheduler."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..errors import UnsupportedConfigError
from . import tables
from .base import LINEAR_BETA_DEFAULTS, BaseScheduler
from .schedule import Forms, Schedule, make_schedule, vp_noise_scales

#: Adams-Bashforth weights applied to [eps_i, eps_{i-1}, ...] once the history holds 1..4 model outputs.
_PLMS_WEIGHTS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


@dataclass(frozen=True)
class PNDM(BaseScheduler):
    """``PNDMScheduler.step_plms`` as a table (history: h_1 = stored sample, h_2..h_4 = past model outputs).

    Each step applies PNDM's transfer function (Liu et al., eq. 9) from timestep t to t' = t - T // N::

        x' = sqrt(a'/a) x - (a' - a) / (a sqrt(1 - a') + sqrt(a (1 - a) a')) * e

    with ``e`` an Adams-Bashforth combination of the model outputs (v_prediction outputs are turned into eps
    after combining, e = sqrt(a) v + sqrt(1 - a) x, as diffusers does). diffusers' warm-up without Runge-Kutta
    steps: the timesteps repeat the second one (N + 1 model calls); call 0 steps with e_0 alone and stores its
    sample x_0 and output e_0; call 1 restarts from x_0 with (e_0 + e_1) / 2 over [t_1 + T // N, t_1] and
    does not enter e_1 in the history; later calls use 2, 3, then 4 outputs (Adams-Bashforth weights). As in
    diffusers the step is always T // N timesteps long, whatever the spacing.

    Image-to-image runs the calls from ``t_start`` on, with this warm-up restarted there (diffusers' counter
    and history start empty). Since the timestep list repeats t_1, call ``t_start`` (k >= 1) is at t_{k-1},
    one step noisier than the other schedulers start; for k = 1 the first two calls are both at t_1 and the
    second steps from t_1 + T // N to t_1 (diffusers too).
    """

    name: str = field(default="pndm", init=False)

    diffusers_class: ClassVar[str] = "PNDMScheduler"
    defaults: ClassVar[dict[str, Any]] = {
        **LINEAR_BETA_DEFAULTS,
        "skip_prk_steps": False,
        "set_alpha_to_one": False,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "steps_offset": 0,
    }

    def _validate(self, params: dict[str, Any]) -> None:
        super()._validate(params)
        if not params["skip_prk_steps"]:
            raise UnsupportedConfigError(
                "pndm: skip_prk_steps=False (Runge-Kutta warm-up) is not supported; "
                "only PLMS with skip_prk_steps=True"
            )

    def _build(self, n: int, t_start: int) -> Schedule:
        p = self.params
        n_train = p["num_train_timesteps"]
        abar = self.alphas_cumprod()
        final_abar = 1.0 if p["set_alpha_to_one"] else abar[0]
        ascending = tables.integer_timesteps(
            tables.spaced_timesteps(p["timestep_spacing"], n_train, n, p["steps_offset"])[::-1], n_train
        )
        # diffusers: concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1] -- the second timestep is repeated.
        ts = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
        ratio = n_train // n
        f = Forms(4)
        stored, outputs = f.history(1), [f.history(2), f.history(3), f.history(4)]
        rows = []
        for i in range(t_start, len(ts)):
            t, calls = ts[i], i - t_start  # calls: diffusers' counter, 0 at the first call of a run
            if calls == 1:
                t_cur, t_prev = t + ratio, t
                x, e = stored, (f.model_output + outputs[0]) / 2
                new_history = [f.zero, *outputs]
            else:
                t_cur, t_prev = t, t - ratio
                past = [f.model_output, *outputs]
                weights = _PLMS_WEIGHTS[1 if calls == 0 else min(calls, 4)]
                x, e = f.sample, sum(w * o for w, o in zip(weights, past[: len(weights)], strict=True))
                new_history = [f.sample if calls == 0 else f.zero, *past[:3]]
            tables.check_timesteps(np.array([t_cur]), n_train)
            a, a_prev = abar[t_cur], (abar[t_prev] if t_prev >= 0 else final_abar)
            if p["prediction_type"] == "v_prediction":
                e = np.sqrt(a) * e + np.sqrt(1.0 - a) * x
            denom = a * np.sqrt(1.0 - a_prev) + np.sqrt(a * (1.0 - a) * a_prev)
            rows.append([np.sqrt(a_prev / a) * x - (a_prev - a) / denom * e, *new_history])
        return make_schedule(
            timesteps=ts,
            input_scale=1.0,
            rows=rows,
            init_noise_sigma=1.0,
            noise_scales=vp_noise_scales(abar[ts]),
            history_size=4,
            num_inference_steps=n,
            t_start=t_start,
            scheduler=self.name,
        )
