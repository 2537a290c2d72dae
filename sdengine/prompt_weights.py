"""Prompt weighting in compel's syntax, with compel's arithmetic: ``(red cat)1.3``, ``dog+``, ``(blue)--``.

compel is the library diffusers' documentation weights prompts with; this module reads its syntax and makes
its embeddings with sdengine's text encoder, without torch. A ``+`` multiplies a word's (or a group's) weight
by 1.1, a ``-`` by 0.9, a number after a group sets it; groups nest and multiply; ``\\(`` is a literal
parenthesis, and a prompt whose parentheses do not balance is read as plain text, as compel reads it.
Neighbouring text of equal weight forms one fragment.

The arithmetic (compel's ``EmbeddingsProvider``): each token's embedding moves away from the empty prompt's
by its weight, ``empty + (z - empty) * weight`` (untouched where the weight is 1); each fragment weighted
below 1 is then blended out: the prompt is encoded again without it, and the embeddings are averaged with
weights 1 and ``tan((1 - weight) * pi / 2)``. That is compel's ``DownweightMode.REMOVE``; its default masks
the fragment's tokens instead, through an attention mask that exported text encoders do not take.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable

import numpy as np

from sdengine.errors import InvalidArgumentError

#: A word with a weight suffix: ``cat+``, ``hello-world--`` (the suffix must end the word).
_WEIGHTED_WORD = re.compile(r"([^\s()+\-,.;:!?]+(?:-[^\s()+\-,.;:!?]+)*)(\++|-+)(?=[\s,.;:!?()]|$)")
#: What may follow a closing parenthesis: pluses, minuses or a number.
_GROUP_WEIGHT = re.compile(r"\++|-+|\d+\.\d*|\.\d+|\d+")
#: compel's operators, which this module does not read: refused rather than read as words.
_UNSUPPORTED = re.compile(r"\)\.(blend|and|swap)\(")
log = logging.getLogger("sdengine")


def _suffix_weight(suffix: str) -> float:
    return 1.1 ** len(suffix) if suffix[0] == "+" else 0.9 ** len(suffix)


def _balanced(prompt: str) -> bool:
    depth = 0
    for match in re.finditer(r"\\[()]|[()]", prompt):
        if match.group() in "()":
            depth += 1 if match.group() == "(" else -1
            if depth < 0:
                return False
    return depth == 0


def _plain(text: str) -> list[tuple[str, float]]:
    """Unparenthesised text: its weighted words, and the text between them at weight 1."""
    pieces, start = [], 0
    for match in _WEIGHTED_WORD.finditer(text):
        pieces += [(text[start : match.start()], 1.0), (match.group(1), _suffix_weight(match.group(2)))]
        start = match.end()
    return [*pieces, (text[start:], 1.0)]


def parse_weighted(prompt: str) -> list[tuple[str, float]]:
    """``prompt``'s fragments and their weights, neighbours of equal weight merged (as compel's parser
    gives them): ``"a (red cat)1.3 dog+"`` -> ``[("a", 1.0), ("red cat", 1.3), ("dog", 1.1)]``."""
    if _UNSUPPORTED.search(prompt):
        raise InvalidArgumentError(f"compel's .blend(), .and() and .swap() are not supported: {prompt!r}")
    if not _balanced(prompt):
        return [(prompt.replace("\\(", "(").replace("\\)", ")"), 1.0)]
    stack: list[list[tuple[str, float]]] = [[]]
    position = 0
    for match in re.finditer(r"(?<!\\)[()]", prompt):
        text = prompt[position : match.start()].replace("\\(", "(").replace("\\)", ")")
        stack[-1] += _plain(text)
        position = match.end()
        if match.group() == "(":
            stack.append([])
            continue
        weight_spec = _GROUP_WEIGHT.match(prompt, position)
        weight = 1.0
        if weight_spec:
            spec = weight_spec.group()
            weight = _suffix_weight(spec) if spec[0] in "+-" else float(spec)
            position = weight_spec.end()
        group = stack.pop()
        stack[-1] += [(text, w * weight) for text, w in group]
    stack[-1] += _plain(prompt[position:].replace("\\(", "(").replace("\\)", ")"))
    merged: list[tuple[str, float]] = []
    for text, weight in stack[0]:
        text = " ".join(text.split())
        if not text:
            continue
        if merged and merged[-1][1] == weight:
            merged[-1] = (f"{merged[-1][0]} {text}", weight)
        else:
            merged.append((text, weight))
    return merged


def _windows(
    ids: list[int], weights: list[float], bos: int, eos: int, pad: int, size: int, count: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Token windows (n, size + 2) with BOS, EOS and padding, and each token's weight (1 for the markers);
    ``count``: cut to that many windows (1: what fits, as a prompt is cut off without long prompts)."""
    starts = list(range(0, len(ids), size)) or [0]
    if count is not None:
        starts = starts[:count]
    rows, row_weights = [], []
    for start in starts:
        chunk, chunk_weights = ids[start : start + size], weights[start : start + size]
        padding = size - len(chunk)
        rows.append([bos, *chunk, eos] + [pad] * padding)
        row_weights.append([1.0, *chunk_weights, 1.0] + [1.0] * padding)
    return np.array(rows, np.int64), np.array(row_weights, np.float32)


def weighted_embeddings(
    fragments: list[tuple[str, float]],
    token_ids: Callable[[str], list[int]],
    encode: Callable[[np.ndarray], np.ndarray],
    specials: tuple[int, int, int],
    window: int,
    long: bool,
    empty: np.ndarray,
) -> np.ndarray:
    """One prompt's text embeddings (windows * (window + 2), hidden) from its weighted ``fragments``.
    ``token_ids``: a text's tokens without markers; ``encode``: token windows (n, window + 2) -> their
    embeddings; ``specials``: the BOS, EOS and pad ids; ``long``: every window, else only the first;
    ``empty``: the empty prompt's window's embeddings (window + 2, hidden), encoded once for a whole run."""
    bos, eos, pad = specials
    count = None if long else 1
    tokens = [token_ids(text) for text, _ in fragments]
    if not long and sum(map(len, tokens)) > window:  # as the plain path does: say so, and go on
        log.warning("a weighted prompt is longer than the text encoder's window: the rest of it is ignored")

    def embed(keep: list[int], windows: int | None) -> np.ndarray:
        ids = [t for i in keep for t in tokens[i]]
        weights = [fragments[i][1] for i in keep for _ in tokens[i]]
        rows, row_weights = _windows(ids, weights, bos, eos, pad, window, windows)
        z = encode(rows)
        w = row_weights[..., None]
        z = np.where(w == 1, z, empty + (z - empty) * w)
        if windows is not None and len(z) < windows:  # fewer windows without a fragment: the empty prompt's
            z = np.concatenate([z, np.broadcast_to(empty, (windows - len(z), *empty.shape))])
        return z.reshape(-1, z.shape[-1])

    base = embed(list(range(len(fragments))), count)
    blended, total = base.astype(np.float64), 1.0
    windows = len(base) // (window + 2)
    for index, (_, weight) in enumerate(fragments):
        if weight < 1:
            lerp = math.tan((1.0 - max(weight, 1e-5)) * math.pi / 2)
            others = [i for i in range(len(fragments)) if i != index]
            blended += lerp * embed(others, windows)
            total += lerp
    return (blended / total).astype(np.float32)
