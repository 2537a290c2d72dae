"""The safety checker: what a checkpoint with one (SD 1.x's own do) runs on every image, as diffusers'
``StableDiffusionPipeline`` does by default.

Its input is the image as CLIP's image processor makes it (the checkpoint's ``feature_extractor``
preprocessor config): the image as 8-bit RGB, resized so its shorter side is 224 pixels (bicubic), cropped to
224 x 224 at its centre, scaled to [0, 1] and normalised by CLIP's mean and standard deviation. The exported
model (``safety_checker/model.onnx``, as diffusers' ONNX pipeline runs it) takes that and the images, and
gives the images with each flagged one black, and the flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sdengine.images import to_pil

#: Where a checkpoint (and an export) keeps the image processor's settings.
PREPROCESSOR_CONFIG = Path("feature_extractor") / "preprocessor_config.json"
#: CLIP's image processor defaults, for a config that leaves some out.
CLIP_DEFAULTS: dict[str, Any] = {
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


def _size(value: Any, key: str) -> int:
    """A size of the config: ``{"shortest_edge": 224}``, ``{"height": 224, ...}``, or a bare number."""
    return int(value[key] if isinstance(value, dict) else value)


def clip_pixels(images: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    """Images (B, H, W, 3) in [0, 1] -> the safety checker's ``clip_input`` (B, 3, h, w), float32."""
    settings = {**CLIP_DEFAULTS, **config}
    out = []
    for image in to_pil(images):  # 8-bit, as diffusers hands the checker PIL images
        if settings["do_resize"]:
            short = _size(settings["size"], "shortest_edge")
            width, height = image.size
            scale = short / min(width, height)
            size = (short, int(height * scale)) if width <= height else (int(width * scale), short)
            image = image.resize(size, Image.Resampling(int(settings["resample"])))
        array = np.asarray(image, dtype=np.float32)
        if settings["do_center_crop"]:
            crop = settings["crop_size"]
            crop_h, crop_w = _size(crop, "height"), _size(crop, "width")
            top, left = (array.shape[0] - crop_h) // 2, (array.shape[1] - crop_w) // 2
            array = array[top : top + crop_h, left : left + crop_w]
        if settings["do_rescale"]:
            array = array * np.float32(settings["rescale_factor"])
        if settings["do_normalize"]:
            mean, std = (np.asarray(settings[k], dtype=np.float32) for k in ("image_mean", "image_std"))
            array = (array - mean) / std
        out.append(array.transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(out), dtype=np.float32)
