"""The AUTOMATIC1111 web UI's names for sdengine's schedulers: its sampler names (``"DPM++ 2M"``) and its
noise schedules (``"Karras"``), both ways, for the HTTP API and for infotexts. The schedules that are lists
of sigmas of their own ("Align Your Steps"...) are :mod:`sdengine.webui_schedules`'."""

from __future__ import annotations

from sdengine.errors import InvalidArgumentError
from sdengine.schedulers import SCHEDULER_NAMES, custom_kinds, custom_sigmas_end_anywhere
from sdengine.webui_schedules import ENDS_ABOVE_ZERO, SIGMA_SCHEDULES

#: The web UI's sampler names that sdengine runs, and the scheduler each is.
SAMPLERS = {
    "Euler": "euler",
    "Euler Karras": "euler_karras",
    "Euler a": "euler_a",
    "LMS": "lms",
    "LMS Karras": "lms_karras",
    "Heun": "heun",
    "Heun Karras": "heun_karras",
    "DPM2": "dpm2",
    "DPM2 Karras": "dpm2_karras",
    "DPM++ 2M": "dpmpp_2m",
    "DPM++ 2M Karras": "dpmpp_2m_karras",
    "DPM++ 2M SDE": "dpmpp_2m_sde",
    "DPM++ 2M SDE Karras": "dpmpp_2m_sde_karras",
    "DDIM": "ddim",
    "PLMS": "pndm",
    "UniPC": "unipc",
    "UniPC Karras": "unipc_karras",
    "LCM": "lcm",
}
#: The web UI's noise schedules that sdengine runs (its ``scheduler`` field takes the label or the name).
SCHEDULES = {
    "automatic": "Automatic",
    "karras": "Karras",
    "exponential": "Exponential",
    "beta": "Beta",
    # run as custom sigmas of the sampler's scheduler (sdengine.webui_schedules)
    "align_your_steps": "Align Your Steps",
    "sgm_uniform": "SGM Uniform",
    "uniform": "Uniform",
    "normal": "Normal",
    "simple": "Simple",
    "polyexponential": "Polyexponential",
    "ddim": "DDIM",
    "kl_optimal": "KL Optimal",
}
#: The schedules that are a scheduler of their own for each sampler: its name's suffix.
SPACED = {"Exponential": "_exponential", "Beta": "_beta"}


def scheduler_name(sampler: str | None, scheduler: str | None) -> str:
    """sdengine's scheduler for the web UI's ``sampler_name`` and ``scheduler`` (its 1.9+ split of the
    noise schedule from the sampler: "Automatic" keeps the sampler's own, "Karras" picks its Karras one,
    "Exponential" its one with sigmas evenly spaced in log sigma, "Beta" its one with beta-quantile
    sigmas). The schedules of :data:`sdengine.webui_schedules.SIGMA_SCHEDULES` keep the sampler's own
    scheduler, which runs their sigmas as custom ones (the caller computes them), where it takes them."""
    sampler = sampler or "Euler"
    scheduler = SCHEDULES.get(scheduler, scheduler) if isinstance(scheduler, str) else scheduler
    if scheduler == "Karras" and not sampler.endswith(" Karras"):
        sampler += " Karras"
    elif scheduler not in (None, "", *SCHEDULES.values()):
        raise InvalidArgumentError(
            f"scheduler {scheduler!r} is not supported; use {', '.join(SCHEDULES.values())}"
        )
    if sampler not in SAMPLERS:
        raise InvalidArgumentError(f"sampler {sampler!r} is not supported; supported: {', '.join(SAMPLERS)}")
    if scheduler in SIGMA_SCHEDULES:  # its sigmas are the request's (webui_schedules); the sampler runs them
        if sampler.endswith(" Karras") or "sigmas" not in custom_kinds(SAMPLERS[sampler]):
            raise InvalidArgumentError(f"sampler {sampler!r} has no {scheduler} scheduler")
        if scheduler in ENDS_ABOVE_ZERO and not custom_sigmas_end_anywhere(SAMPLERS[sampler]):
            raise InvalidArgumentError(
                f"sampler {sampler!r} has no {scheduler} scheduler: its sigmas end above 0, where only "
                "Euler's run can end"
            )
        return SAMPLERS[sampler]
    if scheduler not in SPACED:
        return SAMPLERS[sampler]
    name = SAMPLERS[sampler.removesuffix(" Karras")] + SPACED[scheduler]
    if sampler.endswith(" Karras") or name not in SCHEDULER_NAMES:
        raise InvalidArgumentError(f"sampler {sampler!r} has no {scheduler} scheduler")
    return name


def sampler_of(scheduler: str) -> tuple[str, str]:
    """The web UI's (sampler_name, scheduler) for sdengine's scheduler name."""
    for label, suffix in SPACED.items():
        if scheduler.endswith(suffix):
            return sampler_of(scheduler.removesuffix(suffix))[0], label
    sampler = next(k for k, v in SAMPLERS.items() if v == scheduler)
    return sampler, "Karras" if sampler.endswith(" Karras") else "Automatic"
