"""Typed, frozen view of a diffusers ``scheduler_config.json``.

A checkpoint's scheduler config is a flat JSON object whose keys are the ``__init__`` arguments of a diffusers
scheduler class (plus bookkeeping keys such as ``_class_name``). Defaults differ from class to class
(``timestep_spacing`` is ``"leading"`` for DDIM but ``"linspace"`` for Euler, ``set_alpha_to_one`` is ``True``
for DDIM but ``False`` for PNDM, ...), so a typed field holds ``None`` when the key is absent and the class
default is only chosen when a scheduler resolves its parameters (:meth:`SchedulerConfig.resolve`), exactly the
way diffusers' ``ConfigMixin.extract_init_dict`` does for ``OtherScheduler.from_config(config)``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from ..errors import UnsupportedConfigError

#: JSON key of the diffusers class name, stored in :attr:`SchedulerConfig.class_name`.
CLASS_NAME_KEY = "_class_name"
#: diffusers bookkeeping key: keys listed there were defaults of the class that wrote the config and are
#: dropped before a (possibly different) class reads it.
USE_DEFAULT_VALUES_KEY = "_use_default_values"

# Kind of every typed field, used to validate and normalise values read from JSON.
_KINDS: dict[str, str] = {
    "class_name": "str",
    "num_train_timesteps": "int",
    "beta_start": "float",
    "beta_end": "float",
    "beta_schedule": "str",
    "trained_betas": "floats",
    "prediction_type": "str",
    "timestep_spacing": "str",
    "steps_offset": "int",
    "set_alpha_to_one": "bool",
    "clip_sample": "bool",
    "clip_sample_range": "float",
    "thresholding": "bool",
    "rescale_betas_zero_snr": "bool",
    "skip_prk_steps": "bool",
    "interpolation_type": "str",
    "use_karras_sigmas": "bool",
    "sigma_min": "float",
    "sigma_max": "float",
    "timestep_type": "str",
    "final_sigmas_type": "str",
    "solver_order": "int",
    "algorithm_type": "str",
    "solver_type": "str",
    "lower_order_final": "bool",
    "euler_at_final": "bool",
    "lambda_min_clipped": "float",
    "original_inference_steps": "int",
    "timestep_scaling": "float",
    "predict_x0": "bool",
    "disable_corrector": "ints",
}


def _json_key(name: str) -> str:
    return CLASS_NAME_KEY if name == "class_name" else name


def _field_name(key: str) -> str:
    return "class_name" if key == CLASS_NAME_KEY else key


def _same_kind(value: Any, default: Any) -> bool:
    """Whether ``value`` has the kind of ``default`` (bool, number or string; anything goes for None)."""
    if default is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def _check_value(key: str, kind: str, value: Any) -> Any:
    """``value`` normalised to ``kind``, or UnsupportedConfigError naming ``key``."""
    ok = False
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind == "str":
        ok = isinstance(value, str)
    elif kind == "floats":
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        )
        value = tuple(float(v) for v in value) if ok else value
    elif kind == "ints":
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        )
        value = tuple(value) if ok else value
    if not ok:
        raise UnsupportedConfigError(f"scheduler config key {key!r} has an invalid value {value!r}")
    return value


@dataclass(frozen=True)
class SchedulerConfig:
    """A diffusers scheduler config. Typed fields are ``None`` when the key is absent from the JSON.

    ``null_keys`` records typed keys that the JSON spelled out as ``null`` (``"trained_betas": null``), and
    ``extra`` keeps every key without a typed field (``_diffusers_version``, options sdengine never reads...),
    so that :meth:`to_dict` gives back the JSON object :meth:`from_dict` read.
    """

    class_name: str | None = None
    num_train_timesteps: int | None = None
    beta_start: float | None = None
    beta_end: float | None = None
    beta_schedule: str | None = None
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str | None = None
    timestep_spacing: str | None = None
    steps_offset: int | None = None
    set_alpha_to_one: bool | None = None
    clip_sample: bool | None = None
    clip_sample_range: float | None = None
    thresholding: bool | None = None
    rescale_betas_zero_snr: bool | None = None
    skip_prk_steps: bool | None = None
    interpolation_type: str | None = None
    use_karras_sigmas: bool | None = None
    sigma_min: float | None = None
    sigma_max: float | None = None
    timestep_type: str | None = None
    final_sigmas_type: str | None = None
    solver_order: int | None = None
    algorithm_type: str | None = None
    solver_type: str | None = None
    lower_order_final: bool | None = None
    euler_at_final: bool | None = None
    lambda_min_clipped: float | None = None
    original_inference_steps: int | None = None
    timestep_scaling: float | None = None
    predict_x0: bool | None = None
    disable_corrector: tuple[int, ...] | None = None
    null_keys: frozenset[str] = frozenset()
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, kind in _KINDS.items():
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _check_value(_json_key(name), kind, value))
        unknown = set(self.null_keys) - {_json_key(n) for n in _KINDS}
        if unknown:
            raise UnsupportedConfigError(f"null_keys must name typed config keys, got {sorted(unknown)}")
        set_and_null = [k for k in self.null_keys if getattr(self, _field_name(k)) is not None]
        if set_and_null:
            raise UnsupportedConfigError(f"config keys {sorted(set_and_null)} are both set and null")
        typed = [k for k in self.extra if _field_name(k) in _KINDS]
        if typed:
            raise UnsupportedConfigError(f"config keys {sorted(typed)} belong in typed fields, not in extra")
        object.__setattr__(self, "null_keys", frozenset(self.null_keys))
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))

    def __repr__(self) -> str:
        return f"SchedulerConfig.from_dict({self.to_dict()!r})"

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True, default=repr))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SchedulerConfig:
        """Read a ``scheduler_config.json`` object (or a diffusers ``scheduler.config``)."""
        if not isinstance(d, Mapping):
            raise UnsupportedConfigError(f"a scheduler config must be a JSON object, got {type(d).__name__}")
        typed: dict[str, Any] = {}
        null_keys: set[str] = set()
        extra: dict[str, Any] = {}
        for key, value in d.items():
            if not isinstance(key, str):
                raise UnsupportedConfigError(f"scheduler config keys must be strings, got {key!r}")
            name = _field_name(key)
            if name not in _KINDS:
                extra[key] = value
            elif value is None:
                null_keys.add(key)
            else:
                typed[name] = value
        return cls(**typed, null_keys=frozenset(null_keys), extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: every key :meth:`from_dict` read, with the values it read."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in _KINDS:
                key = _json_key(f.name)
                value = getattr(self, f.name)
                if value is not None:
                    out[key] = list(value) if isinstance(value, tuple) else value
                elif key in self.null_keys:
                    out[key] = None
        out.update(self.extra)
        return out

    def has(self, key: str) -> bool:
        """Whether the JSON has ``key`` (possibly as ``null``)."""
        return key in self.null_keys or key in self.extra or self.get(key) is not None

    def get(self, key: str, default: Any = None) -> Any:
        """The value of JSON key ``key`` (``default`` when absent; ``None`` when it is ``null``)."""
        name = _field_name(key)
        if name in _KINDS:
            value = getattr(self, name)
            if value is not None:
                return value
            return None if key in self.null_keys else default
        return self.extra.get(key, default)

    def with_values(self, **values: Any) -> SchedulerConfig:
        """A copy with the given JSON keys set (``class_name`` sets ``_class_name``)."""
        d = self.to_dict()
        for name, value in values.items():
            d[_json_key(name)] = value
        return SchedulerConfig.from_dict(d)

    def resolve(self, defaults: Mapping[str, Any]) -> dict[str, Any]:
        """The ``__init__`` arguments a diffusers class with these ``defaults`` gets from this config.

        Mirrors ``ConfigMixin.extract_init_dict``: keys the class accepts are taken from the config, except
        those listed in ``_use_default_values``; every other key keeps the class default. An explicit ``null``
        is passed through when the default is ``None`` or a flag (where diffusers reads it as false) and
        refused otherwise, since diffusers would fail on it later.
        """
        used_defaults = self.extra.get(USE_DEFAULT_VALUES_KEY) or ()
        out = dict(defaults)
        for key, default in defaults.items():
            if key in used_defaults or not self.has(key):
                continue
            value = self.get(key)
            if value is None and default is not None and not isinstance(default, bool):
                raise UnsupportedConfigError(f"scheduler config key {key!r} is null")
            if value is not None and _field_name(key) not in _KINDS and not _same_kind(value, default):
                # An untyped key (an option sdengine only checks): its value must match the default's kind.
                raise UnsupportedConfigError(f"scheduler config key {key!r} has an invalid value {value!r}")
            out[key] = value
        return out
