"""The AUTOMATIC1111 web UI's "infotext": how it writes an image's settings as text, the form its users read,
paste back into it and share (``prompt``, then ``Negative prompt: ...``, then ``Steps: 20, Sampler: Euler a,
...``; its ``processing.create_infotext``). Each PNG sdengine writes carries one in its ``parameters`` chunk
(:func:`parameters_infotext`), the HTTP API answers one per image (``info.infotexts``), as the web UI does,
and :func:`parse_infotext` reads one back (``/sdapi/v1/png-info``)."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping
from typing import Any

from sdengine import __version__
from sdengine.webui_inpaint import infotext_fields
from sdengine.webui_samplers import sampler_of


def quote(value: Any) -> str:
    """A value as the web UI writes it in an infotext: as it is, or as a JSON string where it holds a comma,
    a colon or a line break (which would end it)."""
    text = str(value)
    return text if not any(c in text for c in ",:\n") else json.dumps(text, ensure_ascii=False)


def infotext(prompt: str, negative_prompt: str, parameters: Mapping[str, Any]) -> str:
    """``prompt``, the negative prompt's line where there is one, and the parameters' line (in the order
    given; a None value is left out, as is a value equal to its name)."""
    fields = ", ".join(
        key if key == value else f"{key}: {quote(value)}"
        for key, value in parameters.items()
        if value is not None
    )
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{fields}".strip()


#: How sdengine's hires upscaling is named in the web UI.
HIRES_UPSCALERS = {"latent": "Latent", "image": "Lanczos"}


def parameters_infotext(parameters: Mapping[str, Any]) -> str:
    """The infotext of one image's recorded parameters (:meth:`GenerationRequest.parameters` with an index,
    plus what the CLI or the HTTP API adds): the web UI's names, in its order, for what it has a name for."""

    def first(value: Any) -> Any:
        return value[0] if isinstance(value, list | tuple) and len(value) == 1 else value

    scheduler = parameters.get("scheduler")
    sampler, schedule = sampler_of(scheduler) if scheduler else (None, None)
    sampler = sampler and sampler.removesuffix(" Karras")  # the web UI's 1.9+ names: the schedule apart
    inpaint_fields = {}
    if "inpaint_full_res" in parameters:  # the HTTP API's inpainting
        inpaint_fields = infotext_fields(parameters)
    elif "mask_crop" in parameters:
        inpaint_fields = {
            "Inpaint area": "Only masked",
            "Only masked padding, pixels": parameters["mask_crop"],
        }
    hires = "hires_scale" in parameters
    model = parameters.get("model")
    fields = {
        "Steps": parameters.get("steps"),
        "Sampler": sampler,
        # a run's own timesteps or sigmas have no schedule name, but the web UI's that the HTTP API computed
        "Schedule type": parameters.get("schedule_type")
        or (None if "timesteps" in parameters or "sigmas" in parameters else schedule),
        "CFG scale": parameters.get("guidance"),
        "Seed": parameters.get("seed"),
        "Size": f"{parameters['width']}x{parameters['height']}" if "width" in parameters else None,
        "Model": None if model is None else str(model).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1],
        "Variation seed": parameters.get("variation_seed"),
        "Variation seed strength": parameters.get("variation_strength"),
        "Denoising strength": parameters.get("strength", parameters.get("hires_strength")),
        "Clip skip": parameters["clip_skip"] + 1 if parameters.get("clip_skip") else None,
        "RNG": "CPU" if parameters.get("noise_source") == "torch-cpu" else None,
        "Tiling": True if parameters.get("seamless") else None,  # the web UI's name for it
        **inpaint_fields,
        "Hires upscale": parameters.get("hires_scale"),
        "Hires steps": parameters.get("hires_steps") if hires else None,
        "Hires upscaler": HIRES_UPSCALERS.get(parameters.get("hires_upscale")) if hires else None,
        "Refiner switch at": parameters.get("refiner_switch"),
        **(parameters.get("script_fields") or {}),  # the always-on scripts' (HTTP API): ControlNet's, PAG's
        "Lora hashes": parameters.get("lora_hashes"),
        "Version": f"sdengine {__version__}",
    }
    return infotext(first(parameters.get("prompt", "")), first(parameters.get("negative_prompt", "")), fields)


#: One ``Key: value`` field of an infotext's last line (a value in quotes may hold commas).
FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict[str, str]:
    """An infotext read back as the web UI reads it: ``Prompt``, ``Negative prompt`` and each field of the
    last line (values as text, quoted ones unquoted; ``Size`` also as ``Size-1`` and ``Size-2``). A last line
    of fewer than three fields is part of the prompt."""
    lines = text.strip().split("\n")
    last = lines[-1] if len(FIELD.findall(lines[-1])) >= 3 else ""
    if last:
        lines = lines[:-1]
    prompt: list[str] = []
    negative: list[str] = []
    reading = prompt
    for line in lines:
        if line.startswith("Negative prompt:"):  # this line and the ones after are the negative prompt
            reading, line = negative, line.removeprefix("Negative prompt:").strip()
        reading.append(line)
    fields = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in FIELD.findall(last):
        value = value.strip()
        if len(value) > 1 and value[0] == value[-1] == '"':
            with contextlib.suppress(ValueError):  # not JSON after all: kept as written
                value = json.loads(value)
        fields[key] = value
        if key == "Size" and "x" in value:
            fields["Size-1"], fields["Size-2"] = value.split("x", 1)
    return fields
