"""The one interface every model backend implements; the denoising loop only ever sees this."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Backend(Protocol):
    """Runs the three models of text-to-image generation. Arrays in and out are host numpy arrays."""

    name: str

    def encode_text(self, input_ids: np.ndarray) -> np.ndarray:
        """Token ids (B, sequence) -> text embeddings (B, sequence, hidden), float32."""
        ...

    def predict_noise(self, sample: np.ndarray, timestep: float, context: np.ndarray) -> np.ndarray:
        """The UNet: latents (B, C, h, w) at ``timestep``, embeddings (B, seq, hidden) -> (B, C, h, w)."""
        ...

    def decode_latents(self, latents: np.ndarray) -> np.ndarray:
        """The VAE decoder: latents divided by the scaling factor -> images (B, 3, H, W) in about [-1, 1]."""
        ...
