"""Making an image again from its PNG: the settings an image of sdengine's records
(:func:`sdengine.images.read_png_parameters`) as ``sdengine generate``'s options, so that ``generate --from
IMAGE`` runs the same request (an option given on the command line changes that setting alone), and the new
image held against the old one.

A record names its input files but does not hold them (an input image, a mask, a ControlNet's image, an image
prompt, LoRAs, embeddings, supplied latents): the run needs them given again, and says which in one line.
Every image of a batch records its own seed (and variation seed), so each is made again by a batch of one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdengine.errors import InvalidArgumentError

#: Record keys that are generate's option of the same name (its ``dest``), value as it is.
AS_THEY_ARE = (
    "steps",
    "guidance",
    "scheduler",
    "seed",
    "height",
    "width",
    "variation_seed",
    "variation_strength",
    "strength",
    "masked_content",
    "decoder",
    "mask_crop",
    "noise_source",
    "clip_skip",
    "guidance_rescale",
    "pag_scale",
    "pag_adaptive_scale",
    "deepcache_interval",
    "long_prompts",
    "prompt_weights",
    "hires_scale",
    "hires_steps",
    "hires_strength",
    "hires_upscale",
    "refiner",
    "refiner_switch",
    "ip_adapter_scale",
)
#: Record keys holding a list that the option takes as numbers separated by commas.
COMMA_LISTS = ("freeu", "apg", "timesteps", "sigmas", "hires_timesteps", "hires_sigmas")
#: Record keys holding a list that the option takes once per item (``action="append"``).
APPENDED = ("control_scale", "control_start", "control_end", "control_mode")
#: Record keys naming an input the record does not hold, with the value that means "none", and the option
#: that gives it again.
INPUTS = {
    "latents": ("from seed", "--latents"),
    "image": (None, "--image"),
    "mask": (None, "--mask"),
    "control": (None, "--control-image"),
    "ip_adapter_image": (None, "--ip-adapter-image"),
    "loras": (None, "--lora"),
    "embeddings": (None, "--embedding"),
    "lora_hashes": (None, "--lora-dir"),
}
#: Record keys that describe the run without being a setting of it: the backend (any may make the image
#: again), a property of the model (seamless exports), what follows from other settings, and the web UI's
#: labels of a served run.
NOT_SETTINGS = (
    "backend",
    "seamless",
    "image_of_batch",
    "safety_checker",
    "mask_crop_box",
    "hires_size",
    "control_images",
    "schedule_type",
)


@dataclass(frozen=True)
class Replay:
    """A PNG's record read for ``generate``: its options' values (``defaults``, to set on the parser before
    the command line is read, so that an option given wins), the appended options' values (``appended``:
    used where the command line gives none, as appending to them would mix both), and the options that must
    give the record's inputs again (``needs``: option -> what the record says of it)."""

    source: Path
    record: dict[str, Any]
    defaults: dict[str, Any] = field(default_factory=dict)
    appended: dict[str, list[Any]] = field(default_factory=dict)
    needs: dict[str, Any] = field(default_factory=dict)

    def fill(self, args: Any) -> None:
        """Complete parsed ``args``: the record's appended options where none were given; then refuse, in one
        line, a run missing an input the record names."""
        for dest, values in self.appended.items():
            if not getattr(args, dest):
                setattr(args, dest, list(values))
        missing = [
            f"{option} ({_describe(said)})"
            for option, said in self.needs.items()
            if getattr(args, option.removeprefix("--").replace("-", "_")) in (None, [], "")
        ]
        if missing:
            raise InvalidArgumentError(
                f"{self.source} was made with inputs its record names but does not hold; give them again: "
                + ", ".join(missing)
            )


def _describe(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(_describe(item) for item in value)
    if isinstance(value, dict):
        return ":".join(str(v) for v in value.values())
    return str(value)


def _one(record: Mapping[str, Any], key: str, source: Path) -> str | None:
    value = record.get(key)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    raise InvalidArgumentError(f"{source}: its record's {key} is not one text: {value!r}")


def replay(path: str | Path) -> Replay:
    """The record of the PNG at ``path`` as generate's options. InvalidArgumentError for a file that is not a
    readable PNG of sdengine's, or whose record holds settings generate does not take."""
    from sdengine.extra_networks import lora_tags
    from sdengine.images import read_png_parameters
    from sdengine.xl_conditioning import SizeConditioning

    source = Path(path)
    try:
        record = read_png_parameters(source)
    except (OSError, ValueError, AttributeError) as exc:  # (AttributeError: an image that is not a PNG)
        raise InvalidArgumentError(f"cannot read a record from {source}: {exc}") from None
    if not isinstance(record, dict) or "prompt" not in record or "steps" not in record:
        raise InvalidArgumentError(f"{source} holds no record of sdengine's settings")
    known = {
        "prompt",
        "negative_prompt",
        "model",
        "size_conditioning",
        *AS_THEY_ARE,
        *COMMA_LISTS,
        *APPENDED,
        *INPUTS,
        *NOT_SETTINGS,
    }
    unknown = sorted(set(record) - known)
    if unknown:
        raise InvalidArgumentError(f"{source} records settings generate does not take: {', '.join(unknown)}")
    defaults: dict[str, Any] = {key: record[key] for key in AS_THEY_ARE if key in record}
    defaults["prompt"] = _one(record, "prompt", source)
    defaults["negative_prompt"] = _one(record, "negative_prompt", source)
    if "model" in record:
        defaults["model_dir"] = record["model"]
    for key in COMMA_LISTS:
        if key in record:
            defaults[key] = ",".join(repr(float(v)) for v in record[key])
    if "timesteps" in record or "sigmas" in record:
        del defaults["steps"]  # the custom schedule's count sets them
    if "hires_timesteps" in record or "hires_sigmas" in record:
        defaults.pop("hires_steps", None)
    for name, value in (record.get("size_conditioning") or {}).items():
        if name not in SizeConditioning.__dataclass_fields__:
            raise InvalidArgumentError(f"{source} records a size conditioning generate does not take: {name}")
        defaults[name] = tuple(value)
    appended = {key: list(record[key]) for key in APPENDED if key in record}
    needs = {
        option: record[key] for key, (none, option) in INPUTS.items() if key in record and record[key] != none
    }
    if "lora_hashes" in record and "--lora" in needs:  # the tags' LoRAs come after --lora's: --lora-dir's
        given = needs["--lora"][: len(needs["--lora"]) - len(lora_tags(defaults["prompt"] or "")[1])]
        needs["--lora"] = given
        if not given:
            del needs["--lora"]
    return Replay(source, record, defaults, appended, needs)


def changed_settings(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The settings two records differ in, as ``key: old -> new`` (``-`` for absent), the descriptive keys
    (:data:`NOT_SETTINGS`) but the backend and seamless left out."""
    skip = set(NOT_SETTINGS) - {"backend", "seamless"}
    keys = sorted((set(old) | set(new)) - skip)
    return [f"{k}: {old.get(k, '-')} -> {new.get(k, '-')}" for k in keys if old.get(k) != new.get(k)]


def comparison(replayed: Replay, record: Mapping[str, Any], image: np.ndarray) -> str:
    """One line holding the new image (float32 H x W x 3 in [0, 1]) against the PNG it was made from: the
    PSNR of the two (as the PNG stores it, in 8 bits), and the settings changed, if any."""
    from sdengine.images import load_image, psnr

    before = np.asarray(load_image(replayed.source), np.float32) / 255
    changed = changed_settings(replayed.record, record)
    settings = f"settings changed: {'; '.join(changed)}" if changed else "the same settings"
    if before.shape != image.shape:
        return f"against {replayed.source}: {settings}; sizes differ, no comparison"
    stored = np.round(image * 255) / 255  # as the new PNG holds it
    value = psnr(before, stored)
    said = "identical" if value == float("inf") else f"PSNR {value:.1f} dB"
    return f"against {replayed.source} ({settings}): {said}"


def check_outputs(replayed: Replay, outputs: Sequence[Path]) -> None:
    """Refuse, before anything runs, outputs that would write over the PNG being made again."""
    if any(Path(out).resolve() == replayed.source.resolve() for out in outputs):
        raise InvalidArgumentError(
            f"--output would write over {replayed.source}, the image being made again: give another path"
        )
