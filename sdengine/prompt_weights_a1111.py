"""Prompt weighting in the AUTOMATIC1111 web UI's syntax, with its arithmetic: ``(red cat:1.3)``, ``(dog)``,
``[blue]``, ``BREAK``.

The syntax, as the web UI reads it (``modules/prompt_parser.py``, ``parse_prompt_attention``): ``(text)``
multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by 1.1, ``(text:1.3)`` multiplies it by 1.3;
groups nest and multiply; a group still open at the end of the prompt applies to everything after its
opening; a closing bracket with nothing open, and a colon that does not end a weighted group, are text;
``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are literal (a lone backslash is dropped);
neighbouring text of equal weight is one fragment. ``BREAK`` (a word of its own, in capitals) ends the
current window of 75 tokens. ``AND`` (a word of its own, in capitals) splits the web UI's prompt into parts
whose noise predictions guidance combines (composable prompts: :mod:`sdengine.composable`, which splits
them before this module reads each part). In a negative prompt the web UI reads ``AND`` as text, and so does
sdengine.

The arithmetic (the web UI's default "Original" emphasis): each window of 75 tokens is encoded, each token's
embedding multiplied by its weight, and the window rescaled so that its mean is what it was before. The web
UI takes that mean over all the prompts of a batch together; here each prompt's own is taken, so that an
image of a batch is the image its prompt makes alone (as every other setting of sdengine keeps it).

Windows fill as the web UI fills them: a window that is full breaks after its last comma instead where that
comma is among its last 20 tokens, and the tokens after it open the next window. The web UI always reads
every window; here ``long_prompts`` does, and without it the prompt is cut after its first window, with a
warning, as plain prompts are.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import numpy as np

from sdengine.errors import InvalidArgumentError

#: The fragment that stands for ``BREAK``: it has no weight, it only closes a window.
BREAK = ("BREAK", -1.0)
ROUND, SQUARE = 1.1, 1 / 1.1
#: How far back from a full window's end a comma may lie and still end the window (the web UI's
#: ``comma_padding_backtrack`` setting, 20 by default).
COMMA_BACKTRACK = 20

#: The syntax's tokens: escapes, brackets, a group's closing weight, and runs of plain text.
_TOKENS = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
log = logging.getLogger("sdengine")


def parse_a1111(prompt: str) -> list[tuple[str, float]]:
    """``prompt``'s fragments and their weights, as the web UI parses them, with :data:`BREAK` where the
    prompt says ``BREAK``: ``"an (important) word"`` -> ``[("an ", 1.0), ("important", 1.1),
    (" word", 1.0)]``."""
    fragments: list[list] = []  # [text, weight] pairs, weights multiplied in place as groups close
    open_round: list[int] = []  # where each open group's fragments start
    open_square: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= factor

    for match in _TOKENS.finditer(prompt):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            fragments.append([token[1:], 1.0])  # a lone backslash is dropped, as the web UI drops it
        elif token == "(":
            open_round.append(len(fragments))
        elif token == "[":
            open_square.append(len(fragments))
        elif weight is not None and open_round:
            try:
                factor = float(weight)
            except ValueError:
                raise InvalidArgumentError(f"{weight!r} is not a weight, in {prompt!r}") from None
            multiply(open_round.pop(), factor)
        elif token == ")" and open_round:
            multiply(open_round.pop(), ROUND)
        elif token == "]" and open_square:
            multiply(open_square.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    fragments.append(list(BREAK))
                fragments.append([part, 1.0])
    for start in open_round:
        multiply(start, ROUND)
    for start in open_square:
        multiply(start, SQUARE)
    merged: list[tuple[str, float]] = []
    for text, weight in fragments or [["", 1.0]]:
        if merged and merged[-1][1] == weight and (text, weight) != BREAK and merged[-1] != BREAK:
            merged[-1] = (merged[-1][0] + text, weight)
        else:
            merged.append((text, weight))
    return merged


def a1111_windows(
    fragments: list[tuple[str, float]],
    token_ids: Callable[[str], list[int]],
    specials: tuple[int, int, int],
    comma: int,
    window: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Token windows (n, window + 2) with BOS, EOS and padding, and each token's weight (1 for the markers
    and padding), filled as the web UI fills them: ``BREAK`` closes a window; a full window whose last comma
    lies within :data:`COMMA_BACKTRACK` tokens of its end breaks after that comma, and the rest moves on.
    The padding follows the EOS, as the web UI lays out a tokenizer whose pad token is not its EOS (SD 2.x's
    and SDXL's second, ``!``), which is where the pooled output is read."""
    bos, eos, pad = specials
    windows: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, weights, last_comma
        padding = window - len(ids)
        windows.append(([bos, *ids, eos, *[pad] * padding], [1.0, *weights, 1.0, *[1.0] * padding]))
        ids, weights, last_comma = [], [], -1

    for text, weight in fragments:
        if (text, weight) == BREAK:
            close()
            continue
        for token in token_ids(text):
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == window and last_comma != -1 and len(ids) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                moved = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                close()
                ids, weights = list(moved[0]), list(moved[1])
            if len(ids) == window:
                close()
            ids.append(token)
            weights.append(weight)
    if ids or not windows:
        close()
    return np.array([w[0] for w in windows], np.int64), np.array([w[1] for w in windows], np.float32)


def a1111_embeddings(
    fragments: list[tuple[str, float]],
    token_ids: Callable[[str], list[int]],
    encode: Callable[[np.ndarray], np.ndarray],
    specials: tuple[int, int, int],
    comma: int,
    window: int,
    long: bool,
) -> np.ndarray:
    """One prompt's text embeddings (windows * (window + 2), hidden) from its weighted ``fragments``:
    each window's embeddings multiplied by their tokens' weights, then rescaled to the window's own mean.
    ``comma``: the comma's token id; ``long``: every window, else only the first."""
    ids, weights = a1111_windows(fragments, token_ids, specials, comma, window)
    if not long and len(ids) > 1:
        log.warning("a weighted prompt is longer than the text encoder's window: the rest of it is ignored")
        ids, weights = ids[:1], weights[:1]
    z = encode(ids).astype(np.float64)
    mean = z.mean(axis=(1, 2), keepdims=True)
    z *= weights[..., None]
    z *= mean / z.mean(axis=(1, 2), keepdims=True)
    return z.astype(np.float32).reshape(-1, z.shape[-1])
