"""The web UI ControlNet extension's API (sd-webui-controlnet), read for a served export with ControlNets.

Its clients send ControlNet units in ``alwayson_scripts``::

    "alwayson_scripts": {"controlnet": {"args": [{"image": "<base64>", "model": "canny", "weight": 0.8,
                                                  "guidance_start": 0, "guidance_end": 0.6}]}}

and ask ``GET /controlnet/model_list`` which models there are. Here the ControlNets are the ones traced into
the served export's UNet (``sdengine export --controlnet``), named after their directories (or the files
they were converted from); a unit's ``model`` names one of them (a `` [hash]`` the web UI appends is
ignored), and its ``image``, ``weight``, ``guidance_start``, ``guidance_end`` and ``resize_mode`` ("Just
Resize", "Crop and Resize", the extension's default, or "Resize and Fill"; or 0-2) become that ControlNet's
control image, scale, start and end (:mod:`sdengine.controlnet`); an image of another size is brought to
the generation's as the extension brings it (:mod:`sdengine.webui_detectmap`, which says what differs). A
ControlNet no enabled unit names runs at weight 0 (its residuals scaled to nothing: the plain UNet's
result), so such an export answers requests without ControlNet too. In img2img, a unit without an image
takes the first init image, as the extension does.

A unit's ``control_mode`` ("Balanced", "My prompt is more important", "ControlNet is more important", or
0-2) weighs its ControlNet's residuals as the extension does (``sdengine.controlnet.control_mode_weights``).
A unit's ``module`` may be ``none`` (the image is the control image), ``canny`` or ``invert``
(:mod:`sdengine.webui_preprocessors`, the extension's model-free preprocessors, with its ``processor_res``,
``threshold_a`` and ``threshold_b`` bound to their sliders' ranges and ``pixel_perfect`` as the extension
sets the resolution). With an inpainting of the mask's box alone (``inpaint_full_res``), each unit's image
is cut to that box first, as the extension cuts it (:func:`only_masked`). What the extension does and this
does not is refused, naming it: the preprocessors that run a model (depth, pose, line art...: send their
map with module none), a unit's own mask, units naming a model not served, and two units naming one
ControlNet. ``low_vram`` changes nothing here and is ignored.

Each enabled unit is recorded in the images' infotexts as the extension records it (:func:`_record`):
``ControlNet 0: "Module: none, Model: NAME [HASH], Weight: 1.0, Resize Mode: Crop and Resize, ..."``,
numbered among the enabled units, its eleven fields in the extension's order and formatting (its
``ControlNetUnit.infotext_fields`` and ``serialize``), so the web UI's PNG Info reads them back into units.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from sdengine.errors import InvalidArgumentError
from sdengine.mask_crop import MaskCrop, cover_resize, fill_resize
from sdengine.webui_detectmap import MAP_RESIZE_MODES, detected_map, over_white
from sdengine.webui_inpaint import Resize, stretch
from sdengine.webui_preprocessors import canny_map, invert_map, opencv

#: The extension's resize modes, by name and by number (:mod:`sdengine.webui_detectmap`'s names).
RESIZE_MODES: dict[str | int, str] = {name: name for name in MAP_RESIZE_MODES} | dict(
    enumerate(MAP_RESIZE_MODES)
)
#: A cut of a unit's image to an inpainting's box: (image, the unit's resize mode) -> image
Crop = Callable[[Image.Image, str], Image.Image]
#: The web UI's own resizes (its img2img ``resize_mode``s), by the extension's names for them
WEBUI_RESIZES: dict[str, Resize] = {
    "Just Resize": stretch,
    "Crop and Resize": cover_resize,
    "Resize and Fill": fill_resize,
}
#: The extension's control modes, in its order (its numbers), and ``sdengine.controlnet.CONTROL_MODES``' name
#: of each
CONTROL_MODE_LABELS = {
    "Balanced": "balanced",
    "My prompt is more important": "prompt",
    "ControlNet is more important": "control",
}
#: ... by name and by number
CONTROL_MODES: dict[str | int, str] = CONTROL_MODE_LABELS | dict(enumerate(CONTROL_MODE_LABELS.values()))
#: ... and the extension's own name of each, by name and by number
CONTROL_MODE_NAMES: dict[str | int, str] = {label: label for label in CONTROL_MODE_LABELS} | dict(
    enumerate(CONTROL_MODE_LABELS)
)
#: The ``alwayson_scripts`` entry (the web UI lowercases script titles).
SCRIPT = "controlnet"
#: What a unit's ``model`` may carry after the name: the web UI's `` [shorthash]``.
HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]+\]$")


def controlnet_name(directory: str) -> str:
    """The name a served ControlNet goes by: its directory's, or for a single file converted into the cache
    (``controlnets/STEM-KEY``), the file's stem."""
    path = Path(directory)
    if path.parent.name == "controlnets":
        return re.sub(r"-[0-9a-f]{16}$", "", path.name)
    return path.name


class UnitSettings(NamedTuple):
    """A request's ControlNet units read: the pipeline's settings, and each enabled unit's infotext record
    (``"ControlNet i"`` -> its fields, numbered among the enabled units)."""

    settings: dict[str, Any]
    infotexts: dict[str, str]


def control_settings(
    scripts: Any,
    served: Sequence[str],
    width: int,
    height: int,
    init_image: Image.Image | None,
    decode: Callable[[str, str], Image.Image],
    crop: Crop | None = None,
) -> UnitSettings:
    """The pipeline's ControlNet settings (``control_image``, ``control_scale``, ``control_start``,
    ``control_end``, one per served ControlNet) from a request's ``alwayson_scripts`` (``{}`` where the
    model has no ControlNets and no unit asks for one), and each enabled unit's infotext record.
    ``decode(base64, field)`` reads an image; ``crop`` cuts each unit's image to an "only masked"
    inpainting's box first (:func:`only_masked`)."""
    if scripts in (None, {}):
        scripts = {}
    if not isinstance(scripts, dict):
        raise InvalidArgumentError("alwayson_scripts must be an object of scripts")
    others = sorted(name for name in scripts if name.lower() != SCRIPT)
    if others:
        raise InvalidArgumentError(f"alwayson_scripts: not supported: {', '.join(others)}")
    units = [unit for unit in _units(scripts) if unit.get("enabled", True)]
    if not served:
        if units:
            raise InvalidArgumentError(
                "alwayson_scripts.controlnet: the model served has no ControlNet (export it with one: "
                "sdengine export --controlnet)"
            )
        return UnitSettings({}, {})
    images: list[Image.Image | np.ndarray] = [np.zeros((height, width, 3), np.float32)] * len(served)
    scales, starts, ends = [0.0] * len(served), [0.0] * len(served), [1.0] * len(served)
    modes = ["balanced"] * len(served)
    named: set[int] = set()
    records = {}
    for i, unit in enumerate(units):
        field = f"alwayson_scripts.controlnet.args[{i}]"
        index = _served_index(unit, served, field)
        if index in named:
            raise InvalidArgumentError(f"{field}: a second unit for ControlNet {served[index]!r}")
        named.add(index)
        modes[index] = _check_unit(unit, field)
        module = _module(unit, field)
        image = _unit_image(unit, init_image, decode, field)
        resize = RESIZE_MODES.get(unit.get("resize_mode", "Crop and Resize"))
        if resize is None:
            raise InvalidArgumentError(
                f"{field}.resize_mode {unit.get('resize_mode')!r}: use Just Resize, Crop and Resize or "
                "Resize and Fill (or 0-2)"
            )
        if crop is not None:
            image = crop(image, resize)
        resolution, low, high = _sliders(unit, module, image.size, resize, width, height)
        records[f"ControlNet {i}"] = _record(unit, resize, resolution, low, high)
        if module == "canny":
            image = canny_map(image, int(resolution), int(low), int(high))
        elif module == "invert":
            image = invert_map(image)
        images[index] = image if image.size == (width, height) else detected_map(image, resize, width, height)
        scales[index] = _number(unit, "weight", 1.0, field)
        starts[index] = _number(unit, "guidance_start", 0.0, field)
        ends[index] = _number(unit, "guidance_end", 1.0, field)
    settings = {
        "control_image": images[0] if len(images) == 1 else images,
        "control_scale": scales,
        "control_start": starts,
        "control_end": ends,
        **({"control_mode": modes} if set(modes) != {"balanced"} else {}),
    }
    return UnitSettings(settings, records)


def _record(unit: dict[str, Any], resize: str, resolution: Any, low: Any, high: Any) -> str:
    """A unit's infotext record: its eleven fields as the extension writes them (its
    ``ControlNetUnit.infotext_fields`` and ``serialize``), its sliders as its preprocessor took them."""
    fields = {
        "Module": str(unit.get("module") or "none"),
        "Model": str(unit.get("model")),
        "Weight": _number(unit, "weight", 1.0, ""),
        "Resize Mode": resize,
        "Processor Res": resolution,
        "Threshold A": low,
        "Threshold B": high,
        "Guidance Start": _number(unit, "guidance_start", 0.0, ""),
        "Guidance End": _number(unit, "guidance_end", 1.0, ""),
        "Pixel Perfect": bool(unit.get("pixel_perfect", False)),
        "Control Mode": CONTROL_MODE_NAMES[unit.get("control_mode", "Balanced")],
    }
    return ", ".join(f"{name}: {value}" for name, value in fields.items())


def only_masked(placement: MaskCrop, width: int, height: int) -> Crop:
    """How the extension cuts a unit's image for an "only masked" inpainting (``inpaint_full_res``; its
    ``try_crop_image_with_a1111_mask``): brought to the mask's size by the web UI's resize of the unit's mode,
    cut to the inpainting's box, and brought to ``width`` x ``height`` as the box's image is (resize and
    fill), so that it lines up with the part repainted."""

    def cut(image: Image.Image, resize_mode: str) -> Image.Image:
        size = placement.mask.size
        fitted = image if image.size == size else WEBUI_RESIZES[resize_mode](image, *size)
        return fill_resize(fitted.crop(placement.box), width, height)

    return cut


def _units(scripts: dict[str, Any]) -> list[dict[str, Any]]:
    entry = next(value for name, value in scripts.items() if name.lower() == SCRIPT) if scripts else {}
    args = entry.get("args", []) if isinstance(entry, dict) else None
    if not isinstance(args, list) or not all(isinstance(unit, dict) for unit in args):
        raise InvalidArgumentError("alwayson_scripts.controlnet.args must be a list of unit objects")
    return args


def _served_index(unit: dict[str, Any], served: Sequence[str], field: str) -> int:
    model = HASH_SUFFIX.sub("", str(unit.get("model") or ""))
    if model not in served:
        raise InvalidArgumentError(
            f"{field}.model {unit.get('model')!r} is not served; the served ControlNets: {', '.join(served)}"
        )
    return served.index(model)


@dataclass(frozen=True)
class Slider:
    """A preprocessor's slider in the extension: a value outside [low, high] (as -1, unset) is its default."""

    low: float
    high: float
    default: float

    def value(self, given: Any, kind: type) -> Any:
        fits = (
            isinstance(given, int | float) and not isinstance(given, bool) and self.low <= given <= self.high
        )
        return kind(given) if fits else self.default


#: The preprocessors run here (:mod:`sdengine.webui_preprocessors`), by the names the extension takes, and
#: their sliders: resolution, threshold A, threshold B (the extension's ranges and defaults; "none" and
#: "invert" show none, and keep the base ones)
PREPROCESSORS: dict[str, tuple[Slider, Slider, Slider]] = {
    "none": (Slider(64, 2048, 512), Slider(0, 1, 0.5), Slider(0, 1, 0.5)),
    "canny": (Slider(64, 2048, 512), Slider(1, 255, 100), Slider(1, 255, 200)),
    "invert": (Slider(0, 1, 0.5), Slider(0, 1, 0.5), Slider(0, 1, 0.5)),
}
#: ... and the extension's labels, which it takes too
PREPROCESSOR_LABELS = {"invert (from white bg & black line)": "invert"}


def preprocessors() -> list[str]:
    """The preprocessors a unit may name here, in the order ``/controlnet/module_list`` gives them (the
    extension's: none, then by priority); canny where OpenCV is installed."""
    try:
        import cv2  # noqa: F401
    except ImportError:
        return ["none", "invert"]
    return ["none", "canny", "invert"]


def _module(unit: dict[str, Any], field: str) -> str:
    """The preprocessor a unit names (:data:`PREPROCESSORS`), or one line refusing it."""
    module = str(unit.get("module") or "none")
    name = "none" if module.lower() == "none" else PREPROCESSOR_LABELS.get(module, module)
    if name not in PREPROCESSORS:
        raise InvalidArgumentError(
            f"{field}.module {module!r}: only the preprocessors {', '.join(PREPROCESSORS)} are run here; "
            "send the preprocessed image (an edge or depth map) with module none"
        )
    if name == "canny":
        opencv()
    return name


def _sliders(
    unit: dict[str, Any], module: str, size: tuple[int, int] | None, resize: str, width: int, height: int
) -> tuple[Any, Any, Any]:
    """The resolution and thresholds the unit's preprocessor takes, as the extension sets them: each within
    its slider's range or else its default; with ``pixel_perfect``, the resolution that brings the image
    (``size``: width, height) to the generation's size by the resize mode, so its map needs no resizing."""
    sliders = PREPROCESSORS[module]
    resolution = sliders[0].value(unit.get("processor_res"), int)
    low = sliders[1].value(unit.get("threshold_a"), float)
    high = sliders[2].value(unit.get("threshold_b"), float)
    if unit.get("pixel_perfect") and size is not None:
        k0, k1 = height / size[1], width / size[0]
        k = min(k0, k1) if resize == "Resize and Fill" else max(k0, k1)
        resolution = int(np.round(k * min(size)))
    return resolution, low, high


def _check_unit(unit: dict[str, Any], field: str) -> str:
    """The unit's control mode (:data:`CONTROL_MODES`'s name), once what it asks for is known runnable."""
    mode = unit.get("control_mode", "Balanced")
    if isinstance(mode, bool) or mode not in CONTROL_MODES:
        raise InvalidArgumentError(
            f"{field}.control_mode {mode!r}: use Balanced, My prompt is more important or ControlNet is more "
            "important (or 0-2)"
        )
    image = unit.get("image")
    if isinstance(image, dict) and image.get("mask"):
        raise InvalidArgumentError(f"{field}.image.mask: a unit's own mask is not supported")
    return CONTROL_MODES[mode]


def _unit_image(
    unit: dict[str, Any],
    init_image: Image.Image | None,
    decode: Callable[[str, str], Image.Image],
    field: str,
) -> Image.Image:
    data = unit.get("image", unit.get("input_image"))
    if isinstance(data, dict):
        data = data.get("image")
    if data:
        return over_white(decode(data, f"{field}.image"))
    if init_image is None:
        raise InvalidArgumentError(f"{field}.image: give the control image (base64)")
    return init_image


def _number(unit: dict[str, Any], key: str, default: float, field: str) -> float:
    value = unit.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentError(f"{field}.{key} must be a number, got {value!r}")
    return float(value)
