"""IP-Adapter (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter"): an image as a prompt,
beside the text.

A CLIP image encoder turns the image prompt into one embedding; the adapter's projection inside the UNet
makes four tokens of it, and every cross-attention layer attends to them with keys and values of its own,
adding ``scale`` times that attention to the text's. ``sdengine export --ip-adapter FILE`` traces the adapter
into the UNet, whose model then takes the embeddings (``image_embeds``) and the scale (``ip_adapter_scale``)
as inputs, and exports the image encoder (``image_encoder/model.onnx``); ``ip_adapter/config.json`` says
so. Both inputs are constant for a run, so an IP-Adapter step is still one captured graph on a GPU.

As diffusers' pipelines run them: the image is prepared as CLIP's image processor prepares it (shorter side
resized to the encoder's size, bicubic, centre crop, CLIP's mean and deviation). The plain IP-Adapter
(``ip-adapter_sd15``, ``ip-adapter_sdxl``) reads the encoder's projected embedding, and the negative side of
classifier-free guidance zeros; the Plus kind (``ip-adapter-plus_sd15``, ``-plus-face``, a resampler of 16
tokens) reads every token of the encoder's penultimate layer, and the negative side the encoder's states of
an all-zero input. A run with no image prompt gives zeros and scale 0: the model without its adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sdengine.errors import ModelDirectoryError
from sdengine.model_specs import IMAGE_EMBEDS, IP_ADAPTER_SCALE
from sdengine.safety import clip_pixels

#: Where an export says which IP-Adapter its UNet holds.
IP_ADAPTER_CONFIG = Path("ip_adapter") / "config.json"


def exported_ip_adapter(config: dict[str, Any]) -> dict[str, int]:
    """The architecture's IP-Adapter fields from an export's ``ip_adapter/config.json`` (empty: none)."""
    if not config:
        return {}
    try:
        return {
            "ip_image_embeds": int(config["image_embeds"]),
            "ip_image_size": int(config["image_size"]),
            "ip_image_tokens": int(config.get("image_tokens", 0)),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelDirectoryError(f"{IP_ADAPTER_CONFIG} is unreadable ({exc!r}): export again") from None


def ip_pixels(images: np.ndarray, image_size: int) -> np.ndarray:
    """Image prompts (B, H, W, 3) in [0, 1] -> the image encoder's ``pixel_values`` (B, 3, S, S)."""
    square = {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size}}
    return clip_pixels(images, square)


def ip_unet_inputs(
    embeds: np.ndarray | None,
    negative: np.ndarray | None,
    batch: int,
    copies: int,
    scale: float,
    shape: tuple[int, ...],
    negative_side: bool,
) -> dict[str, np.ndarray]:
    """The UNet's IP-Adapter inputs for a batch of ``batch`` (``copies`` 2 with guidance, 1 + K with
    composable prompts): the image prompt's embeddings (1, *shape) for every image of every positive copy,
    after the ``negative`` side's (None: zeros, the plain
    kind's; the others': the encoder's states of an all-zero input) where the batch has a negative side
    (``negative_side``: classifier-free guidance), and the scale; with no image prompt,
    zeros and scale 0."""
    if embeds is None:
        return {
            IMAGE_EMBEDS: np.zeros((copies * batch, 1, *shape), np.float32),
            IP_ADAPTER_SCALE: np.array(0.0, np.float32),
        }
    sides = [np.zeros((1, *shape), np.float32) if negative is None else negative] * negative_side
    sides += [embeds] * (copies - int(negative_side))
    per_item = [np.broadcast_to(np.asarray(side, np.float32)[:, None], (batch, 1, *shape)) for side in sides]
    return {
        IMAGE_EMBEDS: np.ascontiguousarray(np.concatenate(per_item)),
        IP_ADAPTER_SCALE: np.array(scale, np.float32),
    }
