"""What every scheduler shares: the protocol, config resolution, refusals and the training tables."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from ..errors import InvalidArgumentError, UnsupportedConfigError
from . import tables
from .config import SchedulerConfig
from .custom import CustomSteps
from .schedule import Schedule

#: Which schedulers take each kind of custom schedule (test_schedulers checks it against the classes).
CUSTOM_TAKERS = {
    "timesteps": "euler, heun, dpmpp_2m, dpmpp_2m_sde",
    "sigmas": "euler, euler_a, heun, dpm2, lms, dpmpp_2m, dpmpp_2m_sde, unipc",
}
#: The training-schedule defaults that most diffusers scheduler classes share in their ``__init__``.
LINEAR_BETA_DEFAULTS: Mapping[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
}


@runtime_checkable
class Scheduler(Protocol):
    """A scheduler: its config and the tables for a given step count."""

    name: str
    config: SchedulerConfig

    def schedule(
        self,
        num_inference_steps: int,
        strength: float = 1.0,
        *,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
    ) -> Schedule: ...


@dataclass(frozen=True)
class BaseScheduler:
    """Frozen scheduler holding its :class:`SchedulerConfig`; subclasses describe one diffusers class.

    ``defaults`` are the diffusers class's ``__init__`` defaults: the config is resolved against them exactly
    as ``DiffusersClass.from_config(config, **diffusers_overrides)`` would, and validated when the scheduler
    is created. ``diffusers_overrides`` are the constructor arguments a name fixes whatever the config says
    (``dpmpp_2m_karras`` is DPM-Solver with ``use_karras_sigmas=True``); they win over the config, as keyword
    arguments of ``from_config`` do, and come before the constructor's own rewrites (:meth:`_adjust`).
    """

    config: SchedulerConfig
    #: the run's own timesteps or sigmas, in place of those the config spaces out (:mod:`.custom`)
    custom: CustomSteps | None = None
    name: str = field(default="", init=False)
    params: Mapping[str, Any] = field(init=False, repr=False, compare=False)

    diffusers_class: ClassVar[str] = ""
    #: diffusers' ``scheduler.order``: the model calls of one step (2 for Heun's method and DPM2)
    order: ClassVar[int] = 1
    defaults: ClassVar[Mapping[str, Any]] = {}
    diffusers_overrides: ClassVar[Mapping[str, Any]] = {}
    #: the kinds of custom schedule it takes ("timesteps", "sigmas"): the timesteps where the diffusers
    #: class's ``set_timesteps`` does; sigmas where it does (Euler) or where they can take the place of its
    #: Karras sigmas (:attr:`custom_sigmas`)
    takes_custom: ClassVar[tuple[str, ...]] = ()
    #: custom sigmas may end anywhere (diffusers' Euler: the last is the run's end); elsewhere at 0, as
    #: Karras sigmas do
    sigmas_end_anywhere: ClassVar[bool] = False
    #: custom timesteps must be whole numbers (the diffusers class casts them to integers)
    whole_timesteps: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not isinstance(self.config, SchedulerConfig):
            raise TypeError(f"config must be a SchedulerConfig, got {type(self.config).__name__}")
        params = {**self.config.resolve(self.defaults), **self.diffusers_overrides}
        self._adjust(params)
        self._validate(params)
        if self.custom is not None:
            self._validate_custom(self.custom, params)
        object.__setattr__(self, "params", params)

    def _validate_custom(self, custom: CustomSteps, params: Mapping[str, Any]) -> None:
        """Refuse a custom schedule this scheduler does not take: a kind not in :attr:`takes_custom`; sigmas
        that do not end at 0 where they take the place of Karras sigmas (all but Euler's); timesteps with a
        sigma spacing (Karras', exponential or beta sigmas: diffusers refuses them too), outside the training
        timesteps, or not whole where the diffusers class casts them to integers."""
        if custom.kind not in self.takes_custom:
            raise UnsupportedConfigError(
                f"{self.name} takes no custom {custom.kind}; those that do: {CUSTOM_TAKERS[custom.kind]}"
            )
        if custom.kind == "sigmas":
            if not self.sigmas_end_anywhere and custom.values[-1] != 0:
                raise InvalidArgumentError(
                    f"{self.name}: custom sigmas end at 0 (the last is where the run ends), got "
                    f"{custom.values[-1]:g}; only euler ends anywhere"
                )
            if not self.sigmas_end_anywhere and params.get("final_sigmas_type", "zero") != "zero":
                raise UnsupportedConfigError(
                    f"{self.name}: custom sigmas end at 0, not at final_sigmas_type="
                    f"{params['final_sigmas_type']!r}"
                )
            return
        spacing = self.sigma_spacing(params)
        if spacing:
            raise UnsupportedConfigError(
                f"{self.name}: custom timesteps replace its {spacing} sigmas (use_{spacing}_sigmas); use a "
                "scheduler without them"
            )
        last = params["num_train_timesteps"] - 1
        if custom.values[0] > last:
            raise InvalidArgumentError(f"custom timesteps must be <= {last}, got {custom.values[0]:g}")
        if self.whole_timesteps and any(t != int(t) for t in custom.values):
            raise InvalidArgumentError(f"{self.name}: custom timesteps must be whole numbers")

    def _adjust(self, params: dict[str, Any]) -> None:
        """Rewrite resolved parameters the way the diffusers constructor does (hook)."""

    def _validate(self, params: Mapping[str, Any]) -> None:
        """Refuse options this implementation cannot reproduce (subclasses extend)."""
        n_train = params["num_train_timesteps"]
        if not isinstance(n_train, int) or n_train < 2:
            raise UnsupportedConfigError(
                f"{self.name}: num_train_timesteps must be an integer >= 2, got {n_train!r}"
            )
        self.require(params, "prediction_type", ("epsilon", "v_prediction"))
        if "timestep_spacing" in params:
            self.require(params, "timestep_spacing", tables.TIMESTEP_SPACINGS)

    def require(self, params: Mapping[str, Any], key: str, allowed: tuple[Any, ...]) -> None:
        """UnsupportedConfigError unless ``params[key]`` is one of ``allowed``."""
        value = params[key]
        if not any(value == a and type(value) is type(a) for a in allowed):
            shown = ", ".join(repr(a) for a in allowed)
            raise UnsupportedConfigError(
                f"{self.name}: {key}={value!r} is not supported (supported: {shown})"
            )

    @property
    def custom_sigmas(self) -> np.ndarray | None:
        """The custom sigmas but the last (0), where the run has them: they take the place of the sigmas a
        spacing gives (as if diffusers' Karras sigmas were these), and set the timesteps the same way."""
        if self.custom is None or self.custom.kind != "sigmas":
            return None
        return np.array(self.custom.values[:-1])

    def sigma_spacing(self, params: Mapping[str, Any]) -> str:
        """The spacing that replaces the timesteps' own sigmas ("karras", "exponential"; "" for none), from
        the config's flags; UnsupportedConfigError where it sets more than one (as diffusers refuses)."""
        given = [spacing for flag, spacing in tables.SIGMA_SPACINGS.items() if params.get(flag)]
        if len(given) > 1:
            raise UnsupportedConfigError(
                f"{self.name}: use_{given[0]}_sigmas and use_{given[1]}_sigmas: one sigma spacing at a time"
            )
        return given[0] if given else ""

    def refuse_flags(self, params: Mapping[str, Any], *keys: str) -> None:
        """UnsupportedConfigError if any of the boolean options ``keys`` is on."""
        for key in keys:
            if params.get(key):
                raise UnsupportedConfigError(
                    f"{self.name}: {key}=True is not supported (it is not a linear step)"
                )

    def schedule(
        self,
        num_inference_steps: int,
        strength: float = 1.0,
        *,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
    ) -> Schedule:
        """The tables for ``num_inference_steps`` denoising steps, of which image-to-image at ``strength``
        runs the last ``int(num_inference_steps * strength)`` (diffusers' ``StableDiffusionImg2ImgPipeline``).

        A base model and its refiner split one run at a share of the training timesteps (diffusers' SDXL
        pipelines): ``denoising_end`` keeps the calls up to it (the base's part; :func:`calls_before`),
        ``denoising_start`` runs the calls after it instead of ``strength``'s (the refiner's part, from a
        fresh scheduler; :func:`first_call_after`).

        InvalidArgumentError for a bad step count or strength (see :func:`img2img_start`).
        """
        n = check_steps(num_inference_steps, self.params["num_train_timesteps"])
        if self.custom is not None and n != self.custom.steps:
            raise InvalidArgumentError(
                f"the custom {self.custom.kind} give {self.custom.steps} steps, not {n}"
            )
        if denoising_start is None:
            schedule = self._build(n, img2img_start(n, strength))
        else:
            cutoff = switch_timestep(denoising_start, self.params["num_train_timesteps"])
            first = first_call_after(self._build(n, 0).timesteps, cutoff, self.order)
            schedule = self._build(n, first // self.order)
        if denoising_end is not None:
            cutoff = switch_timestep(denoising_end, self.params["num_train_timesteps"])
            schedule = schedule.head(calls_before(schedule.timesteps, cutoff))
        return schedule

    def _build(self, n: int, t_start: int) -> Schedule:
        """The schedule of ``n`` steps from model call ``t_start`` on, the scheduler fresh at that call.

        diffusers slices ``timesteps[t_start * order:]``; ``order`` is 1 for every supported class but Heun
        (2), so ``t_start`` is also a call index (for PNDM, into its ``n + 1`` calls).
        """
        raise NotImplementedError

    def alphas_cumprod(self, *, zero_snr_floor: bool = False) -> np.ndarray:
        """alpha-bar_t of the training schedule this config describes (float32 values in float64)."""
        p = self.params
        betas = tables.betas(
            p["num_train_timesteps"],
            p["beta_start"],
            p["beta_end"],
            p["beta_schedule"],
            p["trained_betas"],
            bool(p.get("rescale_betas_zero_snr")),
        )
        if len(betas) != p["num_train_timesteps"]:
            raise UnsupportedConfigError(
                f"{self.name}: trained_betas has {len(betas)} entries, "
                f"num_train_timesteps is {p['num_train_timesteps']}"
            )
        return tables.alphas_cumprod(betas, zero_snr_floor=zero_snr_floor)


def img2img_start(num_inference_steps: int, strength: float) -> int:
    """diffusers' image-to-image ``t_start`` (``StableDiffusionImg2ImgPipeline.get_timesteps``): the number
    of leading steps that ``strength`` in (0, 1] skips, ``n - min(int(n * strength), n)``.

    InvalidArgumentError for a strength outside (0, 1] (or not a real number), or one that leaves no step.
    """
    if isinstance(strength, (bool, np.bool_)) or not isinstance(strength, numbers.Real):
        raise InvalidArgumentError(f"strength must be a real number in (0, 1], got {strength!r}")
    s = float(strength)
    if not 0.0 < s <= 1.0:
        raise InvalidArgumentError(f"strength must be in (0, 1], got {strength!r}")
    n = num_inference_steps
    denoising = min(int(n * s), n)
    if denoising == 0:
        raise InvalidArgumentError(
            f"strength {s!r} with {n} steps runs no denoising step (int({n} * {s!r}) = 0); "
            "raise strength or steps"
        )
    return n - denoising


def sigma_variant(cls: type[BaseScheduler], family: str, spacing: str) -> type[BaseScheduler]:
    """Scheduler ``{family}_{spacing}``: ``cls`` (scheduler ``family``) with the sigmas of ``spacing``
    ("exponential", "beta") forced on, as diffusers' ``from_config(config, use_{spacing}_sigmas=True)`` with
    the other spacings off. Made, not written out: every such class is its family's with two settings."""
    flags = {flag: kind == spacing for flag, kind in tables.SIGMA_SPACINGS.items()}
    namespace = {
        "__annotations__": {"name": str},
        "__doc__": f"``{family}`` with ``use_{spacing}_sigmas`` forced on.",
        "__module__": cls.__module__,
        "name": field(default=f"{family}_{spacing}", init=False),
        "diffusers_overrides": {**cls.diffusers_overrides, **flags},
    }
    return dataclass(frozen=True)(type(f"{cls.__name__}{spacing.title()}", (cls,), namespace))


def switch_timestep(share: float, num_train_timesteps: int) -> int:
    """The training timestep at which a run of a base model and its refiner changes models, ``share`` of
    the way from the noisiest (diffusers' ``discrete_timestep_cutoff``): ``round(T - share * T)``.
    InvalidArgumentError unless ``share`` is a number in (0, 1)."""
    if isinstance(share, (bool, np.bool_)) or not isinstance(share, numbers.Real) or not 0.0 < share < 1.0:
        raise InvalidArgumentError(f"the refiner's switch must be a number in (0, 1), got {share!r}")
    return int(round(num_train_timesteps - share * num_train_timesteps))


def calls_before(timesteps: np.ndarray, cutoff: int) -> int:
    """How many calls of a run the base model makes: those at timesteps >= ``cutoff`` (diffusers' SDXL
    pipelines' ``denoising_end``). InvalidArgumentError if that is none."""
    calls = int(np.count_nonzero(np.asarray(timesteps) >= cutoff))
    if not calls:
        raise InvalidArgumentError(
            f"the refiner's switch (timestep {cutoff}) comes before the run's first step (timestep "
            f"{float(timesteps[0]):g}): the base model would run no step; switch later"
        )
    return calls


def first_call_after(timesteps: np.ndarray, cutoff: int, order: int) -> int:
    """The call of a full run's ``timesteps`` at which the refiner starts (diffusers' SDXL image to image
    with ``denoising_start``): it makes the calls at timesteps < ``cutoff``, one more for a second-order
    scheduler whose count is even (so that it starts a whole step). InvalidArgumentError if that is none."""
    calls = int(np.count_nonzero(np.asarray(timesteps) < cutoff))
    if order == 2 and calls % 2 == 0:
        calls += 1
    if not calls:
        raise InvalidArgumentError(
            f"the refiner's switch (timestep {cutoff}) comes after the run's last step (timestep "
            f"{float(timesteps[-1]):g}): the refiner would run no step; switch earlier"
        )
    first = len(timesteps) - calls
    if first % order:  # pragma: no cover - diffusers' +1 keeps it whole for the supported schedulers
        raise AssertionError(f"the refiner would start in the middle of a step (call {first})")
    return first


def check_steps(num_inference_steps: int, num_train_timesteps: int) -> int:
    """``num_inference_steps`` as an int in [1, num_train_timesteps], else InvalidArgumentError."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise InvalidArgumentError(f"steps must be an integer, got {num_inference_steps!r}")
    n = int(num_inference_steps)
    if n < 1:
        raise InvalidArgumentError(f"steps must be >= 1, got {n}")
    if n > num_train_timesteps:
        raise InvalidArgumentError(f"steps must be <= num_train_timesteps ({num_train_timesteps}), got {n}")
    return n
