"""Decoded VAE output -> pixels, PIL images and PNG files that remember how they were made."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo


def to_unit_range(decoded: np.ndarray) -> np.ndarray:
    """VAE output (B, 3, H, W) in [-1, 1] -> float32 (B, H, W, 3) in [0, 1], as diffusers post-processes."""
    return np.clip(decoded.astype(np.float32) / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """(B, H, W, 3) floats in [0, 1] -> PIL images (rounded as diffusers' ``numpy_to_pil``)."""
    return [Image.fromarray(img) for img in (images * 255).round().astype(np.uint8)]


def output_paths(path: str | os.PathLike, count: int) -> list[Path]:
    """``out.png`` for one image; ``out-0.png``, ``out-1.png``, ... for several."""
    path = Path(path)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(count)]


def save_png(image: Image.Image, path: str | os.PathLike, parameters: Mapping[str, Any]) -> Path:
    """Write ``image`` as PNG with the generation parameters in a ``parameters`` text chunk (JSON)."""
    info = PngInfo()
    info.add_text("parameters", json.dumps(dict(parameters), sort_keys=True))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", pnginfo=info)
    return path


def read_png_parameters(path: str | os.PathLike) -> dict[str, Any]:
    with Image.open(path) as img:
        return json.loads(img.text["parameters"])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two images in [0, 1], in dB."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)
