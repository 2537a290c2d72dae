"""CLIP's byte-level BPE tokenizer, built on the ``tokenizers`` library alone.

The runtime never imports torch or transformers, so the tokenizer that diffusers gets from
``transformers.CLIPTokenizer`` is rebuilt here from the same files (``vocab.json`` + ``merges.txt``, or the
``tokenizer.json`` that transformers 5 saves instead, and the optional config files) with the same
pipeline: NFC + whitespace collapsing + lowercasing, CLIP's split regex, byte-level mapping, BPE with the
``</w>`` end-of-word suffix, BOS/EOS around the text, truncation to ``model_max_length`` and right padding
with the pad token. The special tokens are registered the way transformers registers them (with the flags
the config gives them), because that decides how a special token's text inside a prompt is encoded: SD 2.x
pads with ``!``, so a ``!`` in its prompts is the pad id.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from sdengine.errors import CorruptModelError, InvalidArgumentError, ModelDirectoryError

VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
ADDED_TOKENS_FILE = "added_tokens.json"
TOKENIZER_JSON_FILE = "tokenizer.json"  # the ``tokenizers`` library's file: all transformers 5 saves

DEFAULT_MAX_LENGTH = 77
DEFAULT_BOS = "<|startoftext|>"
DEFAULT_EOS = "<|endoftext|>"
# transformers writes 1e30 for "no limit"; a CLIP text encoder always has 77 positions.
_UNSET_MAX_LENGTH = 1_000_000

# Named special tokens in the order transformers registers them (later registrations override flags).
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized")

log = logging.getLogger("sdengine")

# transformers' CLIPTokenizer split pattern (the special-token alternatives are kept for parity).
_SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CorruptModelError(
            f"{path} is not valid JSON ({exc}); restore the file from the checkpoint"
        ) from exc
    if not isinstance(data, dict):
        raise CorruptModelError(f"{path} must hold a JSON object; restore the file from the checkpoint")
    return data


def _added_token(value: Any, source: Path, *, special: bool) -> AddedToken:
    """An AddedToken from a config entry: a plain string, or a dict as transformers serialises them."""
    if isinstance(value, str):
        # transformers turns a bare string special token into a non-normalized special AddedToken.
        return AddedToken(value, special=special, normalized=False)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        is_special = bool(value.get("special", special))
        flags = {k: bool(value[k]) for k in _ADDED_TOKEN_FLAGS if k in value}
        flags.setdefault("normalized", not is_special)
        return AddedToken(value["content"], special=is_special, **flags)
    raise CorruptModelError(
        f"{source} has an invalid token entry {value!r}; restore the file from the checkpoint"
    )


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_bpe_files(vocab_path: Path, merges_path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and merges of a ``vocab.json`` + ``merges.txt`` pair."""
    vocab_json = _read_json(vocab_path)
    if not vocab_json or not all(_is_id(v) for v in vocab_json.values()):
        raise CorruptModelError(
            f"{vocab_path} must map tokens to integer ids; restore it from the checkpoint"
        )
    try:
        return BPE.read_file(str(vocab_path), str(merges_path))
    except Exception as exc:  # tokenizers raises plain Exception for parse errors
        raise CorruptModelError(
            f"{merges_path} could not be parsed ({exc}); restore it from the checkpoint"
        ) from exc


def _merge(value: Any) -> tuple[str, str] | None:
    """One merge of a tokenizer.json: ``"a b"`` (tokenizers before 0.20) or ``["a", "b"]`` (since)."""
    if isinstance(value, str):
        value = value.split(" ")
    if isinstance(value, list) and len(value) == 2 and all(isinstance(part, str) for part in value):
        return value[0], value[1]
    return None


def _read_tokenizer_json(
    path: Path,
) -> tuple[dict[str, int], list[tuple[str, str]], dict[int, AddedToken]]:
    """The vocabulary, merges and added tokens (by id) of a ``tokenizer.json`` holding a BPE model.

    Its normalizer, pre-tokenizer and post-processor are not read: like transformers' ``CLIPTokenizer``,
    which takes only the vocabulary, merges and added tokens from it, the runtime builds CLIP's own.
    """
    data = _read_json(path)
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else None
        raise CorruptModelError(
            f"{path} does not hold a BPE model (model type {kind!r}); CLIP's tokenizer is byte-level BPE"
        )
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab or not all(_is_id(v) for v in vocab.values()):
        raise CorruptModelError(f"{path}: model.vocab must map tokens to integer ids; restore the file")
    raw_merges = model.get("merges")
    if not isinstance(raw_merges, list):
        raise CorruptModelError(f"{path}: model.merges must be a list of merges; restore the file")
    merges = []
    for value in raw_merges:
        merge = _merge(value)
        if merge is None:
            raise CorruptModelError(
                f'{path} has an invalid merge {value!r} (expected "a b" or ["a", "b"]); restore the file'
            )
        merges.append(merge)
    entries = data.get("added_tokens", [])
    if not isinstance(entries, list):
        raise CorruptModelError(f"{path}: added_tokens must be a list; restore the file")
    added: dict[int, AddedToken] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not _is_id(entry.get("id")):
            raise CorruptModelError(f"{path} has an invalid added token {entry!r}; restore the file")
        added[entry["id"]] = _added_token(entry, path, special=False)
    return vocab, merges, added


class ClipTokenizer:
    """Turns prompts into the fixed-length id arrays a CLIP text encoder takes."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        special_tokens: dict[str, AddedToken] | None = None,
        added_tokens: Sequence[AddedToken] = (),
    ) -> None:
        """Build from an in-memory vocabulary; most callers want :meth:`from_dir`.

        ``special_tokens`` maps transformers' names (``bos_token``, ``eos_token``, ``unk_token``,
        ``pad_token``...) to tokens; CLIP's defaults fill in the missing ones. ``added_tokens`` are registered
        first, like a config's ``added_tokens_decoder``.
        """
        if max_length < 2:
            raise InvalidArgumentError(f"max_length must be at least 2 (BOS and EOS), got {max_length}")
        named = {
            "bos_token": AddedToken(DEFAULT_BOS, special=True, normalized=False),
            "eos_token": AddedToken(DEFAULT_EOS, special=True, normalized=False),
            "unk_token": AddedToken(DEFAULT_EOS, special=True, normalized=False),
            "pad_token": AddedToken(DEFAULT_EOS, special=True, normalized=False),
        }
        named.update(special_tokens or {})

        try:
            model = BPE(
                vocab=vocab,
                merges=merges,
                dropout=None,
                continuing_subword_prefix="",
                end_of_word_suffix="</w>",
                fuse_unk=False,
                unk_token=named["unk_token"].content,
            )
        except Exception as exc:  # tokenizers raises plain Exception
            raise CorruptModelError(
                f"merges do not match the vocabulary ({exc}); restore the tokenizer files from the checkpoint"
            ) from exc
        tokenizer = Tokenizer(model)
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        tokenizer.decoder = decoders.ByteLevel()
        # Registering a content twice updates its flags, so the last registration wins, as in transformers.
        if added_tokens:
            tokenizer.add_tokens(list(added_tokens))
        tokenizer.add_special_tokens([named[k] for k in _SPECIAL_KEYS if k in named])

        def token_id(key: str) -> int:
            content = named[key].content
            idx = tokenizer.token_to_id(content)
            if idx is None:  # pragma: no cover - add_special_tokens always assigns an id
                raise CorruptModelError(
                    f"{key} {content!r} has no id in the vocabulary; fix the tokenizer files"
                )
            return idx

        self.max_length = max_length
        self.bos_token_id = token_id("bos_token")
        self.eos_token_id = token_id("eos_token")
        self.pad_token_id = token_id("pad_token")
        self.pad_token: str = named["pad_token"].content
        tokenizer.post_processor = processors.RobertaProcessing(
            (named["eos_token"].content, self.eos_token_id),
            (named["bos_token"].content, self.bos_token_id),
            trim_offsets=False,
            add_prefix_space=False,
        )
        tokenizer.enable_truncation(max_length=max_length, strategy="longest_first", direction="right")
        tokenizer.enable_padding(
            direction="right", pad_id=self.pad_token_id, pad_token=self.pad_token, length=max_length
        )
        self._tokenizer = tokenizer
        self._multi_vector: dict[str, str] = {}  # textual inversion: token -> "token token_1 ..."

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> ClipTokenizer:
        """Load a diffusers/Optimum ``tokenizer/`` folder: ``vocab.json`` and ``merges.txt``, or else
        ``tokenizer.json`` (transformers 5 saves only that), and the optional configs.

        ``model_max_length`` and the special tokens come from ``tokenizer_config.json``; as in
        transformers, ``special_tokens_map.json`` overrides its special tokens, and ``added_tokens.json``
        then ``tokenizer.json``'s ``added_tokens`` give the added tokens, unless the config lists
        ``added_tokens_decoder``. Each added token keeps the id its file gives it.
        """
        directory = Path(path)
        if not directory.is_dir():
            raise ModelDirectoryError(
                f"tokenizer directory {directory} does not exist; pass the checkpoint's tokenizer/"
            )
        vocab_path = directory / VOCAB_FILE
        merges_path = directory / MERGES_FILE
        json_path = directory / TOKENIZER_JSON_FILE
        json_added: dict[int, AddedToken] = {}
        if vocab_path.is_file() and merges_path.is_file():  # preferred where both are there
            vocab, merges = _read_bpe_files(vocab_path, merges_path)
        elif json_path.is_file():
            vocab, merges, json_added = _read_tokenizer_json(json_path)
        else:
            missing = vocab_path if not vocab_path.is_file() else merges_path
            raise ModelDirectoryError(
                f"{missing} is missing; the tokenizer folder needs {VOCAB_FILE} and {MERGES_FILE}, "
                f"or {TOKENIZER_JSON_FILE}"
            )

        config_path = directory / CONFIG_FILE
        config = _read_json(config_path) if config_path.is_file() else {}
        max_length = config.get("model_max_length")
        if max_length is None or (isinstance(max_length, (int, float)) and max_length >= _UNSET_MAX_LENGTH):
            max_length = DEFAULT_MAX_LENGTH
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
            raise CorruptModelError(
                f"{config_path} has an invalid model_max_length {max_length!r}; set it to 77 for CLIP"
            )

        added: dict[int, AddedToken] = {}
        decoder = config.get("added_tokens_decoder")
        if decoder is not None:
            if not isinstance(decoder, dict):
                raise CorruptModelError(f"{config_path} has an invalid added_tokens_decoder; restore it")
            for idx, entry in decoder.items():
                try:
                    added[int(idx)] = _added_token(entry, config_path, special=False)
                except ValueError as exc:
                    raise CorruptModelError(
                        f"{config_path} has a non-integer added token id {idx!r}"
                    ) from exc

        entries = {k: (config[k], config_path) for k in _SPECIAL_KEYS if config.get(k) is not None}
        map_path = directory / SPECIAL_TOKENS_MAP_FILE
        if decoder is None and map_path.is_file():
            special_map = _read_json(map_path)
            entries.update(
                {k: (special_map[k], map_path) for k in _SPECIAL_KEYS if special_map.get(k) is not None}
            )
        named = {key: _added_token(value, source, special=True) for key, (value, source) in entries.items()}

        legacy_path = directory / ADDED_TOKENS_FILE
        if decoder is None and legacy_path.is_file():  # older saves (e.g. textual inversion): {token: id}
            special_contents = {tok.content for tok in named.values()}
            for content, idx in _read_json(legacy_path).items():
                if not isinstance(idx, int) or isinstance(idx, bool):
                    raise CorruptModelError(f"{legacy_path} must map tokens to integer ids; restore it")
                is_special = content in special_contents
                added[idx] = AddedToken(content, special=is_special, normalized=not is_special)
        if decoder is None:  # transformers 5 reads tokenizer.json's after added_tokens.json, so it wins
            added.update(json_added)

        # A named token that is also an added token takes that entry's flags.
        by_content = {tok.content: tok for tok in added.values()}
        special = {key: by_content.get(tok.content, tok) for key, tok in named.items()}
        try:
            tokenizer = cls(
                vocab,
                merges,
                max_length=max_length,
                special_tokens=special,
                added_tokens=[added[i] for i in sorted(added)],
            )
        except CorruptModelError as exc:
            raise CorruptModelError(f"{directory}: {exc}") from exc
        # An added token outside the vocabulary takes the next free id, so one listed with a gap before it
        # (or under another token's id) would encode to another id than its embedding's.
        for idx, token in sorted(added.items()):
            given = tokenizer._tokenizer.token_to_id(token.content)
            if given != idx:
                raise CorruptModelError(
                    f"{directory}: added token {token.content!r} is listed with id {idx} but gets id {given} "
                    "(ids must follow the vocabulary without gaps); restore the tokenizer files"
                )
        return tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def next_ids(self, tokens: Sequence[str]) -> list[int]:
        """The ids :meth:`add_tokens` will give ``tokens``; InvalidArgumentError if one is taken."""
        taken = [t for t in tokens if self._tokenizer.token_to_id(t) is not None]
        if taken:
            raise InvalidArgumentError(f"token {taken[0]!r} is already in the tokenizer's vocabulary")
        return list(range(self.vocab_size, self.vocab_size + len(tokens)))

    def add_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Add textual inversion tokens (normal, normalised tokens, as transformers' ``add_tokens``): their
        new ids, in order. The first token of a multi-vector group stands for the whole group in prompts."""
        self.next_ids(tokens)  # none taken
        ids = []
        for token in tokens:
            self._tokenizer.add_tokens([AddedToken(token, normalized=True)])
            ids.append(self._tokenizer.token_to_id(token))
        if len(tokens) > 1:
            self._multi_vector[tokens[0]] = " ".join(tokens)
        return ids

    def expand(self, prompt: str) -> str:
        """``prompt`` with each multi-vector token spelled out as its group (diffusers'
        ``maybe_convert_prompt``)."""
        for token in set(self.tokenize(prompt)) & self._multi_vector.keys():
            prompt = prompt.replace(token, self._multi_vector[token])
        return prompt

    def tokenize(self, prompt: str) -> list[str]:
        """The tokens of one prompt, with BOS/EOS and without padding (for inspection and debugging)."""
        encoding = self._tokenizer.encode(prompt)
        return [tok for tok, mask in zip(encoding.tokens, encoding.attention_mask, strict=True) if mask]

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        """Ids of shape ``(len(prompts), max_length)``, int64: BOS, text (truncated), EOS, then padding."""
        encodings = self._encode(prompts)
        for prompt, encoding in zip(prompts, encodings, strict=True):
            if encoding.overflowing:  # as diffusers does: say so, and go on with what fits
                shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
                log.warning(
                    "prompt %r is longer than the text encoder's %d tokens: the rest of it is ignored",
                    shown,
                    self.max_length,
                )
        return np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(encodings), self.max_length)

    def chunks(self, prompts: Sequence[str]) -> np.ndarray:
        """Ids of shape ``(len(prompts), windows, max_length)``, int64, for prompts of any length: each
        prompt's tokens in windows of ``max_length - 2``, each with BOS, EOS and padding, so that each window
        is encoded on its own and their embeddings are concatenated (what compel does with
        ``truncate_long_prompts=False``, splitting at the window's end, and A1111 at about that place). A
        prompt shorter than the longest gets the empty prompt's window as often as it is short."""
        encodings = self._encode(prompts)
        windows = [[e.ids, *(o.ids for o in e.overflowing)] for e in encodings]
        count = max((len(w) for w in windows), default=1)
        empty = self._tokenizer.encode("").ids
        padded = [w + [empty] * (count - len(w)) for w in windows]
        return np.array(padded, dtype=np.int64).reshape(len(encodings), count, self.max_length)

    def content_ids(self, text: str) -> list[int]:
        """The ids of ``text``'s tokens alone: no BOS, EOS or padding, however long it is."""
        (encoding,) = self._encode([text])
        return [
            token
            for window in (encoding, *encoding.overflowing)
            for token, real, special in zip(
                window.ids, window.attention_mask, window.special_tokens_mask, strict=True
            )
            if real and not special
        ]

    def _encode(self, prompts: Sequence[str]) -> list:
        """The tokenizers library's encodings of ``prompts`` (checked), multi-vector tokens spelled out."""
        if isinstance(prompts, str):
            raise InvalidArgumentError(
                "prompts must be a list of strings, not a single string; wrap it in a list"
            )
        prompts = list(prompts)
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise InvalidArgumentError(f"every prompt must be a string, got {type(prompt).__name__}")
        if self._multi_vector:
            prompts = [self.expand(prompt) for prompt in prompts]
        return self._tokenizer.encode_batch(prompts) if prompts else []
