"""The web UI's live previews: ``GET /sdapi/v1/progress`` answers the running generation's latest preview
as ``current_image`` (base64), as the web UI does, so that its clients show the picture forming.

Its options (``POST /sdapi/v1/options``, or a request's ``override_settings``), with the web UI's names:

- ``live_previews_enable`` (true): draw previews at all;
- ``show_progress_every_n_steps`` (10): a preview after every N steps (UNet calls); 0: none; -1: none
  during the steps, one of each finished batch (the web UI's "-1 shows after completion of batch");
- ``show_progress_type`` ("Approx cheap"): how they are drawn (:mod:`sdengine.latent_preview`): "Approx
  cheap", a fixed linear mix of the latents' channels at 1/8 of the size, free; "Full", the model's VAE
  decoder (on the CPU, seconds each for SD 1.5's VAE at 512 x 512); "TAESD", a tiny VAE's decoder
  (``AutoencoderTiny``): the preview decoder of an export made with ``--preview-vae``, or the model's own
  VAE where it is a tiny one (``--vae``). The web UI's default, "Approx NN", is its own small network,
  whose weights are not here: refused by name;
- ``live_previews_image_format`` ("png"): "png", "jpeg" or "webp";
- ``show_progress_grid`` (true): a batch's previews side by side in the web UI's grid; false, the first.

What is previewed is the latents as the step leaves them (noisy part way: a look at the run, not its
estimate of the final image, which the web UI shows).
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from typing import Any

from PIL import Image

from sdengine.errors import InvalidArgumentError

#: the options and their defaults here (the web UI's, but for ``show_progress_type``, see the module's docs)
LIVE_PREVIEW_OPTIONS: dict[str, Any] = {
    "live_previews_enable": True,
    "show_progress_every_n_steps": 10,
    "show_progress_type": "Approx cheap",
    "live_previews_image_format": "png",
    "show_progress_grid": True,
}
#: ``show_progress_type`` -> :mod:`sdengine.latent_preview`'s method (TAESD's: see :func:`taesd_method`)
PREVIEW_TYPES = {"Approx cheap": "approx", "Full": "full", "TAESD": "tiny"}
IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


@dataclass(frozen=True)
class LivePreview:
    """How a request's previews are drawn: after every ``every`` steps (-1: after each batch), by
    ``method``, encoded as ``image_format``, a batch in a grid or its first image alone."""

    every: int
    method: str
    image_format: str
    grid: bool

    def encode(self, images: list[Image.Image]) -> str:
        """A batch's preview images -> the base64 ``current_image``."""
        picture = image_grid(images) if self.grid else images[0]
        buffer = io.BytesIO()
        picture.convert("RGB").save(buffer, format=IMAGE_FORMATS[self.image_format])
        return base64.b64encode(buffer.getvalue()).decode("ascii")


def taesd_method(tiny_previews: bool, tiny_vae: bool) -> str | None:
    """The preview method "TAESD" is for a model: its preview decoder where it has one, else its VAE's
    decoder where that is a tiny VAE; None: neither."""
    return "tiny" if tiny_previews else "full" if tiny_vae else None


def live_preview(overrides: dict[str, Any], taesd: str | None) -> LivePreview | None:
    """The live preview a request's options (``override_settings`` over the server's) ask for; None where
    they ask for none. InvalidArgumentError names an option that cannot be honoured. ``taesd``: the method
    "TAESD" is for the model served (:func:`taesd_method`)."""
    options = {**LIVE_PREVIEW_OPTIONS, **{k: v for k, v in overrides.items() if k in LIVE_PREVIEW_OPTIONS}}
    for key in ("live_previews_enable", "show_progress_grid"):
        if not isinstance(options[key], bool):
            raise InvalidArgumentError(f"{key} must be true or false, got {options[key]!r}")
    every = options["show_progress_every_n_steps"]
    if isinstance(every, bool) or not isinstance(every, int | float) or every != int(every) or every < -1:
        raise InvalidArgumentError(f"show_progress_every_n_steps must be a whole number >= -1, got {every!r}")
    kind = options["show_progress_type"]
    if kind == "Approx NN":
        raise InvalidArgumentError(
            'show_progress_type "Approx NN" (the web UI\'s own approximation network) is not available here: '
            'use "Approx cheap" or "Full"' + (' (or "TAESD")' if taesd else "")
        )
    if kind not in PREVIEW_TYPES or (kind == "TAESD" and not taesd):
        known = ", ".join(k for k in PREVIEW_TYPES if k != "TAESD" or taesd)
        hint = (
            "" if taesd else " (TAESD: export the model with --preview-vae DIR, a tiny VAE, AutoencoderTiny)"
        )
        raise InvalidArgumentError(f"show_progress_type {kind!r} is not supported; use {known}{hint}")
    image_format = options["live_previews_image_format"]
    if image_format not in IMAGE_FORMATS:
        raise InvalidArgumentError(
            f"live_previews_image_format must be one of {', '.join(IMAGE_FORMATS)}, got {image_format!r}"
        )
    if not options["live_previews_enable"] or every == 0:
        return None
    method = taesd if kind == "TAESD" else PREVIEW_TYPES[kind]
    return LivePreview(int(every), str(method), image_format, options["show_progress_grid"])


def image_grid(images: list[Image.Image]) -> Image.Image:
    """A batch's images in rows and columns as the web UI's grids lay them (rows: the square root of the
    count, rounded), each cell the first image's size, left to right then top to bottom."""
    rows = max(1, round(math.sqrt(len(images))))
    cols = math.ceil(len(images) / rows)
    width, height = images[0].size
    grid = Image.new("RGB", (cols * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % cols) * width, (i // cols) * height))
    return grid
