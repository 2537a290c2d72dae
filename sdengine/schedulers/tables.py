"""The noise-schedule tables every scheduler shares, each formula written once.

All arithmetic is float64. diffusers keeps ``betas``, ``alphas_cumprod`` and the sigma tables in float32
tensors, so the quantities it *stores* are rounded to float32 here at the same points (:func:`f32`): both
implementations then start every step from the same table entries, and only the per-step algebra (which
diffusers evaluates in float32 and sdengine in float64) differs.

Notation: ``alphas_cumprod[t]`` is the DDPM alpha-bar_t; the "k-diffusion" sigma of timestep ``t`` is
``sigma_t = sqrt((1 - alpha-bar_t) / alpha-bar_t)``, so that x_t / sqrt(alpha-bar_t) = x_0 + sigma_t eps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..errors import InvalidArgumentError, UnsupportedConfigError

#: ``alphas_cumprod[-1]`` used by Euler and DPM-Solver when ``rescale_betas_zero_snr`` makes it exactly 0
#: (diffusers' choice: keeps ``sigma_max`` finite, about 4096).
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24

TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


def f32(x: np.ndarray | float) -> np.ndarray:
    """``x`` rounded to float32 and held in float64 (a value diffusers stores in a float32 tensor)."""
    return np.asarray(x, dtype=np.float32).astype(np.float64)


def betas_for_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """``squaredcos_cap_v2``: beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta) with the cosine schedule
    abar(t) = cos((t + 0.008) / 1.008 * pi / 2)^2 (Nichol & Dhariwal 2021, eq. 17)."""
    t = np.arange(num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps
    alpha_bar = np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
    return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Betas rescaled so that alpha-bar_{T-1} = 0 (Lin et al. 2023, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", Algorithm 1): shift sqrt(alpha-bar) so its last value is 0, scale it so its
    first value is unchanged, then undo the square root and the cumulative product.

    float64 throughout. diffusers runs it in float32, where ``1 - alpha_t`` and torch's float32 sqrt cost it
    up to a few 1e-5 (relative) in the resulting alphas_cumprod; this is the exact version.
    """
    sqrt_abar = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_abar[0], sqrt_abar[-1]
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: Sequence[float] | None = None,
    rescale_betas_zero_snr: bool = False,
) -> np.ndarray:
    """The training betas (float32 values), as every diffusers scheduler's ``__init__`` builds them."""
    if trained_betas is not None:
        out = np.asarray(trained_betas, dtype=np.float64)
        if out.ndim != 1 or out.size < 2:
            raise UnsupportedConfigError("trained_betas must be a list of at least 2 numbers")
    elif beta_schedule == "linear":
        out = np.linspace(beta_start, beta_end, num_train_timesteps)
    elif beta_schedule == "scaled_linear":
        # Stable Diffusion's schedule: linear in sqrt(beta).
        out = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        out = betas_for_alpha_bar(num_train_timesteps)
    else:
        raise UnsupportedConfigError(
            f"beta_schedule {beta_schedule!r} is not supported "
            "(supported: linear, scaled_linear, squaredcos_cap_v2)"
        )
    out = f32(out)
    if rescale_betas_zero_snr:
        out = f32(rescale_zero_terminal_snr(out))
    return out


def alphas_cumprod(betas: np.ndarray, *, zero_snr_floor: bool = False) -> np.ndarray:
    """alpha-bar_t = prod_{s<=t} (1 - beta_s), from float32 alphas (diffusers: ``cumprod(1.0 - betas)``).

    With ``zero_snr_floor`` an exactly-zero final entry is replaced by :data:`ZERO_SNR_ALPHA_CUMPROD`, as the
    sigma-parameterised schedulers (Euler, Euler ancestral, DPM-Solver) do for zero-terminal-SNR schedules.
    """
    out = f32(np.cumprod(f32(1.0 - betas)))
    if zero_snr_floor and out[-1] == 0.0:
        out[-1] = ZERO_SNR_ALPHA_CUMPROD
    return out


def sigmas_from_alphas_cumprod(abar: np.ndarray) -> np.ndarray:
    """The k-diffusion sigmas sqrt((1 - alpha-bar) / alpha-bar) (float32 values, indexed by timestep)."""
    with np.errstate(divide="ignore"):
        return f32(np.sqrt((1.0 - abar) / abar))


def spaced_timesteps(spacing: str, num_train_timesteps: int, n: int, steps_offset: int = 0) -> np.ndarray:
    """The ``n`` inference timesteps, in descending order, for diffusers' ``timestep_spacing`` (float64).

    Table 2 of Lin et al. 2023 (T = num_train_timesteps):

    * ``leading``: ``arange(n) * (T // n) + steps_offset`` (the only spacing that honours steps_offset);
    * ``linspace``: ``linspace(0, T - 1, n)``, not rounded (integer schedulers round it, Euler keeps it);
    * ``trailing``: ``round(arange(T, 0, -T / n)) - 1``. Float ``arange`` can yield an extra entry (T=1000:
      n = 61, 103, ...) that rounds to timestep -1; diffusers runs it (reading ``alphas_cumprod[-1]``),
      :func:`integer_timesteps` / :func:`check_timesteps` refuse it.
    """
    if spacing == "leading":
        ts = np.arange(0, n) * (num_train_timesteps // n) + steps_offset
    elif spacing == "linspace":
        ts = np.linspace(0, num_train_timesteps - 1, n)
    elif spacing == "trailing":
        ts = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / n)) - 1
        return ts.astype(np.float64)
    else:
        raise UnsupportedConfigError(
            f"timestep_spacing {spacing!r} is not supported (supported: {', '.join(TIMESTEP_SPACINGS)})"
        )
    return ts[::-1].astype(np.float64)


def integer_timesteps(ts: np.ndarray, num_train_timesteps: int) -> np.ndarray:
    """``ts`` rounded to int64 (diffusers' ``.round().astype(np.int64)``), checked to index the tables."""
    out = np.round(ts).astype(np.int64)
    check_timesteps(out, num_train_timesteps)
    return out


def check_timesteps(ts: np.ndarray, num_train_timesteps: int) -> None:
    """InvalidArgumentError unless every timestep indexes the training tables."""
    if ts.size and (ts.min() < 0 or ts.max() > num_train_timesteps - 1):
        raise InvalidArgumentError(
            f"this step count gives timesteps outside [0, {num_train_timesteps - 1}] "
            f"(min {ts.min()}, max {ts.max()}): lower steps or steps_offset"
        )


def interp_sigmas(timesteps: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """Sigmas at (possibly fractional) timesteps: linear interpolation of the training sigmas, float32."""
    return f32(np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas))


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5, with r = 1 / rho:
    sigma_i = (sigma_max^r + i / (n - 1) (sigma_min^r - sigma_max^r))^rho (n = 1 gives just sigma_max)."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """Sigmas evenly spaced in log sigma, from ``sigma_max`` down to ``sigma_min`` (diffusers'
    ``use_exponential_sigmas``; the web UI's "Exponential" scheduler)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def beta_sigmas(
    sigma_min: float, sigma_max: float, n: int, alpha: float = 0.6, beta: float = 0.6
) -> np.ndarray:
    """Sigmas at the quantiles of a Beta(alpha, beta) distribution (Lee et al. 2024, "Beta Sampling is All You
    Need"; diffusers' ``use_beta_sigmas``, the web UI's "Beta" scheduler): ``sigma_min + ppf(1 - i / (n - 1))
    (sigma_max - sigma_min)``, steps crowded at both ends of the range for alpha = beta < 1."""
    quantiles = 1 - np.linspace(0, 1, n)
    return np.array(
        [sigma_min + beta_ppf(float(q), alpha, beta) * (sigma_max - sigma_min) for q in quantiles]
    )


def beta_ppf(q: float, a: float, b: float) -> float:
    """The Beta(a, b) distribution's quantile function (scipy's ``beta.ppf``, which diffusers calls; the
    runtime has no scipy): bisection of :func:`beta_cdf` to the last bit of a float64."""
    lo, hi = 0.0, 1.0
    if q <= 0.0 or q >= 1.0:
        return lo if q <= 0.0 else hi
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if beta_cdf(mid, a, b) < q else (lo, mid)
    return (lo + hi) / 2


def beta_cdf(x: float, a: float, b: float) -> float:
    """The regularised incomplete beta function I_x(a, b), by its continued fraction (Lentz's method), on
    the side of ``x`` where it converges fast."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1) / (a + b + 2):
        return front * _beta_fraction(x, a, b) / a
    return 1.0 - front * _beta_fraction(1.0 - x, b, a) / b


def _beta_fraction(x: float, a: float, b: float) -> float:
    """The continued fraction of I_x(a, b) (Abramowitz and Stegun 26.5.8), evaluated by Lentz's method."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 1000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-16:
            break
    return result


#: The sigma spacings that replace the timesteps' own sigmas, by diffusers' config flag.
SIGMA_SPACINGS = {
    "use_karras_sigmas": "karras",
    "use_exponential_sigmas": "exponential",
    "use_beta_sigmas": "beta",
}


def spaced_sigmas(spacing: str, sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """``n`` sigmas from ``sigma_max`` down to ``sigma_min`` in ``spacing`` ("karras", "exponential" or
    "beta")."""
    if spacing == "karras":
        return karras_sigmas(sigma_min, sigma_max, n)
    if spacing == "beta":
        return beta_sigmas(sigma_min, sigma_max, n)
    return exponential_sigmas(sigma_min, sigma_max, n)


def sigma_to_t(sigmas: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """The fractional timestep of each sigma: linear interpolation of log(sigma) in the training log-sigmas.

    The training log-sigmas are taken in float32, as diffusers computes them (``np.log`` of a float32 array),
    so that the timesteps, which DPM-Solver then rounds, agree to the last bit.
    """
    log_train = np.log(train_sigmas.astype(np.float32))
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_train[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_train.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_train[low_idx], log_train[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(np.shape(sigmas))
