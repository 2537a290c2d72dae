"""The AUTOMATIC1111 web UI's noise schedules that are a list of sigmas of their own (its ``scheduler`` field:
"Align Your Steps", "SGM Uniform", "Uniform", "Normal", "Simple", "Polyexponential", "DDIM", "KL Optimal"),
computed as its ``sd_schedulers`` module computes them, for a model's training sigmas; the sampler then runs
them as custom sigmas (:mod:`sdengine.schedulers.custom`). Each list has ``n + 1`` sigmas, the last 0, for
``n`` steps, with two exceptions the web UI has too: "DDIM" takes every ``len // n``-th training sigma, which
may be a step more or fewer than ``n`` (30 steps run 31), and "KL Optimal" ends at the smallest training
sigma, not 0, which only Euler's run can end at (:data:`ENDS_ABOVE_ZERO`).

The formulas are the web UI's, over k-diffusion's discrete schedule (a training timestep's sigma, and
log-sigma interpolated linearly between two: :func:`t_to_sigma`, and back,
:func:`sdengine.schedulers.tables.sigma_to_t`); they have not been run against the web UI itself here.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sdengine.schedulers import tables

#: Align Your Steps' 10-step sigmas for SD 1.5 and SDXL as NVIDIA's how-to gives them, the last (the
#: training schedule's smallest, about 0.029) kept: the web UI interpolates them to other step counts
#: (:func:`align_your_steps`).
AYS_SIGMAS = {
    "sd": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "xl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
}


def loglinear_interp(values: np.ndarray, n: int) -> np.ndarray:
    """``n`` values spread over decreasing ``values`` linearly in their logarithm (NVIDIA's how-to)."""
    xs = np.linspace(0, 1, len(values))
    ys = np.log(np.asarray(values, np.float64)[::-1])
    return np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1].copy()


def t_to_sigma(t: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """k-diffusion's ``DiscreteSchedule.t_to_sigma``: the sigma of a fractional timestep, its log interpolated
    linearly between the two training timesteps around it."""
    t = np.asarray(t, np.float64)
    log_sigmas = np.log(train_sigmas)
    low, high = np.floor(t).astype(int), np.ceil(t).astype(int)
    w = t - low
    return np.exp((1 - w) * log_sigmas[low] + w * log_sigmas[high])


def align_your_steps(n: int, train_sigmas: np.ndarray, xl: bool) -> np.ndarray:
    """The web UI's "Align Your Steps": the 11 sigmas of :data:`AYS_SIGMAS` interpolated to ``n`` (kept as
    they are for ``n`` = 11; for one step, the last of them, as the web UI's interpolation gives it), then
    0."""
    base = np.array(AYS_SIGMAS["xl" if xl else "sd"])
    return np.append(base if n == len(base) else loglinear_interp(base, n), 0.0)


def sgm_uniform(n: int, train_sigmas: np.ndarray, xl: bool) -> np.ndarray:
    """The web UI's "SGM Uniform": the sigmas of ``n`` timesteps evenly spaced from the largest sigma's down
    to, but short of, the smallest's, then 0."""
    start, end = tables.sigma_to_t(train_sigmas[[-1, 0]], train_sigmas)
    return np.append(t_to_sigma(np.linspace(start, end, n + 1)[:-1], train_sigmas), 0.0)


def normal(n: int, train_sigmas: np.ndarray, xl: bool) -> np.ndarray:
    """The web UI's "Normal" (and "Uniform", which is k-diffusion's ``get_sigmas``, the same over the whole
    training range): the sigmas of ``n`` timesteps evenly spaced from the largest sigma's to the smallest's,
    then 0."""
    start, end = tables.sigma_to_t(train_sigmas[[-1, 0]], train_sigmas)
    return np.append(t_to_sigma(np.linspace(start, end, n), train_sigmas), 0.0)


def simple(n: int, train_sigmas: np.ndarray, xl: bool) -> np.ndarray:
    """The web UI's "Simple": every ``len / n``-th training sigma from the largest down (the index
    truncated), then 0."""
    stride = len(train_sigmas) / n
    return np.append([train_sigmas[-(1 + int(x * stride))] for x in range(n)], 0.0)


def polyexponential(n: int, train_sigmas: np.ndarray, xl: bool) -> np.ndarray:
    """The web UI's "Polyexponential" at its default rho of 1 (k-diffusion's ``get_sigmas_polyexponential``):
    ``n`` sigmas evenly spaced in log sigma from the largest training sigma to the smallest, then 0. (That is
    the web UI's "Exponential" too; sdengine's "Exponential" is diffusers' ``use_exponential_sigmas``, over
    the range the config's timestep spacing gives.)"""
    return np.append(np.exp(np.linspace(np.log(train_sigmas[-1]), np.log(train_sigmas[0]), n)), 0.0)


def ddim(n: int, train_sigmas: np.ndarray, xl: bool) -> np.ndarray:
    """The web UI's "DDIM": the training sigmas of timesteps 1, 1 + s, 1 + 2s, ... (``s = len // n``, at
    least 1) below the last, the largest first, then 0: ``n`` steps where ``n`` divides the training
    timesteps into whole strides, else a few more (30 of 1000: 31)."""
    stride = max(len(train_sigmas) // n, 1)
    return np.append(train_sigmas[1::stride][::-1], 0.0)


def kl_optimal(n: int, train_sigmas: np.ndarray, xl: bool) -> np.ndarray:
    """The web UI's "KL Optimal" (Wu et al. 2024's schedule): ``n + 1`` sigmas evenly spaced in arctan sigma
    from the largest training sigma to the smallest, which is the last: the run ends there, not at 0."""
    ramp = np.arange(n + 1) / n
    return np.tan(ramp * np.arctan(train_sigmas[0]) + (1 - ramp) * np.arctan(train_sigmas[-1]))


#: The web UI's label of each such schedule, and the function giving its sigmas.
SIGMA_SCHEDULES: dict[str, Callable[[int, np.ndarray, bool], np.ndarray]] = {
    "Align Your Steps": align_your_steps,
    "SGM Uniform": sgm_uniform,
    "Uniform": normal,
    "Normal": normal,
    "Simple": simple,
    "Polyexponential": polyexponential,
    "DDIM": ddim,
    "KL Optimal": kl_optimal,
}
#: The schedules whose last sigma is above 0: only a scheduler whose custom sigmas may end anywhere
#: (:func:`sdengine.schedulers.custom_sigmas_end_anywhere`: Euler) runs them.
ENDS_ABOVE_ZERO = frozenset({"KL Optimal"})


def schedule_sigmas(label: str, n: int, alphas_cumprod: np.ndarray, xl: bool) -> tuple[float, ...]:
    """The sigmas (float32 values: ``n + 1``, the last 0, but for the exceptions the module names) of the web
    UI's schedule ``label`` for ``n`` steps of a model with these training ``alphas_cumprod`` (``xl``: an
    SDXL model, for Align Your Steps' list)."""
    train_sigmas = tables.sigmas_from_alphas_cumprod(alphas_cumprod)
    sigmas = SIGMA_SCHEDULES[label](n, train_sigmas, xl)
    return tuple(float(s) for s in np.asarray(sigmas, np.float32))
