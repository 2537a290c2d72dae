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
as it gives its timestep. Each row's weight of each residual (``control_weights``, :data:`CONTROL_MODES`:
diffusers' guess mode, the web UI extension's control modes) holds for the whole run too.
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


def exported_residuals(config: dict[str, Any]) -> int:
    """The residuals per ControlNet that an export's UNet weighs row by row (``control_weights``; 0: an
    export from before it took them, which runs every ControlNet balanced)."""
    residuals = config.get("residuals", 0)
    valid = isinstance(residuals, int) and not isinstance(residuals, bool) and residuals > 1
    return residuals if valid else 0


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


#: How each ControlNet's residuals are weighed (``control_mode``): ``balanced`` as they come (diffusers'
#: default, the web UI extension's "Balanced"); ``prompt``, the extension's "My prompt is more important",
#: each residual ``r`` of the 13 (down blocks', then the middle block's) scaled by ``0.825 ** (12 - r)``;
#: ``control``, its "ControlNet is more important", the same and none on the negative side of guidance;
#: ``guess``, diffusers' ``guess_mode``: residuals scaled from 0.1 to 1 (``logspace(-1, 0, R)``), none on
#: the negative side.
CONTROL_MODES = ("balanced", "prompt", "control", "guess")


def control_mode_weights(
    modes: tuple[str, ...], residuals: int, batch: int, copies: int, negative_side: bool
) -> np.ndarray:
    """The UNet's ``control_weights`` (copies * B, ControlNets, ``residuals``): each row's weight of each
    ControlNet's residuals under ``modes`` (one per ControlNet; :data:`CONTROL_MODES`), the negative side
    (the first B rows, where ``negative_side``) first."""
    weights = np.ones((copies, batch, len(modes), residuals), np.float32)
    r = np.arange(residuals, dtype=np.float64)
    for i, mode in enumerate(modes):
        if mode in ("prompt", "control"):  # the extension's soft injection (SDXL's 10: its first 10 of 13)
            weights[:, :, i] = 0.825 ** (12.0 - r)
        elif mode == "guess":  # diffusers' ControlNetModel in guess mode: torch.logspace(-1, 0, R)
            weights[:, :, i] = 10.0 ** (-1.0 + r / (residuals - 1))
        if mode in ("control", "guess") and negative_side:
            weights[0, :, i] = 0.0
    return weights.reshape(copies * batch, len(modes), residuals)


def residual_count(config: dict[str, Any]) -> int:
    """How many residuals a ControlNet with ``config`` (diffusers' ``ControlNetModel``'s) adds to the UNet:
    the input convolution's, each down block's layers' and downsampler's, and the middle block's (13 for SD
    1.x and 2.x, 10 for SDXL)."""
    blocks = len(config["down_block_types"])
    layers = config.get("layers_per_block", 2)
    per_block = list(layers) if isinstance(layers, (list, tuple)) else [layers] * blocks
    return 1 + sum(per_block) + (blocks - 1) + 1
