"""A ControlNet unit's image brought to the generation's size as the web UI's ControlNet extension brings it
(its ``detectmap_proc``, read in sd-webui-controlnet's source at commit 56cec5b2; not run against it here):

- "Just Resize": stretched to ``width`` x ``height``;
- "Crop and Resize" (the extension's default): scaled by the larger of the two ratios, each side rounded,
  then cut to size from ``max(0, (new - target) // 2)`` on each axis;
- "Resize and Fill": scaled by the smaller ratio into a canvas of the per-channel median of the image's
  border pixels (its first and last rows and columns), placed at ``(target - new) // 2``.

Each resize (:func:`map_resize`) chooses its filter as the extension does: none where the size is already
right; nearest-neighbour for maps of 3 to 199 colours (segmentation maps keep their labels); area averaging
when shrinking; bicubic when enlarging. A two-colour map (an edge or scribble map: darkest below 16,
brightest above 240) is made two-coloured again after it: its channels' mean cut at Otsu's threshold.

What differs: Pillow's filters stand in for OpenCV's (area and bicubic weights differ slightly at the
edges), and the extension's thinning of one-pixel edges after enlarging (its non-maximum suppression and
``lvmin_thin``) is not done, so enlarged one-pixel edges come out as the threshold leaves them (about as
wide as the scale). The control image is read as RGB, an alpha channel dropped (the extension lays it over
white).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from sdengine.errors import InvalidArgumentError

#: The extension's resize modes, by name (its numbers map onto these: 0, 1, 2)
MAP_RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")


def detected_map(image: Image.Image, resize_mode: str, width: int, height: int) -> Image.Image:
    """``image`` at ``width`` x ``height`` by ``resize_mode`` (:data:`MAP_RESIZE_MODES`), as the extension
    brings a unit's control image there (see the module's docstring)."""
    if resize_mode not in MAP_RESIZE_MODES:
        raise InvalidArgumentError(
            f"resize mode must be one of {', '.join(MAP_RESIZE_MODES)}, got {resize_mode!r}"
        )
    pixels = np.asarray(image.convert("RGB"))
    if resize_mode == "Just Resize":
        return Image.fromarray(map_resize(pixels, width, height))
    old_h, old_w = pixels.shape[:2]
    ratios = (height / old_h, width / old_w)
    fill = resize_mode == "Resize and Fill"
    k = min(ratios) if fill else max(ratios)
    resized = map_resize(pixels, int(np.round(old_w * k)), int(np.round(old_h * k)))
    new_h, new_w = resized.shape[:2]
    if fill:
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]], axis=0)
        canvas = np.tile(np.median(border, axis=0).astype(np.uint8)[None, None], (height, width, 1))
        top, left = max(0, (height - new_h) // 2), max(0, (width - new_w) // 2)
        canvas[top : top + new_h, left : left + new_w] = resized
        return Image.fromarray(canvas)
    top, left = max(0, (new_h - height) // 2), max(0, (new_w - width) // 2)
    return Image.fromarray(np.ascontiguousarray(resized[top : top + height, left : left + width]))


def map_resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """A control map (H, W, 3) uint8 resized to ``width`` x ``height`` by the extension's choice of filter,
    two-colour maps kept two-coloured (see the module's docstring)."""
    if pixels.shape[:2] == (height, width):
        return pixels
    colours = len(np.unique(pixels.reshape(-1, pixels.shape[2]), axis=0))
    binary = colours == 2 and int(pixels.min()) < 16 and int(pixels.max()) > 240
    if 2 < colours < 200:
        resample = Image.Resampling.NEAREST
    elif width * height < pixels.shape[0] * pixels.shape[1]:
        resample = Image.Resampling.BOX
    else:
        resample = Image.Resampling.BICUBIC
    resized = np.asarray(Image.fromarray(pixels).resize((width, height), resample))
    if not binary:
        return resized
    grey = np.mean(resized.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
    cut = np.where(grey > otsu_threshold(grey), 255, 0).astype(np.uint8)
    return np.repeat(cut[..., None], 3, axis=2)


def otsu_threshold(grey: np.ndarray) -> int:
    """Otsu's threshold of a uint8 image: the level t that maximises the between-class variance of the
    levels <= t and > t (the first such level, as OpenCV's ``THRESH_OTSU`` picks it)."""
    counts = np.bincount(grey.ravel(), minlength=256).astype(np.float64)
    p = counts / counts.sum()
    levels = np.arange(256, dtype=np.float64)
    q1 = np.cumsum(p)
    mu1_sum = np.cumsum(p * levels)
    total = mu1_sum[-1]
    q2 = 1.0 - q1
    with np.errstate(divide="ignore", invalid="ignore"):
        between = q1 * q2 * (mu1_sum / q1 - (total - mu1_sum) / q2) ** 2
    between[(q1 < 1e-12) | (q2 < 1e-12)] = -1.0
    return int(np.argmax(between))
