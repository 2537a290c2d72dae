"""A small CLIP-style byte-level BPE vocabulary, generated deterministically in code.

CLIP's real 49,408-token vocabulary cannot be downloaded here, so random test checkpoints ship this stand-in.
It is laid out exactly like CLIP's: ids 0-255 are the 256 byte-level characters, 256-511 the same
characters with the ``</w>`` end-of-word suffix, then one token per merge in merge order, and
``<|startoftext|>`` / ``<|endoftext|>`` as the last two ids. The merges come from a tiny greedy BPE training
run over a fixed list of words common in image prompts, so those words encode to one token each and anything
else falls back to shorter pieces (every byte is in the vocabulary, so no input is ever unknown).
"""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from pathlib import Path

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77

# Words the vocabulary learns whole; the order is irrelevant (training counts pairs over the set).
_PROMPT_TEXT = """
    a an the of on in at with and or by for to from as is it its this that into over under near through
    photo photograph picture image painting drawing sketch illustration render portrait landscape closeup
    cat cats dog dogs horse bird fish lion tiger fox wolf bear owl dragon unicorn robot astronaut man woman
    girl boy child people person knight wizard warrior king queen princess monster creature animal
    riding sitting standing walking flying running wearing holding looking playing reading sleeping
    moon sun sky star stars space planet galaxy cloud clouds rain snow storm ocean sea beach river lake
    mountain mountains forest tree trees flower flowers garden field desert island city street house
    castle tower bridge road car train ship boat room window table chair book cup food
    red orange yellow green blue purple pink black white gray golden silver dark light bright colorful
    big small tiny giant old young new ancient beautiful cute happy sad scary epic magical futuristic
    high quality detailed highly intricate sharp focus masterpiece best realistic photorealistic
    cinematic lighting dramatic soft studio natural sunset sunrise night morning evening
    digital art artwork style oil watercolor anime cartoon concept fantasy science fiction
    trending artstation unreal engine octane hd resolution wallpaper background
    very artist greg rutkowski van gogh
"""
PROMPT_WORDS: tuple[str, ...] = tuple(_PROMPT_TEXT.split())


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def _train_merges(words: tuple[str, ...], num_merges: int | None) -> list[tuple[str, str]]:
    """Greedy BPE training over ``words``: repeatedly merge the most frequent adjacent pair.

    Stops after ``num_merges`` merges, or (None) once every word is a single token.

    Ties are broken by the pair itself (lexicographically smallest first) so the result never depends on
    hash or dict ordering.
    """
    byte_encoder = bytes_to_unicode()
    corpus: Counter[tuple[str, ...]] = Counter()
    for word in words:
        symbols = [byte_encoder[b] for b in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD
        corpus[tuple(symbols)] += 1

    merges: list[tuple[str, str]] = []
    while num_merges is None or len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in corpus.items():
            for pair in zip(symbols[:-1], symbols[1:], strict=True):
                pairs[pair] += count
        if not pairs:
            break
        best_count = max(pairs.values())
        best = min(pair for pair, count in pairs.items() if count == best_count)
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for symbols, count in corpus.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += count
        corpus = merged
    return merges


def build_vocab(num_merges: int | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary (token -> id) and the ordered merges, laid out like CLIP's."""
    tokens, merges = _build(num_merges)
    return {token: i for i, token in enumerate(tokens)}, list(merges)


@functools.cache
def _build(num_merges: int | None) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    base = list(bytes_to_unicode().values())
    tokens = base + [ch + END_OF_WORD for ch in base]
    merges = _train_merges(PROMPT_WORDS, num_merges)
    seen = set(tokens)
    for left, right in merges:
        token = left + right
        if token not in seen:
            seen.add(token)
            tokens.append(token)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return tuple(tokens), tuple(merges)


def _special(content: str) -> dict[str, object]:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_tokenizer_files(
    directory: str | os.PathLike,
    *,
    num_merges: int | None = None,
    pad_token: str = EOS_TOKEN,
    model_max_length: int = MODEL_MAX_LENGTH,
) -> int:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into ``directory``.

    The two config files follow the layout of Stable Diffusion 1.5's ``tokenizer/`` folder. Returns the
    vocabulary size.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(num_merges)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges)
    (out / "merges.txt").write_text(merges_text, encoding="utf-8")
    config = {
        "add_prefix_space": False,
        "bos_token": {"__type": "AddedToken", **_special(BOS_TOKEN)},
        "do_lower_case": True,
        "eos_token": {"__type": "AddedToken", **_special(EOS_TOKEN)},
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": {"__type": "AddedToken", **_special(EOS_TOKEN)},
    }
    special_map = {
        "bos_token": _special(BOS_TOKEN),
        "eos_token": _special(EOS_TOKEN),
        "pad_token": pad_token,
        "unk_token": _special(EOS_TOKEN),
    }
    for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
        (out / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return len(vocab)
