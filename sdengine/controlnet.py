"""ControlNet at run time: what an export says of the ControlNets inside its UNet, and the UNet inputs a
request's conditioning images become.

An export with ControlNets (``sdengine export --controlnet DIR``) traces each ControlNet into the UNet's
model, so a denoising step is still one UNet call (one captured graph on a GPU): the UNet takes every
ControlNet's conditioning image side by side in the channels (``controlnet_cond``, in [0, 1], as diffusers'
ControlNet pipelines give it) and one weight per ControlNet (``conditioning_scale``), and adds the sum of the
ControlNets' residuals to its own, as diffusers' ``StableDiffusionControlNetPipeline`` (and
``MultiControlNetModel``) does. The export's ``controlnet/config.json`` lists them.

The images hold for the whole run; the weights may change from call to call (a ControlNet that runs on part
of the schedule only), so they are a table of the step model's, which gives each next call's row to the UNet
as it gives its timestep.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sdengine.model_specs import CONTROLNET_COND

#: Where an export lists the ControlNets inside its UNet (absent: none).
CONTROLNET_CONFIG = Path("controlnet") / "config.json"


def exported_controlnets(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The ControlNets an export's ``controlnet/config.json`` object lists (each its source and config)."""
    entries = config.get("controlnets", [])
    return entries if isinstance(entries, list) else []


def control_images(control: np.ndarray, batch: int, copies: int) -> dict[str, np.ndarray]:
    """The UNet's ControlNet images for a request: ``control`` (ControlNets, 1 or B, H, W, 3) in [0, 1] ->
    ``controlnet_cond`` (copies * B, 3 * ControlNets, H, W), an image per ControlNet side by side in the
    channels, the same for both halves of classifier-free guidance (as diffusers doubles it)."""
    per_net = [np.broadcast_to(images, (batch, *images.shape[1:])) for images in control]
    cond = np.concatenate([images.transpose(0, 3, 1, 2) for images in per_net], axis=1)
    return {CONTROLNET_COND: np.ascontiguousarray(np.concatenate([cond] * copies), dtype=np.float32)}


def control_schedule(
    scales: tuple[float, ...], starts: tuple[float, ...], ends: tuple[float, ...], calls: int
) -> np.ndarray:
    """Each UNet call's ControlNet weights, (calls, ControlNets): a ControlNet's scale on the calls ``i``
    with ``start <= i / calls`` and ``(i + 1) / calls <= end``, 0 on the others, as diffusers'
    ``controlnet_keep`` makes them."""
    i = np.arange(calls, dtype=np.float64)[:, None]
    keep = (i / calls >= np.asarray(starts)) & ((i + 1) / calls <= np.asarray(ends))
    return (keep * np.asarray(scales, dtype=np.float64)).astype(np.float32)
