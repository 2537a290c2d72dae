"""numpy-only diffusion schedulers as data plus one pure step function.

Every supported scheduler update is linear in (sample, model_output, noise, history buffers), so a
:class:`Schedule` is a table of per-step coefficient matrices computed once on the host (float64, stored
float32) and :func:`step` applies one row of it. The same table drives the numpy loop and a fused device
kernel. Each scheduler matches the diffusers 0.42 class of the same algorithm step by step::

    sched = load_scheduler("euler_a", json.load(open("scheduler/scheduler_config.json")))
    plan = sched.schedule(25)
    x = plan.init_noise_sigma * rng.standard_normal(shape, dtype=np.float32)
    history = initial_history(plan, shape)
    for i, t in enumerate(plan.timesteps):
        eps = unet(plan.input_scale[i] * x, t)  # classifier-free guidance already combined
        noise = rng.standard_normal(shape, dtype=np.float32) if plan.needs_noise[i] else None
        x, history = step(plan.coeffs[i], x, eps, noise, history)

Image-to-image (diffusers' ``StableDiffusionImg2ImgPipeline``): ``schedule(25, strength=0.6)`` leaves out
the first ``plan.t_start`` = 25 - int(25 * 0.6) steps and restarts multistep state at the first step kept;
the loop above then starts from ``x = a * image_latents + b * noise`` with ``(a, b) = plan.image_noise``
(the scheduler's ``add_noise``) instead of ``init_noise_sigma * noise``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import UnknownSchedulerError
from . import tables
from .base import BaseScheduler, Scheduler, sigma_variant
from .config import SchedulerConfig
from .custom import CustomSteps, custom_steps
from .ddim import DDIM
from .dpmsolver import (
    DPMSolverMultistep,
    DPMSolverMultistepKarras,
    DPMSolverMultistepSDE,
    DPMSolverMultistepSDEKarras,
)
from .euler import Euler, EulerKarras
from .euler_ancestral import EulerAncestral
from .heun import Heun, HeunKarras
from .kdpm2 import KDPM2, KDPM2Karras
from .lcm import LCM
from .lms import LMS, LMSKarras
from .pndm import PNDM
from .schedule import Schedule
from .step import initial_history, step
from .unipc import UniPCMultistep, UniPCMultistepKarras

_CLASSES: dict[str, type[BaseScheduler]] = {
    "ddim": DDIM,
    "pndm": PNDM,
    "euler": Euler,
    "euler_karras": EulerKarras,
    "euler_a": EulerAncestral,
    "heun": Heun,
    "heun_karras": HeunKarras,
    "dpm2": KDPM2,
    "dpm2_karras": KDPM2Karras,
    "lms": LMS,
    "lms_karras": LMSKarras,
    "dpmpp_2m": DPMSolverMultistep,
    "dpmpp_2m_karras": DPMSolverMultistepKarras,
    "dpmpp_2m_sde": DPMSolverMultistepSDE,
    "dpmpp_2m_sde_karras": DPMSolverMultistepSDEKarras,
    "lcm": LCM,
    "unipc": UniPCMultistep,
    "unipc_karras": UniPCMultistepKarras,
}
#: The families that take diffusers' other sigma spacings: each gets ``{family}_exponential`` and
#: ``{family}_beta`` (see :func:`sigma_variant`).
_SPACED: dict[str, type[BaseScheduler]] = {
    "euler": Euler,
    "heun": Heun,
    "dpm2": KDPM2,
    "lms": LMS,
    "dpmpp_2m": DPMSolverMultistep,
    "dpmpp_2m_sde": DPMSolverMultistepSDE,
    "unipc": UniPCMultistep,
}
_CLASSES |= {
    f"{family}_{spacing}": sigma_variant(cls, family, spacing)
    for spacing in ("exponential", "beta")
    for family, cls in _SPACED.items()
}

SCHEDULER_NAMES: tuple[str, ...] = tuple(_CLASSES)

#: Scheduler name of each supported diffusers class (``_class_name`` of a checkpoint's config): the name that
#: stands for the class as its config configures it (a few names also fix some of its options, see
#: :func:`load_scheduler`).
DIFFUSERS_CLASS_NAMES: dict[str, str] = {
    cls.diffusers_class: name for name, cls in _CLASSES.items() if not cls.diffusers_overrides
}


def _checkpoint_scheduler(cfg: SchedulerConfig) -> str:
    """The name for a checkpoint's own scheduler: its class's, or the name fixing the options its config
    sets (the one fixing the most of them), e.g. ``dpmpp_2m_sde_karras`` for a DPMSolverMultistepScheduler
    config with ``algorithm_type="sde-dpmsolver++"`` and ``use_karras_sigmas``."""
    class_name = cfg.class_name
    if class_name not in DIFFUSERS_CLASS_NAMES:
        raise UnknownSchedulerError(
            f"checkpoint scheduler class {class_name!r} is not supported; "
            f"choose a scheduler: {', '.join(SCHEDULER_NAMES)}"
        )
    name = DIFFUSERS_CLASS_NAMES[class_name]
    params = cfg.resolve(_CLASSES[name].defaults)  # what diffusers' own from_config(config) gets
    matches = [
        (len(cls.diffusers_overrides), other)
        for other, cls in _CLASSES.items()
        if cls.diffusers_class == class_name
        and all(params[k] == v and type(params[k]) is type(v) for k, v in cls.diffusers_overrides.items())
    ]
    return max(matches)[1]


def load_scheduler(
    name: str | None, config: Mapping[str, Any] | SchedulerConfig, custom: CustomSteps | None = None
) -> Scheduler:
    """The scheduler ``name`` for a checkpoint whose ``scheduler_config.json`` object is ``config``.

    ``name=None`` picks the checkpoint's own scheduler from ``_class_name`` (a DPMSolverMultistepScheduler
    config with ``use_karras_sigmas`` gives ``dpmpp_2m_karras``, with ``algorithm_type="sde-dpmsolver++"``
    ``dpmpp_2m_sde``, with both ``dpmpp_2m_sde_karras``). Another name converts the config the way
    diffusers' ``TargetScheduler.from_config(config)`` does: keys the target class accepts are carried over,
    the others take that class's defaults. ``dpmpp_2m_karras`` is ``DPMSolverMultistepScheduler.from_config(
    config, use_karras_sigmas=True)``, ``dpmpp_2m_sde`` the same with ``algorithm_type="sde-dpmsolver++"``
    (see :func:`diffusers_scheduler_class`); ``dpmpp_2m`` refuses an SDE config.

    ``custom``: the run's own timesteps or sigmas (diffusers' ``set_timesteps(timesteps=...)`` or
    ``(sigmas=...)``; :mod:`.custom`), for the schedulers whose diffusers class takes them.

    Raises UnknownSchedulerError for an unknown name or checkpoint class, UnsupportedConfigError for options
    (or a custom schedule) that are not implemented.
    """
    cfg = config if isinstance(config, SchedulerConfig) else SchedulerConfig.from_dict(config)
    if name is None:
        name = _checkpoint_scheduler(cfg)
    if not isinstance(name, str) or name not in _CLASSES:
        raise UnknownSchedulerError(f"unknown scheduler {name!r}; valid names: {', '.join(SCHEDULER_NAMES)}")
    class_name, overrides = diffusers_scheduler_class(name)
    return _CLASSES[name](cfg.with_values(class_name=class_name, **overrides), custom)


def custom_kinds(name: str) -> tuple[str, ...]:
    """The kinds of custom schedule (:mod:`.custom`: "timesteps", "sigmas") scheduler ``name`` takes (its
    sigma-spaced variants refuse timesteps, as diffusers does)."""
    if name not in _CLASSES:
        raise UnknownSchedulerError(f"unknown scheduler {name!r}; valid names: {', '.join(SCHEDULER_NAMES)}")
    cls = _CLASSES[name]
    spaced = any(cls.diffusers_overrides.get(flag) for flag in tables.SIGMA_SPACINGS)
    return tuple(kind for kind in cls.takes_custom if not (spaced and kind == "timesteps"))


def custom_sigmas_end_anywhere(name: str) -> bool:
    """Whether scheduler ``name``'s custom sigmas may end above 0 (Euler's, as diffusers' class takes them);
    the others' end at 0."""
    if name not in _CLASSES:
        raise UnknownSchedulerError(f"unknown scheduler {name!r}; valid names: {', '.join(SCHEDULER_NAMES)}")
    return _CLASSES[name].sigmas_end_anywhere


def diffusers_scheduler_class(name: str) -> tuple[str, dict[str, Any]]:
    """``(class_name, overrides)`` such that scheduler ``name`` built from a config is the counterpart of
    ``getattr(diffusers, class_name).from_config(config, **overrides)``."""
    if name not in _CLASSES:
        raise UnknownSchedulerError(f"unknown scheduler {name!r}; valid names: {', '.join(SCHEDULER_NAMES)}")
    cls = _CLASSES[name]
    return cls.diffusers_class, dict(cls.diffusers_overrides)


__all__ = [
    "CustomSteps",
    "DIFFUSERS_CLASS_NAMES",
    "SCHEDULER_NAMES",
    "Schedule",
    "Scheduler",
    "SchedulerConfig",
    "custom_kinds",
    "custom_sigmas_end_anywhere",
    "custom_steps",
    "diffusers_scheduler_class",
    "initial_history",
    "load_scheduler",
    "step",
]
