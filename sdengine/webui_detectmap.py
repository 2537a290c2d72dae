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
brightest above 240) is made two-coloured again after it: its channels' mean cut at Otsu's threshold; and
where it is mostly one-pixel edges (a 3x3 opening removes more than half of its bright pixels), first
thinned as the extension thins it: a non-maximum suppression along the four directions, then, after the
threshold, Lvmin Zhang's edge thinning (repeated removal of eight 3x3 hit-or-miss patterns, and when
enlarging one pass of eight pruning patterns; :func:`thin_edges`), so that enlarged edges stay one pixel
wide. The suppression, the threshold and the thinning are checked equal to OpenCV's operations as the
extension calls them.

The resizes are OpenCV's (``cv2.resize``, as the extension calls it) where OpenCV is installed (the
``webui`` extra): then the whole is the extension's, checked by hand identical to its own
``detectmap_proc`` (run from its source) on 270 maps, photographs, canny edge maps and segmentation maps,
in the three modes at random sizes. Without it, Pillow's filters stand in (area and bicubic weights differ
slightly, so a resized map can differ from the extension's by a level here and there, and an edge map by a
pixel). A control image with transparency is first laid over white, as the extension lays it
(:func:`over_white`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from sdengine.errors import InvalidArgumentError

#: The extension's resize modes, by name (its numbers map onto these: 0, 1, 2)
MAP_RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")


def over_white(image: Image.Image) -> Image.Image:
    """``image`` in RGB, any transparency laid over white as the extension's ``HWC3`` lays it: each level
    ``colour * alpha + 255 * (1 - alpha)``, cut to a whole level."""
    if image.mode == "RGB":
        return image
    if "A" not in image.getbands() and "transparency" not in image.info:
        return image.convert("RGB")
    rgba = np.asarray(image.convert("RGBA"), np.float32)
    alpha = rgba[..., 3:] / 255.0
    return Image.fromarray((rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8))


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
        kind = "nearest"
    elif width * height < pixels.shape[0] * pixels.shape[1]:
        kind = "area"
    else:
        kind = "cubic"
    resized = resize(pixels, width, height, kind)
    if not binary:
        return resized
    grey = np.mean(resized.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
    thin = one_pixel_edges(pixels)
    if thin:
        grey = directional_nms(grey)
    cut = np.where(grey > otsu_threshold(grey), 255, 0).astype(np.uint8)
    if thin:
        cut = thin_edges(cut, prune=width * height > pixels.shape[0] * pixels.shape[1])
    return np.repeat(cut[..., None], 3, axis=2)


#: Pillow's filters standing in for OpenCV's where OpenCV is not installed
PILLOW_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "area": Image.Resampling.BOX,
    "cubic": Image.Resampling.BICUBIC,
}


def resize(pixels: np.ndarray, width: int, height: int, kind: str) -> np.ndarray:
    """``pixels`` (H, W, 3) uint8 at ``width`` x ``height`` by ``kind`` ("nearest", "area", "cubic"):
    OpenCV's ``cv2.resize`` with that interpolation, as the extension calls it, where OpenCV is installed
    (``pip install -e ".[webui]"``), else Pillow's nearest, box and bicubic filters, which differ slightly."""
    try:
        import cv2
    except ImportError:
        return np.asarray(Image.fromarray(pixels).resize((width, height), PILLOW_FILTERS[kind]))
    flags = {"nearest": cv2.INTER_NEAREST, "area": cv2.INTER_AREA, "cubic": cv2.INTER_CUBIC}
    return cv2.resize(np.ascontiguousarray(pixels), (width, height), interpolation=flags[kind])


def _neighbours(image: np.ndarray, fill: int) -> np.ndarray:
    """The 3x3 neighbourhood of every pixel, (3, 3, H, W): ``[i, j]`` holds the pixel ``i - 1`` rows and
    ``j - 1`` columns away, ``fill`` beyond the edges."""
    padded = np.pad(image, 1, constant_values=fill)
    height, width = image.shape
    return np.stack([np.stack([padded[i : i + height, j : j + width] for j in range(3)]) for i in range(3)])


def one_pixel_edges(pixels: np.ndarray) -> bool:
    """Whether a two-colour map is mostly one-pixel edges, as the extension tells: its 3x3 opening (erosion,
    then dilation; OpenCV's, the edges of the image left out) takes away more than half of its bright
    values."""
    eroded = np.stack([_neighbours(c, 255).min(axis=(0, 1)) for c in np.moveaxis(pixels, 2, 0)], axis=2)
    opened = np.stack([_neighbours(c, 0).max(axis=(0, 1)) for c in np.moveaxis(eroded, 2, 0)], axis=2)
    return int(np.count_nonzero(opened < pixels)) * 2 > int(np.count_nonzero(pixels > 127))


#: the four directions of the non-maximum suppression: (row, column) steps either way from a pixel
NMS_DIRECTIONS = ((0, 1), (1, 0), (1, 1), (1, -1))


def directional_nms(grey: np.ndarray) -> np.ndarray:
    """A pixel kept where it is the largest of itself and its two neighbours along any of the four
    directions (horizontal, vertical, both diagonals), zero elsewhere (the extension's ``nake_nms``)."""
    near = _neighbours(grey, 0)
    keep = np.zeros(grey.shape, bool)
    for di, dj in NMS_DIRECTIONS:
        keep |= (near[1 + di, 1 + dj] <= grey) & (near[1 - di, 1 - dj] <= grey)
    return np.where(keep, grey, 0).astype(grey.dtype)


def _rotations(pattern: list[list[int]]) -> list[np.ndarray]:
    base = np.array(pattern, np.int8)
    return [np.rot90(base, k) for k in range(4)]


#: Lvmin Zhang's edge thinning ("High Quality Edge Thinning using Pure Python", sd-webui-controlnet): 3x3
#: hit-or-miss patterns (1: a bright pixel, -1: a dark one, 0: either) whose centres are removed, each in
#: its four rotations: the thinning's two, and the pruning's two (spurs left by enlarging)
THINNING = [
    *_rotations([[-1, -1, -1], [0, 1, 0], [1, 1, 1]]),
    *_rotations([[0, -1, -1], [1, 1, -1], [0, 1, 0]]),
]
THINNING = [THINNING[i] for i in (0, 4, 1, 5, 2, 6, 3, 7)]  # the extension's order: by rotation, then kind
PRUNING = [
    *_rotations([[-1, -1, -1], [-1, 1, -1], [0, 0, -1]]),
    *_rotations([[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]]),
]
PRUNING = [PRUNING[i] for i in (0, 4, 1, 5, 2, 6, 3, 7)]


def _hit_or_miss(binary: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """Where ``pattern`` fits the 0/255 image: its 1s on bright pixels, its -1s on dark ones (beyond the
    image's edges, either fits, as OpenCV's ``MORPH_HITMISS`` has it)."""
    bright, dark = _neighbours(binary > 0, True), _neighbours(binary == 0, True)
    fits = np.ones(binary.shape, bool)
    for (i, j), want in np.ndenumerate(pattern):
        if want == 1:
            fits &= bright[i, j]
        elif want == -1:
            fits &= dark[i, j]
    return fits


def thin_edges(binary: np.ndarray, prune: bool) -> np.ndarray:
    """A 0/255 edge map thinned: each thinning pattern's fits removed in turn, over and over (at most 32
    times) until none fits; then, with ``prune``, one such pass of the pruning patterns."""
    thinned = binary.copy()

    def one_pass(patterns: list[np.ndarray]) -> bool:
        changed = False
        for pattern in patterns:
            fits = _hit_or_miss(thinned, pattern)
            if fits.any():
                thinned[fits] = 0
                changed = True
        return changed

    for _ in range(32):
        if not one_pass(THINNING):
            break
    if prune:
        one_pass(PRUNING)
    return thinned


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
