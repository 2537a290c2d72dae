"""Pixels in and out: input images for image to image and inpainting masks, decoded VAE output -> PIL
images, and PNG files that remember how they were made."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from sdengine.errors import InvalidArgumentError

#: What image-to-image accepts: a PIL image, a list of them, or an array (H, W, 3) / (B, H, W, 3) of floats
#: in [0, 1] or of uint8.
ImageInput = Image.Image | Sequence[Image.Image] | np.ndarray
#: What inpainting takes as a mask (white repaints, black keeps): a PIL image of any mode, a list of them, or
#: an array (H, W) / (B, H, W) of floats in [0, 1] or of uint8.
MaskInput = Image.Image | Sequence[Image.Image] | np.ndarray


def _load(path: str | os.PathLike, mode: str, what: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert(mode)
    except (OSError, UnidentifiedImageError) as exc:
        raise InvalidArgumentError(f"cannot read {what} {path}: {exc}") from None


def load_image(path: str | os.PathLike) -> Image.Image:
    """An RGB image read from a file, or a one-line InvalidArgumentError."""
    return _load(path, "RGB", "image")


def load_mask(path: str | os.PathLike) -> Image.Image:
    """An inpainting mask read from a file, as grayscale, or a one-line InvalidArgumentError."""
    return _load(path, "L", "mask")


def mask_array(mask: MaskInput, height: int, width: int) -> np.ndarray:
    """A mask input as float32 (B, height, width) of 0 (keep) and 1 (repaint), as diffusers' mask processor
    makes it: grayscale, resized (Lanczos) where its size differs, then 1 wherever it is at least 0.5."""
    if isinstance(mask, np.ndarray):
        if mask.ndim not in (2, 3):
            raise InvalidArgumentError(f"a mask array must be (H, W) or (B, H, W), got {mask.shape}")
        array = unit_floats(mask[None] if mask.ndim == 2 else mask, "mask")
        if array.shape[1:] == (height, width):
            return (array >= 0.5).astype(np.float32)
        mask = to_pil(array)
    _check_kind(mask, "mask")
    gray = _resized([mask] if isinstance(mask, Image.Image) else list(mask), "L", height, width)
    return (gray >= 0.5).astype(np.float32)


def unit_floats(array: np.ndarray, what: str) -> np.ndarray:
    """An image or mask array as float32 in [0, 1] (uint8 scaled by 1/255), or InvalidArgumentError."""
    array = array.astype(np.float32) / 255 if array.dtype == np.uint8 else np.asarray(array, dtype=np.float32)
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise InvalidArgumentError(f"{what} values must be in [0, 1] (or uint8)")
    return array


def _resized(images: list[Image.Image], mode: str, height: int, width: int) -> np.ndarray:
    """PIL images in ``mode`` (converted first), Lanczos-resized where their size differs, as diffusers'
    image processors do: float32 (B, height, width[, channels]) in [0, 1]."""
    size = (width, height)
    converted = [img.convert(mode) for img in images]
    resized = [img if img.size == size else img.resize(size, Image.Resampling.LANCZOS) for img in converted]
    return np.stack([np.asarray(img) for img in resized]).astype(np.float32) / 255


def _check_kind(image: object, what: str = "image") -> None:
    pil_list = isinstance(image, Sequence) and not isinstance(image, str) and len(image) > 0
    if not (
        isinstance(image, (Image.Image, np.ndarray))
        or pil_list
        and all(isinstance(i, Image.Image) for i in image)
    ):
        kind = type(image).__name__
        raise InvalidArgumentError(f"{what} must be a PIL image, a list of them or an array, not {kind}")


def image_size(image: ImageInput) -> tuple[int, int]:
    """(height, width) of an image input (of its first image)."""
    _check_kind(image)
    if isinstance(image, np.ndarray):
        if image.ndim not in (3, 4):
            raise InvalidArgumentError(f"an image array must be (H, W, 3) or (B, H, W, 3), got {image.shape}")
        return image.shape[-3], image.shape[-2]
    first = image if isinstance(image, Image.Image) else image[0]
    return first.height, first.width


def image_array(image: ImageInput, height: int, width: int) -> np.ndarray:
    """An image input as float32 (B, height, width, 3) in [0, 1], resized (Lanczos, as diffusers) where its
    size differs. InvalidArgumentError for anything that is not an RGB image."""
    _check_kind(image)
    if height < 1 or width < 1:
        raise InvalidArgumentError(f"cannot resize an image to {height}x{width}")
    if isinstance(image, Image.Image):
        images = [image]
    elif isinstance(image, np.ndarray):
        array = image[None] if image.ndim == 3 else image
        if array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] < 1:
            raise InvalidArgumentError(f"an image array must be (H, W, 3) or (B, H, W, 3), got {image.shape}")
        array = unit_floats(array, "image")
        if array.shape[1:3] == (height, width):
            return array
        images = to_pil(array)
    else:
        images = list(image)
    return _resized(images, "RGB", height, width)


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


#: The PNG text chunk holding sdengine's own record of an image's parameters (JSON).
PARAMETERS_CHUNK = "sdengine"


def png_info(parameters: Mapping[str, Any]) -> PngInfo:
    """An image's PNG text chunks: its parameters as JSON (:data:`PARAMETERS_CHUNK`), and as the AUTOMATIC1111
    web UI's infotext in the ``parameters`` chunk, where the web UI's PNG Info and image sites read them
    (:func:`sdengine.infotext.parameters_infotext`)."""
    from sdengine.infotext import parameters_infotext

    info = PngInfo()
    info.add_text("parameters", parameters_infotext(parameters))
    info.add_text(PARAMETERS_CHUNK, json.dumps(dict(parameters), sort_keys=True))
    return info


def save_png(image: Image.Image, path: str | os.PathLike, parameters: Mapping[str, Any]) -> Path:
    """Write ``image`` as PNG with the generation parameters in its text chunks (:func:`png_info`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", pnginfo=png_info(parameters))
    return path


def read_png_parameters(path: str | os.PathLike) -> dict[str, Any]:
    """The parameters a PNG of sdengine's records (the JSON of its own chunk; older files kept it in
    ``parameters``)."""
    with Image.open(path) as img:
        return json.loads(img.text.get(PARAMETERS_CHUNK, img.text.get("parameters", "{}")))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two images in [0, 1], in dB."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)
