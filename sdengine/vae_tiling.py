"""Tiled VAE decoding and encoding, as diffusers' ``AutoencoderKL.enable_tiling()`` does it.

A large image is cut into overlapping tiles of the VAE's own training size (its config's ``sample_size``
pixels; ``sample_size / 8`` latents), each tile runs through the model alone, and neighbouring results are
cross-faded linearly over a quarter of a tile, so memory stays that of one tile whatever the image size. The
result differs slightly from a whole-image run (each tile sees only its own context), exactly as diffusers'
does; the tiles, their order and the in-place blending follow diffusers so the two agree.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sdengine.errors import UnsupportedConfigError
from sdengine.model_specs import Architecture

OVERLAP = 0.25  # diffusers' tile_overlap_factor


def check_tileable(arch: Architecture) -> None:
    """Tiling is ``AutoencoderKL``'s: a tiny VAE (``AutoencoderTiny``) is refused, whose own tiling in
    diffusers is another algorithm, and which needs it least (its memory is a fraction of the usual VAE's)."""
    if arch.tiny_vae:
        raise UnsupportedConfigError(
            "VAE tiling is for the usual VAE (AutoencoderKL): this model's is a tiny one (AutoencoderTiny), "
            "which runs whole images in a fraction of the memory; run it without VAE tiling"
        )


def needs_tiles(array: np.ndarray, tile: int) -> bool:
    """Whether ``array`` (B, C, H, W) is larger than one ``tile`` on either side (diffusers' test)."""
    return array.shape[-1] > tile or array.shape[-2] > tile


def run_tiled(
    run: Callable[[np.ndarray], np.ndarray], array: np.ndarray, in_tile: int, out_tile: int
) -> np.ndarray:
    """``run`` over overlapping ``in_tile`` squares of ``array`` (B, C, H, W), whose results are
    ``out_tile`` squares (smaller at the right and bottom edges), blended into one array.

    Tiles start every ``in_tile * 3/4``; each result is blended into the one above and the one to its left
    over ``out_tile / 4`` rows and columns, then cut to ``out_tile * 3/4``. Blending writes into the tiles
    in place, so a tile's blended top rows are what the tile below blends with, as in diffusers.
    """
    stride = int(in_tile * (1 - OVERLAP))
    extent = int(out_tile * OVERLAP)
    keep = out_tile - extent
    rows = [
        [
            np.array(run(array[:, :, i : i + in_tile, j : j + in_tile]))
            for j in range(0, array.shape[3], stride)
        ]
        for i in range(0, array.shape[2], stride)
    ]
    out_rows = []
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if i > 0:
                _blend(rows[i - 1][j], tile, extent, axis=2)
            if j > 0:
                _blend(row[j - 1], tile, extent, axis=3)
        out_rows.append(np.concatenate([tile[:, :, :keep, :keep] for tile in row], axis=3))
    return np.concatenate(out_rows, axis=2)


def _blend(before: np.ndarray, tile: np.ndarray, extent: int, axis: int) -> None:
    """Cross-fade the last ``extent`` rows (axis 2) or columns (axis 3) of ``before`` into the first ones
    of ``tile``, in place: weight y / extent for the tile's own value at offset y."""
    extent = min(before.shape[axis], tile.shape[axis], extent)
    for y in range(extent):
        weight = y / extent
        if axis == 2:
            tile[:, :, y, :] = before[:, :, y - extent, :] * (1 - weight) + tile[:, :, y, :] * weight
        else:
            tile[:, :, :, y] = before[:, :, :, y - extent] * (1 - weight) + tile[:, :, :, y] * weight
