"""Previews of latents part way through a run, by one of :data:`PREVIEW_METHODS`:

- ``full``: the model's own VAE decoder (the image the run would give if it stopped there, at full size;
  on the CPU an SD 1.5 VAE takes seconds at 512 x 512, a tiny VAE (``AutoencoderTiny``) a fraction of that);
- ``approx``: each latent pixel's colour as a fixed linear mix of its channels, at the latents' size (1/8 of
  the image's): free, and rough. The mixes are the web UI's "Approx cheap" live previews' (its
  ``sd_vae_approx.cheap_approximation``), fitted to SD 1.x/2.x's and SDXL's VAEs; the web UI's tables are
  taken, as data, so that its clients see what they expect. For a model whose VAE was trained otherwise
  (the random checkpoints here) the colours mean nothing, though the shapes still show;
- ``tiny``: a tiny VAE's decoder (TAESD's, ``AutoencoderTiny``) exported beside the model's own VAE
  (``sdengine export --preview-vae DIR``): full size, close to the VAE's image, a fraction of its cost (the
  web UI's "TAESD" live previews).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from sdengine.errors import InvalidArgumentError

PREVIEW_METHODS: tuple[str, ...] = ("full", "approx", "tiny")

#: latent channel -> (R, G, B) weight, for latents as the UNet takes them (scaled by the VAE's factor)
SD_LATENT_RGB = np.array(
    [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]],
    dtype=np.float32,
)
SDXL_LATENT_RGB = np.array(
    [
        [0.3448, 0.4168, 0.4395],
        [-0.1953, -0.0290, 0.0250],
        [0.1074, 0.0886, -0.0163],
        [-0.3730, -0.2499, -0.2088],
    ],
    dtype=np.float32,
)


def check_preview_method(method: str, tiny: bool) -> str:
    """``method``, where it is one and the model can draw it (``tiny``: it has a preview decoder)."""
    if method not in PREVIEW_METHODS:
        raise InvalidArgumentError(
            f"preview method must be one of {', '.join(PREVIEW_METHODS)}, got {method!r}"
        )
    if method == "tiny" and not tiny:
        raise InvalidArgumentError(
            "tiny previews need a preview decoder: export the model with --preview-vae DIR (a tiny VAE, "
            "AutoencoderTiny), or load a checkpoint with preview_vae=DIR (torch)"
        )
    return method


def approximate_images(latents: np.ndarray, xl: bool) -> list[Image.Image]:
    """Latents (B, 4, h, w) as the UNet takes them -> one h x w RGB image each, by the linear mix (values in
    [-1, 1] mapped to [0, 255], clipped)."""
    if latents.ndim != 4 or latents.shape[1] != SD_LATENT_RGB.shape[0]:
        raise InvalidArgumentError(
            f"approximate previews take 4-channel latents (B, 4, h, w), got shape {tuple(latents.shape)}"
        )
    mix = SDXL_LATENT_RGB if xl else SD_LATENT_RGB
    rgb = np.einsum("bchw,cr->bhwr", latents.astype(np.float32), mix)
    pixels = np.clip((rgb + 1.0) * 127.5, 0.0, 255.0).round().astype(np.uint8)
    return [Image.fromarray(image) for image in pixels]
