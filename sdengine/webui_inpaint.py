"""Inpainting as the AUTOMATIC1111 web UI's API asks for it (``/sdapi/v1/img2img`` with a ``mask``): its mask
preparation, its masked-content fill and its overlay, around one ordinary inpainting call of the pipeline.

The web UI's fields, and what each does here, in the web UI's order:

- ``mask`` (base64): white repaints. Its alpha channel, where it has one that is not opaque everywhere, is
  the mask; otherwise its grey levels. Either way it is made black or white at 128 (above repaints).
- ``inpainting_mask_invert`` (0): 1 repaints the black part instead.
- ``mask_blur_x``/``mask_blur_y`` (4, 4; ``mask_blur`` sets both): a Gaussian blur of that standard deviation
  in pixels, across then down (:func:`blur`). The blurred edge softens where the result is laid over the
  original; the generation itself repaints where the blurred mask is at least half white.
- ``inpaint_full_res`` (True, "Only masked") with ``inpaint_full_res_padding`` (0): only the mask's box,
  grown by the padding and then to the aspect ratio of ``width`` x ``height``, is cut out, repainted at that
  size and put back into the original at the original's size (:class:`sdengine.mask_crop.MaskCrop`, the
  same rules). False ("Whole picture"): the image and the mask are brought to ``width`` x ``height`` as the
  request's ``resize_mode`` says (stretched, by default).
- ``inpainting_fill`` (0): 0 "fill" first paints the masked part with the colours around it
  (:func:`fill`), 1 "original" keeps what is there; 2 "latent noise" and 3 "latent nothing" start the
  masked part's latents from the seed's noise or from zeros, before they are noised to the first step (the
  pipeline's ``masked_content``), as the web UI replaces them; at denoising strength 1 every run starts from
  noise alone, so they change nothing there.
- The result is laid over the original through the blurred mask, so what the mask keeps is the original's
  own pixels; "Whole picture" lays it through the mask at twice its strength, as the web UI does.

What differs from the web UI: the repainting itself is diffusers' inpainting, the same call as
``pipeline(image=..., mask=...)``: the latents outside the mask are the image's own, noised to each step,
where the web UI blends its sampler's denoised estimate with the unnoised image; and the mask reaches the
latents' size by nearest-neighbour sampling of the full-size mask, where the web UI resizes and rounds it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from sdengine.errors import InvalidArgumentError
from sdengine.mask_crop import MaskCrop

#: How an image is brought to the size generated: (image, width, height) -> image.
Resize = Callable[[Image.Image, int, int], Image.Image]
#: The web UI's masked-content options: two in pixels, two in latent space (the pipeline's ``masked_content``)
FILLS = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}
#: The passes of the masked-content fill, broadest first: (blur radius in pixels, times laid over).
FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))


def binary_mask(image: Image.Image) -> Image.Image:
    """The web UI's reading of a mask image: its alpha channel where that is not opaque everywhere, else
    its grey levels, then 255 above 128 and 0 elsewhere ("L")."""
    alpha = image.getchannel("A") if "A" in image.getbands() else None
    levels = alpha if alpha is not None and alpha.getextrema() != (255, 255) else image.convert("L")
    return Image.fromarray(np.where(np.asarray(levels) > 128, 255, 0).astype(np.uint8), "L")


def gaussian_taps(sigma: float) -> np.ndarray:
    """The Gaussian of standard deviation ``sigma`` the web UI blurs masks with, as OpenCV applies it to
    8-bit images: ``2 * int(2.5 * sigma + 0.5) + 1`` taps (the size the web UI asks for), in 256ths
    (int64). Each tap is rounded from the edges inwards, the rounding error carried to the next, and the
    centre tap takes what makes them sum to 256."""
    half = int(2.5 * sigma + 0.5)
    curve = np.exp(-(np.arange(-half, half + 1, dtype=np.float64) ** 2) / (2 * sigma**2))
    curve /= curve.sum()
    taps, carried = np.zeros(2 * half + 1, np.int64), 0.0
    for i in range(half):
        exact = curve[i] * 256 + carried
        taps[i] = taps[-1 - i] = round(exact)
        carried = exact - taps[i]
    taps[half] = 256 - 2 * taps[:half].sum()
    return taps


def _blur_axis(levels: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """uint8 ``levels`` blurred along one axis in OpenCV's fixed point (:func:`gaussian_taps`, the sum
    rounded to the nearest level), the border mirrored without repeating its edge pixel (OpenCV's
    default)."""
    taps = gaussian_taps(sigma)
    half, length = len(taps) // 2, levels.shape[axis]
    widths = [(0, 0), (0, 0)]
    widths[axis] = (half, half)
    padded = np.pad(levels.astype(np.int64), widths, mode="reflect")
    total = np.zeros(levels.shape, np.int64)
    for offset, tap in enumerate(taps):
        total += tap * np.take(padded, np.arange(offset, offset + length), axis=axis)
    return ((total + 128) >> 8).astype(np.uint8)


def blur(mask: Image.Image, sigma_x: float, sigma_y: float) -> Image.Image:
    """``mask`` ("L") blurred across by ``sigma_x`` and then down by ``sigma_y`` pixels (0: not), each pass
    rounded to whole levels, as the web UI's two OpenCV calls do, and equal to them level for level (checked
    against OpenCV 4.10 and 5.0; ``tests/test_webui_inpaint.py`` compares with the OpenCV that the dev extra
    installs). Written with numpy so that the runtime need not depend on OpenCV, a large package, for two
    one-dimensional convolutions."""
    levels = np.asarray(mask.convert("L"))
    if sigma_x > 0:
        levels = _blur_axis(levels, sigma_x, axis=1)
    if sigma_y > 0:
        levels = _blur_axis(levels, sigma_y, axis=0)
    return Image.fromarray(levels, "L")


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """``image`` with its masked part painted with the colours around it (the web UI's masked content
    "fill"): the image's kept part, weighted by how much the mask keeps, is blurred at each radius of
    :data:`FILL_PASSES` and laid over the passes before, broadest first, so that far into the mask the
    colour is a broad average and near its edge the local one; the last pass (radius 0) lays the kept part
    itself on top. The blur is PIL's on premultiplied 8-bit colour, as the web UI's; the layering is done in
    floats here, where the web UI rounds each layer to 8 bits, so the two differ by up to 4 levels (under
    half a level on average, on the images tried)."""
    keep = Image.fromarray(255 - np.asarray(mask.convert("L")), "L")
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=keep)
    colour = np.zeros((image.height, image.width, 3))  # premultiplied, over a transparent start
    alpha = np.zeros((image.height, image.width, 1))
    for radius, times in FILL_PASSES:
        layer = np.asarray(kept.filter(ImageFilter.GaussianBlur(radius)), np.float64) / 255
        for _ in range(times):
            colour = layer[..., :3] + colour * (1 - layer[..., 3:])
            alpha = layer[..., 3:] + alpha * (1 - layer[..., 3:])
    straight = np.divide(colour, alpha, out=np.zeros_like(colour), where=alpha > 0)
    return Image.fromarray(np.clip(np.rint(straight * 255), 0, 255).astype(np.uint8), "RGB")


def stretch(image: Image.Image, width: int, height: int) -> Image.Image:
    """``image`` resized (Lanczos) to ``width`` x ``height``, its aspect ratio not kept (the web UI's "Just
    resize")."""
    return image.resize((width, height), Image.Resampling.LANCZOS)


def _whole(body: dict[str, Any], key: str, default: int) -> int:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 0:
        raise InvalidArgumentError(f"{key} must be a whole number >= 0, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class WebUIInpaint:
    """One web UI inpainting request's mask settings (see the module's docstring), and the crop or overlay
    that puts its results back over the original."""

    mask: Image.Image  # "L", the original's size: read, inverted if asked, blurred
    blur_x: int
    blur_y: int
    fill: int  # a key of FILLS
    full_res: bool
    padding: int
    invert: bool

    @classmethod
    def from_body(cls, body: dict[str, Any], mask: Image.Image) -> WebUIInpaint:
        """The settings of a web UI request ``body`` whose decoded ``mask`` image is given.
        InvalidArgumentError names a field out of range or a masked content not done here."""
        blur_x = _whole(body, "mask_blur_x", 4)
        blur_y = _whole(body, "mask_blur_y", 4)
        if body.get("mask_blur") is not None:
            blur_x = blur_y = _whole(body, "mask_blur", 4)
        masked_content = _whole(body, "inpainting_fill", 0)
        if masked_content not in FILLS:
            raise InvalidArgumentError(
                "inpainting_fill must be 0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing), "
                f"got {masked_content}"
            )
        invert = body.get("inpainting_mask_invert")
        if invert not in (None, 0, 1):  # True and False are 1 and 0
            raise InvalidArgumentError(f"inpainting_mask_invert must be 0 or 1, got {invert!r}")
        invert = bool(invert)
        read = binary_mask(mask)
        if invert:
            read = Image.fromarray(255 - np.asarray(read), "L")
        if not np.asarray(read).any():
            raise InvalidArgumentError(
                "mask: it repaints nothing (black everywhere); send no mask for img2img"
            )
        full_res = body.get("inpaint_full_res", True)
        return cls(
            mask=blur(read, blur_x, blur_y),
            blur_x=blur_x,
            blur_y=blur_y,
            fill=masked_content,
            full_res=True if full_res is None else bool(full_res),
            padding=_whole(body, "inpaint_full_res_padding", 0),
            invert=invert,
        )

    def prepare(
        self, image: Image.Image, width: int, height: int, resize: Resize = stretch
    ) -> tuple[MaskCrop, Image.Image, Image.Image]:
        """For inpainting ``image`` at ``width`` x ``height``: where the results go (the mask's box of the
        original, "Only masked", or the whole original brought to that size by ``resize``, "Whole picture",
        with the mask they are laid over it through: :meth:`MaskCrop.paste`), and the image and mask of the
        pipeline's inpainting call, the image's masked part filled first where ``inpainting_fill`` is 0."""
        if self.full_res:
            if image.size != self.mask.size:
                raise InvalidArgumentError(
                    f"mask: {self.mask.width}x{self.mask.height}, but the init image is {image.width}x"
                    f"{image.height}; with inpaint_full_res they must be the same size"
                )
            placement = MaskCrop.around(image, self.mask, self.padding, width, height)
            image, mask = placement.inputs(width, height)
        else:
            size = (width, height)
            image, mask = (p if p.size == size else resize(p, width, height) for p in (image, self.mask))
            overlay = np.clip(np.asarray(mask, np.float32) * 2, 0, 255).astype(np.uint8)
            placement = MaskCrop(0, (0, 0, width, height), image, Image.fromarray(overlay, "L"))
        return placement, fill(image, mask) if self.fill == 0 else image, mask

    @property
    def masked_content(self) -> str:
        """The pipeline's ``masked_content``: the latent fills', and "original" for the two in pixels."""
        return FILLS[self.fill] if self.fill >= 2 else "original"

    def fields(self) -> dict[str, Any]:
        """These settings under the web UI's request field names."""
        return {
            "mask_blur_x": self.blur_x,
            "mask_blur_y": self.blur_y,
            "inpainting_fill": self.fill,
            "inpaint_full_res": self.full_res,
            "inpaint_full_res_padding": self.padding,
            "inpainting_mask_invert": int(self.invert),
        }

    def parameters(self, placement: MaskCrop) -> dict[str, Any]:
        """What a PNG records of these settings: :meth:`fields`, and the box repainted ("Only masked")."""
        return {**self.fields(), **({"inpaint_box": list(placement.box)} if self.full_res else {})}

    def generation_params(self) -> dict[str, Any]:
        """The web UI's ``extra_generation_params`` for these settings (:func:`infotext_fields`)."""
        return infotext_fields(self.fields())


def infotext_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Inpainting settings under the web UI's request field names (:meth:`WebUIInpaint.fields`, or a PNG's
    record of them) as its infotext names them, those that say nothing left out."""
    blur_x, blur_y, full_res = fields["mask_blur_x"], fields["mask_blur_y"], fields["inpaint_full_res"]
    named = {
        "Mask blur": blur_x if blur_x == blur_y else f"{blur_x}x{blur_y}",
        "Masked content": FILLS[fields["inpainting_fill"]],
        "Inpaint area": "Only masked" if full_res else "Whole picture",
        "Only masked padding, pixels": fields["inpaint_full_res_padding"] if full_res else None,
        "Mask mode": "Inpaint not masked" if fields["inpainting_mask_invert"] else None,
    }
    return {name: value for name, value in named.items() if value is not None}
