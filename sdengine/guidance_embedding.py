"""Guidance-embedded UNets: the latent consistency models' (LCM-distilled checkpoints, such as
LCM_Dreamshaper_v7 or lcm-sdxl), whose UNet was taught classifier-free guidance's effect and takes the
guidance scale as an input instead (its config's ``time_cond_proj_dim``).

diffusers' pipelines run such a UNet once per step on the prompt alone (no negative side, no guidance
combine: ``do_classifier_free_guidance`` is false whatever the scale) and hand it ``timestep_cond``, the
scale ``w = g - 1`` as a sinusoidal embedding (VDM's, ``get_guidance_scale_embedding``), added to the
timestep's embedding. sdengine exports that input (``sdengine.model_specs.TIMESTEP_COND``) and feeds it as a
constant of the run; a UNet exported without it would ignore the scale and make other images, silently.
"""

from __future__ import annotations

import numpy as np


def guidance_embedding(guidance: float, batch: int, dim: int) -> np.ndarray:
    """(batch, dim) float32: diffusers' ``get_guidance_scale_embedding`` of ``guidance - 1`` for each image,
    with its float32 products. Its exponentials and sines are taken in float64 and rounded: numpy's float32
    ones differ from PyTorch's in the last place (58 of SD's 128 frequencies), which at the angles of a scale
    near 8 (some 7500 radians) is 5e-4 in the sine. Rounded, all but one frequency in 128 match PyTorch's
    bit for bit; that one leaves 4e-4 at 8.5, 6e-8 at 7.5 (checked against diffusers' function)."""
    w = np.float32(guidance - 1.0) * np.float32(1000.0)
    half = dim // 2
    step = np.float32(np.log(np.float32(10000.0))) / np.float32(half - 1)
    frequencies = np.exp((np.arange(half, dtype=np.float32) * -step).astype(np.float64)).astype(np.float32)
    angles = (w * frequencies).astype(np.float64)
    row = np.concatenate([np.sin(angles), np.cos(angles), np.zeros(dim % 2)]).astype(np.float32)
    return np.broadcast_to(row, (batch, dim)).copy()
