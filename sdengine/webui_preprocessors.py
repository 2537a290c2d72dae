"""The ControlNet extension's model-free preprocessors that the HTTP API runs on a unit's image (its
``module``), as the extension runs them (read in sd-webui-controlnet's source at commit 56cec5b2):

- ``canny``: the image scaled so that its short side is the unit's resolution (bicubic when enlarging, area
  when shrinking; each side rounded), padded at the bottom and right to multiples of 64 by repeating its
  edge pixels, OpenCV's Canny edge detector at the low and high thresholds (``threshold_a``,
  ``threshold_b``; 100 and 200 by default), the padding cut off: a white-on-black edge map;
- ``invert`` (the extension's "invert (from white bg & black line)"): 255 minus each level, for line art
  drawn black on white.

Canny is OpenCV's own (``cv2.Canny`` and ``cv2.resize``, as the extension calls them), so it needs OpenCV:
``pip install opencv-python-headless``; without it a unit asking for it is refused in one line. The
resulting map is then brought to the generation's size as any unit's image is
(:mod:`sdengine.webui_detectmap`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from sdengine.errors import InvalidArgumentError


def opencv() -> Any:
    """OpenCV's module, or one line saying how to install it."""
    try:
        import cv2
    except ImportError:
        raise InvalidArgumentError(
            "module canny runs OpenCV's Canny edge detector, as the ControlNet extension does: pip install "
            "opencv-python-headless"
        ) from None
    return cv2


def canny_map(image: Image.Image, resolution: int, low: int, high: int) -> Image.Image:
    """The extension's canny preprocessor on ``image`` (see the module's docstring): an RGB edge map, white
    on black, of the image's size scaled to ``resolution`` on its short side."""
    cv2 = opencv()
    pixels = np.asarray(image.convert("RGB"))
    height, width = pixels.shape[:2]
    k = float(resolution) / float(min(height, width))
    target_h, target_w = int(np.round(height * k)), int(np.round(width * k))
    interpolation = cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA
    scaled = cv2.resize(pixels, (target_w, target_h), interpolation=interpolation)
    pad_h, pad_w = -target_h % 64, -target_w % 64
    padded = np.pad(scaled, [(0, pad_h), (0, pad_w), (0, 0)], mode="edge")
    edges = cv2.Canny(np.ascontiguousarray(padded), int(low), int(high))[:target_h, :target_w]
    return Image.fromarray(np.repeat(edges[..., None], 3, axis=2))


def invert_map(image: Image.Image) -> Image.Image:
    """The extension's invert preprocessor: 255 minus each level of the RGB image."""
    return Image.fromarray(255 - np.asarray(image.convert("RGB")))
