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

import numpy as np

from sdengine.model_specs import TEXT_EMBEDS, TIME_IDS


def size_conditioning(height: int, width: int, rows: int) -> np.ndarray:
    """``time_ids`` (rows, 6) float32 for images of ``height`` x ``width``: original size, crop corner (0, 0),
    target size."""
    return np.tile(np.array([height, width, 0, 0, height, width], np.float32), (rows, 1))


def xl_unet_inputs(pooled: np.ndarray, height: int, width: int) -> dict[str, np.ndarray]:
    """The UNet's added inputs for a run whose batch (negatives first with guidance) has these pooled text
    embeddings (G * B, pooled)."""
    return {TEXT_EMBEDS: pooled, TIME_IDS: size_conditioning(height, width, len(pooled))}


def zero_negatives(contexts: np.ndarray, pooled: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Every set's embeddings (sets, G * B, ...) and pooled embeddings (sets, G * B, pooled) with the negative
    side (the first ``batch`` texts) zero: SDXL's reading of "no negative prompt"
    (``force_zeros_for_empty_prompt``)."""
    contexts, pooled = contexts.copy(), pooled.copy()
    contexts[:, :batch] = 0.0
    pooled[:, :batch] = 0.0
    return contexts, pooled
