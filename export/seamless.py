"""Seamless images (the web UI's "Tiling"): every padded convolution of the UNet and the VAE wraps around
the image's edges (``padding_mode="circular"``), so what comes out tiles: its right edge continues into its
left, its bottom into its top.

This is the web UI's own switch (it sets the mode on every ``Conv2d`` of the model, UNet and VAE alike) and
diffusers' documented recipe; the models then treat the latents as a torus, so shifting the starting noise
shifts the image. Convolutions without padding are left as they are, and so is the VAE encoder's
downsampling, which pads with zeros by hand (in the web UI's models too).
"""

from __future__ import annotations

from torch import nn


def make_seamless(module: nn.Module) -> int:
    """Make every padded ``Conv2d`` of ``module`` pad circularly; returns how many there are."""
    count = 0
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d) and any(p > 0 for p in _padding(layer)):
            layer.padding_mode = "circular"
            count += 1
    return count


def _padding(layer: nn.Conv2d) -> tuple[int, ...]:
    padding = layer.padding
    return (0,) if isinstance(padding, str) else tuple(padding)
