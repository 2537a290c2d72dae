"""Inpainting only the masked region (``mask_crop=PADDING``; diffusers' ``padding_mask_crop``, the web UI's
"Only masked" inpaint area).

A small mask on a large image is repainted at the model's own resolution instead of the whole image shrunk
to it: the mask's bounding box, grown by PADDING pixels and then to the aspect ratio of the size generated,
is cut out of the image and the mask and resized to that size; the model inpaints it; the result is resized
back into the box and laid over the original image through the mask, so the image outside the mask stays
as it was, at its own size.

The rules are diffusers' (its image processor's ``get_crop_region``, ``resize_mode="fill"`` and
``apply_overlay``), written here in our own code: the box and the resized inputs are equal to diffusers'
pixel for pixel, the overlay within one level of 255 (it blends once where diffusers premultiplies alpha),
which ``tests/test_mask_crop.py`` checks against diffusers' functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from sdengine.errors import InvalidArgumentError
from sdengine.images import image_array, to_pil, unit_floats

Box = tuple[int, int, int, int]  # left, top, right, bottom (right and bottom exclusive), as PIL's crop


def crop_box(mask: Image.Image, width: int, height: int, padding: int) -> Box:
    """The box to inpaint: every non-black pixel of ``mask``, ``padding`` pixels around them (within the
    image), then grown on its short side, centred where the image allows, to the ``width``/``height``
    aspect ratio. InvalidArgumentError for a mask that repaints nothing."""
    marked = np.asarray(mask.convert("L")) != 0
    rows, cols = np.flatnonzero(marked.any(axis=1)), np.flatnonzero(marked.any(axis=0))
    if rows.size == 0:
        raise InvalidArgumentError("mask_crop: the mask repaints nothing (it is black everywhere)")
    size_y, size_x = marked.shape
    left, right = max(cols[0] - padding, 0), min(cols[-1] + 1 + padding, size_x)
    top, bottom = max(rows[0] - padding, 0), min(rows[-1] + 1 + padding, size_y)
    aspect = width / height
    if (right - left) / (bottom - top) > aspect:  # too wide: grow it taller
        top, bottom = _grown(top, bottom, int((right - left) / aspect - (bottom - top)), size_y)
    else:
        left, right = _grown(left, right, int((bottom - top) * aspect - (right - left)), size_x)
    return int(left), int(top), int(right), int(bottom)


def _grown(start: int, end: int, extra: int, limit: int) -> tuple[int, int]:
    """[start, end) grown by ``extra``, half before and half after (the odd one after), shifted back inside
    [0, limit) where it overflows, and cut at ``limit`` where it is longer than that."""
    start, end = start - extra // 2, end + extra - extra // 2
    if end >= limit:
        start, end = start - (end - limit), limit
    if start < 0:
        start, end = 0, end - start
    return start, min(end, limit)


def fill_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """``image`` resized (Lanczos) to fit ``width`` x ``height`` with its aspect ratio kept, centred, and the
    bands left over filled by stretching its edge rows (or columns) across them."""
    aspect, own = width / height, image.width / image.height
    fit_w = width if aspect < own else image.width * height // image.height
    fit_h = height if aspect >= own else image.height * width // image.width
    fitted = image.resize((fit_w, fit_h), Image.Resampling.LANCZOS)
    out = Image.new(image.mode, (width, height))
    out.paste(fitted, (width // 2 - fit_w // 2, height // 2 - fit_h // 2))
    if aspect < own and (band := height // 2 - fit_h // 2) > 0:  # bands above and below
        out.paste(fitted.resize((width, band), box=(0, 0, width, 0)), (0, 0))
        out.paste(fitted.resize((width, band), box=(0, fit_h, width, fit_h)), (0, band + fit_h))
    elif aspect > own and (band := width // 2 - fit_w // 2) > 0:  # bands left and right
        out.paste(fitted.resize((band, height), box=(0, 0, 0, height)), (0, 0))
        out.paste(fitted.resize((band, height), box=(fit_w, 0, fit_w, height)), (band + fit_w, 0))
    return out


def cover_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """``image`` resized (Lanczos) to cover ``width`` x ``height`` with its aspect ratio kept, centred, the
    excess cut off."""
    aspect, own = width / height, image.width / image.height
    cover_w = width if aspect > own else image.width * height // image.height
    cover_h = height if aspect <= own else image.height * width // image.width
    covering = image.resize((cover_w, cover_h), Image.Resampling.LANCZOS)
    out = Image.new(image.mode, (width, height))
    out.paste(covering, (width // 2 - cover_w // 2, height // 2 - cover_h // 2))
    return out


def single_image(value: object, mode: str, what: str) -> Image.Image:
    """One image (``mode`` "RGB") or mask ("L") given as PIL, a list of one, or an array (one image, or a
    batch of one; floats in [0, 1] or uint8, grey levels kept) as a PIL image in ``mode``."""
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 1:
        value = value[0]
    if isinstance(value, Image.Image):
        return value.convert(mode)
    if isinstance(value, np.ndarray):
        single = 3 if mode == "RGB" else 2
        array = value[0] if value.ndim == single + 1 and len(value) == 1 else value
        if array.ndim == single and (mode != "RGB" or array.shape[-1] == 3):
            pixels = np.round(unit_floats(array, what) * 255).astype(np.uint8)
            return Image.fromarray(pixels, mode)
    raise InvalidArgumentError(f"mask_crop takes one {what}, for the whole batch: a PIL image or an array")


@dataclass(frozen=True)
class MaskCrop:
    """The original image and mask of an inpainting that repaints only the mask's box, and that box."""

    padding: int
    box: Box
    original: Image.Image  # RGB
    mask: Image.Image  # L: white repaints

    @classmethod
    def around(cls, image: object, mask: object, padding: int, width: int, height: int) -> MaskCrop:
        """The crop for inpainting ``image`` under ``mask`` (one each, the same size; see
        :func:`single_image`) at ``width`` x ``height``."""
        if isinstance(padding, bool) or not isinstance(padding, (int, np.integer)) or padding < 0:
            raise InvalidArgumentError(f"mask_crop must be a whole number of pixels >= 0, got {padding!r}")
        image, mask = single_image(image, "RGB", "image"), single_image(mask, "L", "mask")
        if image.size != mask.size:
            raise InvalidArgumentError(
                f"mask_crop: the mask ({mask.width}x{mask.height}) must be the image's size "
                f"({image.width}x{image.height}), whose box it marks"
            )
        return cls(int(padding), crop_box(mask, width, height, int(padding)), image, mask)

    def inputs(self, width: int, height: int) -> tuple[Image.Image, Image.Image]:
        """The image and the mask inside the box, each resized to ``width`` x ``height`` (``fill_resize``)."""
        return (
            fill_resize(self.original.crop(self.box), width, height),
            fill_resize(self.mask.crop(self.box), width, height),
        )

    def paste(self, images: np.ndarray) -> np.ndarray:
        """Generated images (B, h, w, 3) in [0, 1] laid back into the box of the original (``cover_resize``),
        over it where the mask repaints, blended by the mask's grey levels: float32 (B, H, W, 3) in [0, 1]
        at the original's size."""
        left, top, right, bottom = self.box
        keep = ImageOps.invert(self.mask)
        pasted = []
        for generated in to_pil(images):
            canvas = Image.new("RGB", self.original.size)  # black outside the box, as diffusers' is
            canvas.paste(cover_resize(generated, right - left, bottom - top), (left, top))
            pasted.append(Image.composite(self.original, canvas, keep))
        return image_array(pasted, self.original.height, self.original.width)
