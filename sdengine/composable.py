"""Composable prompts, in the AUTOMATIC1111 web UI's syntax: ``a castle AND a dragon :0.7``.

``AND`` (a word of its own, in capitals) splits a prompt into parts, and a part may end with ``:WEIGHT``
(default 1). Each part is its own prompt in the UNet's batch, beside the negative one, and the guided noise
prediction sums each part's pull away from the negative side (Liu et al. 2022, "Compositional Visual
Generation with Composable Diffusion Models"; the web UI's ``CFGDenoiser.combine_denoised``)::

    eps = uncond + guidance * sum_k weight_k * (cond_k - uncond)

so the UNet runs on 1 + K copies of the batch instead of 2. One part of weight 1 is plain classifier-free
guidance, and runs as such. As in the web UI, a part's weight is read wherever a prompt in its syntax ends
with a colon and a number, ``AND`` or not (``"a cat :0.5"`` guides half as hard towards "a cat"), each part
keeps its own weights and edits (``(red:1.2)``, ``[cat:dog:0.5]``), negative prompts are never split, and
the UNet runs on the negative side even at a guidance scale of 1 or less.

Images of one batch may have different numbers of parts: the shorter ones are padded with empty parts of
weight 0, which pull nowhere.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

#: The separator (the web UI's ``prompt_parser.re_AND``).
AND = re.compile(r"\bAND\b")
#: A part and its weight (the web UI's ``prompt_parser.re_weight``): the text, then optionally ``:number``.
PART = re.compile(r"^(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.DOTALL)

Parts = tuple[tuple[str, float], ...]


def prompt_parts(prompt: str) -> Parts:
    """``prompt``'s parts as the web UI reads them: ``"a castle AND a dragon :0.7"`` ->
    ``(("a castle", 1.0), (" a dragon", 0.7))``."""
    parts = []
    for part in AND.split(prompt):
        match = PART.match(part)
        assert match is not None  # every string matches: the weight is optional
        text, weight = match.groups()
        parts.append((text, 1.0 if weight is None else float(weight)))
    return tuple(parts)


def composable_parts(prompts: Sequence[str]) -> tuple[Parts, ...]:
    """Each prompt's parts, or ``()`` where every prompt is one part of weight 1 (plain guidance)."""
    parts = tuple(prompt_parts(p) for p in prompts)
    return () if all(len(p) == 1 and p[0][1] == 1.0 for p in parts) else parts


def part_count(parts: Sequence[Parts]) -> int:
    """K: the most parts any image has."""
    return max(len(p) for p in parts)


def part_texts(parts: Sequence[Parts]) -> list[str]:
    """The texts of the parts in the UNet's batch order: every image's first part, then every image's
    second... (empty where an image has fewer parts)."""
    return [p[k][0] if k < len(p) else "" for k in range(part_count(parts)) for p in parts]


def part_weights(parts: Sequence[Parts]) -> np.ndarray:
    """(K, B, 1, 1, 1) float32: each part's weight, for each image (0 where it has fewer parts), shaped to
    scale the parts' noise predictions (K, B, C, h, w)."""
    weights = [[p[k][1] if k < len(p) else 0.0 for p in parts] for k in range(part_count(parts))]
    return np.array(weights, np.float32).reshape(len(weights), len(parts), 1, 1, 1)
