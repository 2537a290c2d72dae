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
from .base import BaseScheduler, Scheduler
from .config import SchedulerConfig
from .ddim import DDIM
from .dpmsolver import DPMSolverMultistep, DPMSolverMultistepKarras
from .euler import Euler
from .euler_ancestral import EulerAncestral
from .lcm import LCM
from .pndm import PNDM
from .schedule import Schedule
from .step import initial_history, step
from .unipc import UniPCMultistep

_CLASSES: dict[str, type[BaseScheduler]] = {
    "ddim": DDIM,
    "pndm": PNDM,
    "euler": Euler,
    "euler_a": EulerAncestral,
    "dpmpp_2m": DPMSolverMultistep,
    "dpmpp_2m_karras": DPMSolverMultistepKarras,
    "lcm": LCM,
    "unipc": UniPCMultistep,
}

SCHEDULER_NAMES: tuple[str, ...] = tuple(_CLASSES)

#: Scheduler name of each supported diffusers class (``_class_name`` of a checkpoint's config).
DIFFUSERS_CLASS_NAMES: dict[str, str] = {
    cls.diffusers_class: name for name, cls in _CLASSES.items() if name != "dpmpp_2m_karras"
}


def load_scheduler(name: str | None, config: Mapping[str, Any] | SchedulerConfig) -> Scheduler:
    """The scheduler ``name`` for a checkpoint whose ``scheduler_config.json`` object is ``config``.

    ``name=None`` picks the checkpoint's own scheduler from ``_class_name`` (a DPMSolverMultistepScheduler
    config with ``use_karras_sigmas`` gives ``dpmpp_2m_karras``). Another name converts the config the way
    diffusers' ``TargetScheduler.from_config(config)`` does: keys the target class accepts are carried over,
    the others take that class's defaults. ``dpmpp_2m_karras`` is ``DPMSolverMultistepScheduler.from_config(
    config, use_karras_sigmas=True)``.

    Raises UnknownSchedulerError for an unknown name or checkpoint class, UnsupportedConfigError for options
    that are not implemented.
    """
    cfg = config if isinstance(config, SchedulerConfig) else SchedulerConfig.from_dict(config)
    valid = ", ".join(SCHEDULER_NAMES)
    if name is None:
        class_name = cfg.class_name
        if class_name not in DIFFUSERS_CLASS_NAMES:
            raise UnknownSchedulerError(
                f"checkpoint scheduler class {class_name!r} is not supported; choose a scheduler: {valid}"
            )
        name = DIFFUSERS_CLASS_NAMES[class_name]
        if name == "dpmpp_2m" and cfg.use_karras_sigmas:
            name = "dpmpp_2m_karras"
    if not isinstance(name, str) or name not in _CLASSES:
        raise UnknownSchedulerError(f"unknown scheduler {name!r}; valid names: {valid}")
    class_name, overrides = diffusers_scheduler_class(name)
    return _CLASSES[name](cfg.with_values(class_name=class_name, **overrides))


def diffusers_scheduler_class(name: str) -> tuple[str, dict[str, Any]]:
    """``(class_name, overrides)`` such that scheduler ``name`` built from a config is the counterpart of
    ``getattr(diffusers, class_name).from_config(config, **overrides)``."""
    if name not in _CLASSES:
        raise UnknownSchedulerError(f"unknown scheduler {name!r}; valid names: {', '.join(SCHEDULER_NAMES)}")
    overrides = {"use_karras_sigmas": True} if _CLASSES[name] is DPMSolverMultistepKarras else {}
    return _CLASSES[name].diffusers_class, overrides


__all__ = [
    "DIFFUSERS_CLASS_NAMES",
    "SCHEDULER_NAMES",
    "Schedule",
    "Scheduler",
    "SchedulerConfig",
    "diffusers_scheduler_class",
    "initial_history",
    "load_scheduler",
    "step",
]
