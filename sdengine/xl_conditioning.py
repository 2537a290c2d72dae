"""SDXL's conditioning besides the text embeddings, as diffusers' SDXL pipelines make it.

An SDXL UNet takes, beside the two text encoders' states side by side, the second encoder's pooled and
projected embeddings (``text_embeds``) and six size numbers (``time_ids``): the original image's height and
width, the crop's top-left corner and the target height and width. sdengine conditions on the size it makes
(original = target = the image's size, no crop), as diffusers does by default. Both are constant over a run,
so they reach the UNet as constant inputs of the step (``DenoisePlan.unet_constants``), on every backend;
where prompts are edited part way, the step model hands each call its set's pooled embeddings with its text
embeddings (``sdengine.step_graph``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdengine.errors import InvalidArgumentError
from sdengine.model_specs import TEXT_EMBEDS, TIME_IDS

Pair = tuple[int, int]
#: SDXL's refiner: the aesthetic scores of the positive and the negative side (diffusers' defaults).
AESTHETIC_SCORES = {False: 6.0, True: 2.5}


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's size conditioning where it is given (diffusers' ``original_size``, ``crops_coords_top_left``,
    ``target_size`` and their ``negative_`` counterparts), as (height, width) and (top, left) pairs. Unset
    sizes are the image's, the crop corner (0, 0), and each negative one its positive counterpart."""

    original_size: Pair | None = None
    crop_top_left: Pair = (0, 0)
    target_size: Pair | None = None
    negative_original_size: Pair | None = None
    negative_crop_top_left: Pair | None = None
    negative_target_size: Pair | None = None

    def time_ids(
        self, height: int, width: int, negative: bool = False, aesthetic: bool = False
    ) -> np.ndarray:
        """The six numbers (6,) float32 for an image of ``height`` x ``width``, on the negative side of
        guidance or the positive one; ``aesthetic`` (SDXL's refiner): five, the aesthetic score (diffusers'
        defaults, :data:`AESTHETIC_SCORES`) in place of the target size."""
        image = (height, width)
        original, crop, target = self.original_size or image, self.crop_top_left, self.target_size or image
        if negative:
            original = self.negative_original_size or original
            crop = self.negative_crop_top_left or crop
            target = self.negative_target_size or target
        last = (AESTHETIC_SCORES[negative],) if aesthetic else target
        return np.array([*original, *crop, *last], np.float32)

    def parameters(self) -> dict[str, list[int]]:
        """The settings given, as a PNG records them."""
        return {
            k: list(v) for k, v in vars(self).items() if v is not None and (k != "crop_top_left" or any(v))
        }

    @property
    def given(self) -> bool:
        return bool(self.parameters())


def size_conditioning(**settings: Any) -> SizeConditioning:
    """Checked size conditioning: each setting a pair of whole numbers, sizes >= 1 and crop corners >= 0."""
    checked = {}
    for name, value in settings.items():
        if value is None:
            continue
        least = 0 if "crop" in name else 1
        if (
            not isinstance(value, Sequence)
            or isinstance(value, str)
            or len(value) != 2
            or not all(
                isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= least for v in value
            )
        ):
            raise InvalidArgumentError(f"{name} must be two whole numbers >= {least}, got {value!r}")
        checked[name] = (int(value[0]), int(value[1]))
    return SizeConditioning(**checked)


def xl_unet_inputs(
    pooled: np.ndarray,
    height: int,
    width: int,
    sizes: SizeConditioning,
    copies: int,
    negative: bool,
    aesthetic: bool = False,
) -> dict[str, np.ndarray]:
    """The UNet's added inputs for a run whose batch of ``copies`` * B (the negatives first where
    ``negative``: classifier-free guidance) has these pooled text embeddings (G * B, pooled);
    ``aesthetic``: the refiner's numbers (:meth:`SizeConditioning.time_ids`)."""
    batch = len(pooled) // copies
    rows = [sizes.time_ids(height, width, True, aesthetic)] * batch if negative else []
    rows += [sizes.time_ids(height, width, False, aesthetic)] * batch * (copies - int(negative))
    return {TEXT_EMBEDS: pooled, TIME_IDS: np.stack(rows)}


def zero_negatives(contexts: np.ndarray, pooled: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Every set's embeddings (sets, G * B, ...) and pooled embeddings (sets, G * B, pooled) with the negative
    side (the first ``batch`` texts) zero: SDXL's reading of "no negative prompt"
    (``force_zeros_for_empty_prompt``)."""
    contexts, pooled = contexts.copy(), pooled.copy()
    contexts[:, :batch] = 0.0
    pooled[:, :batch] = 0.0
    return contexts, pooled
