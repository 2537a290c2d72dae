"""sdengine.tokenizer.ClipTokenizer against transformers' CLIP tokenizers, on the generated vocabulary."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from export.tokenizer_vocab import BOS_TOKEN, EOS_TOKEN, bytes_to_unicode, write_tokenizer_files
from sdengine.errors import InvalidArgumentError, ModelDirectoryError
from sdengine.tokenizer import ClipTokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]

# Prompts on which transformers 4's slow tokenizer and the fast one agree.
PROMPTS = [
    "",
    " ",
    "a photo of an astronaut riding a horse on the moon",
    "A Photo Of A CAT, highly detailed, 8k, trending on ArtStation!!!",
    "Hello, World... (masterpiece:1.2) [cat|dog] {x} <lora:foo> #1 @me",
    "   lots   of\t\twhitespace \n\n and newlines  ",
    "digits 0123456789 3.14159 1,000,000 2nd 4K",
    "don't it's we're I'm you've they'll she'd DON'T",
    "café naïve résumé Ångström Ærøskøbing ÉCOLE Straße",
    "emoji 🐱🚀 🎨 ✨ and ❤️ 🇫🇷",
    "zyzzyva qwxjk flibbertigibbet pneumonoultramicroscopic",
    "Ωmega αβγ Привет мир",
    "under_score hyphen-ated slash/ed back\\slash a+b=c 50% $5 & more",
    "cat " * 100,
    "a very long prompt " + " ".join(f"word{i}" for i in range(60)),
]
# Inputs where transformers 4's slow tokenizer differed from the fast one (it split CJK characters, dropped
# control/format characters and had its own special-token handling); the runtime follows the fast one,
# which is what diffusers uses.
FAST_ONLY_PROMPTS = [
    "日本語のテキスト 中文 한국어",
    "zero\u200bwidth joiner 👨\u200d👩\u200d👧 nul\x00 bell\x07 tab\tend",
    "<|endoftext|> literal eos",
    "<|ENDOFTEXT|> <|StartOfText|> mixed case specials",
    "x<|startoftext|>y<|endoftext|>z",
    "bang! bang!! !",
    "a <cat-toy> on a <CAT-TOY>, <cat-toy>s",
    "x <SPECIAL> y<SPECIAL>z <special>",
]


def _write_config(directory: Path, name: str, update: Callable[[dict], dict]) -> None:
    path = directory / name
    path.write_text(json.dumps(update(json.loads(path.read_text()))))


def _variant(directory: Path, name: str) -> Path:
    """Tokenizer folders laid out as real SD checkpoints ship them."""
    if name == "sd15":  # SD 1.x: pads with <|endoftext|>
        write_tokenizer_files(directory)
    elif name == "pad_bang":  # SD 2.x: pads with "!"
        write_tokenizer_files(directory, pad_token="!")
    elif name == "map_overrides_config":  # special_tokens_map.json wins over tokenizer_config.json
        write_tokenizer_files(directory)
        _write_config(directory, "special_tokens_map.json", lambda m: {**m, "pad_token": "!"})
    elif name == "added_tokens_decoder":  # newer transformers: special_tokens_map.json is then ignored
        size = write_tokenizer_files(directory)
        flags = {"lstrip": False, "rstrip": False, "single_word": False, "special": True}
        config = {
            "added_tokens_decoder": {
                str(size - 2): {"content": BOS_TOKEN, "normalized": True, **flags},
                str(size - 1): {"content": EOS_TOKEN, "normalized": False, **flags},
            },
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "pad_token": EOS_TOKEN,
            "unk_token": EOS_TOKEN,
            "model_max_length": 77,
            "tokenizer_class": "CLIPTokenizer",
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
        _write_config(directory, "special_tokens_map.json", lambda m: {**m, "pad_token": "!"})
    elif name == "added_tokens_json":  # older saves, e.g. with a textual-inversion token
        size = write_tokenizer_files(directory)
        (directory / "added_tokens.json").write_text(json.dumps({"<cat-toy>": size, EOS_TOKEN: size - 1}))
    elif name == "extra_added_tokens":  # added_tokens_decoder with a plain and a stripping special token
        _variant(directory, "added_tokens_decoder")
        size = json.loads((directory / "vocab.json").read_text())[EOS_TOKEN] + 1
        common = {"single_word": False}
        extra = {
            str(size): {"content": "<cat-toy>", "lstrip": False, "rstrip": False, "normalized": True,
                        "special": False, **common},
            str(size + 1): {"content": "<SPECIAL>", "lstrip": True, "rstrip": True, "normalized": False,
                            "special": True, **common},
        }  # fmt: skip
        _write_config(
            directory,
            "tokenizer_config.json",
            lambda c: {**c, "added_tokens_decoder": {**c["added_tokens_decoder"], **extra}},
        )
    elif name == "short":  # a short model_max_length makes truncation bite on most prompts
        write_tokenizer_files(directory, model_max_length=12, pad_token="!")
    else:  # pragma: no cover
        raise AssertionError(name)
    return directory


VARIANTS = (
    "sd15",
    "pad_bang",
    "map_overrides_config",
    "added_tokens_decoder",
    "added_tokens_json",
    "extra_added_tokens",
    "short",
)


@pytest.fixture(scope="module", params=VARIANTS)
def tokenizer_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _variant(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _variant(tmp_path_factory.mktemp("sd15"), "sd15")


def _slow_comparable(prompts: list[str], directory: Path) -> list[str]:
    """The prompts on which transformers 4's slow tokenizer is expected to agree with the fast one."""
    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    pad = ClipTokenizer.from_dir(directory).pad_token_id
    # The slow tokenizer also split special-token text (SD 2.x's pad "!") out of prompts, differently.
    return [p for p in prompts if vocab.get("!") != pad or "!" not in p]


def _assert_same(ours: np.ndarray, ref: np.ndarray, prompts: list[str]) -> None:
    assert ours.shape == ref.shape
    for i, prompt in enumerate(prompts):
        assert ours[i].tolist() == ref[i].tolist(), f"prompt {prompt!r}"


@pytest.mark.parametrize("cls_name", ["CLIPTokenizer", "CLIPTokenizerFast"])
def test_matches_transformers(tokenizer_dir: Path, cls_name: str) -> None:
    """In transformers 5 both names are the fast class; in transformers 4 the first one is the slow class."""
    import transformers

    ref = getattr(transformers, cls_name).from_pretrained(str(tokenizer_dir))
    prompts = PROMPTS + FAST_ONLY_PROMPTS if ref.is_fast else _slow_comparable(PROMPTS, tokenizer_dir)
    expected = ref(prompts, padding="max_length", max_length=ref.model_max_length, truncation=True)
    ours = ClipTokenizer.from_dir(tokenizer_dir)(prompts)
    _assert_same(ours, np.asarray(expected["input_ids"], dtype=np.int64), prompts)


class SlowClipTokenizer:
    """transformers 4's slow ``CLIPTokenizer`` algorithm (its path without ftfy), as an independent oracle.

    transformers 5 dropped the slow class, so its pure-Python BPE is restated here, for tests only.
    """

    def __init__(self, directory: Path) -> None:
        try:
            from transformers.models.bert.tokenization_bert_legacy import BasicTokenizer
        except ImportError:  # transformers 4
            from transformers.models.bert.tokenization_bert import BasicTokenizer

        regex = pytest.importorskip("regex")
        self.encoder: dict[str, int] = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
        lines = (directory / "merges.txt").read_text(encoding="utf-8").strip().split("\n")
        lines = lines[1 : 49152 - 256 - 2 + 1]  # the header line is skipped, as transformers 4 did
        self.bpe_ranks = {tuple(line.split()): i for i, line in enumerate(lines)}
        self.byte_encoder = bytes_to_unicode()
        self.nlp = BasicTokenizer(strip_accents=False, do_split_on_punc=False)
        self.pat = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        config = json.loads((directory / "tokenizer_config.json").read_text())
        special_map = json.loads((directory / "special_tokens_map.json").read_text())
        pad = special_map.get("pad_token", config.get("pad_token"))
        self.pad_id = self.encoder[pad["content"] if isinstance(pad, dict) else pad]
        self.max_length: int = config["model_max_length"]
        self.regex = regex

    def bpe(self, token: str) -> list[str]:
        word = [*token[:-1], token[-1] + "</w>"]
        while len(word) > 1:
            pairs = set(zip(word[:-1], word[1:], strict=True))
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == bigram:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def __call__(self, prompt: str) -> list[int]:
        text = " ".join(self.nlp.tokenize(prompt))
        ids = []
        for token in self.regex.findall(self.pat, text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids += [self.encoder[piece] for piece in self.bpe(token)]
        ids = [self.encoder[BOS_TOKEN], *ids[: self.max_length - 2], self.encoder[EOS_TOKEN]]
        return ids + [self.pad_id] * (self.max_length - len(ids))


@pytest.mark.parametrize("variant", ["sd15", "pad_bang", "short"])
def test_matches_slow_algorithm(tmp_path: Path, variant: str) -> None:
    directory = _variant(tmp_path, variant)
    slow = SlowClipTokenizer(directory)
    prompts = _slow_comparable(PROMPTS, directory)
    ours = ClipTokenizer.from_dir(directory)(prompts)
    _assert_same(ours, np.array([slow(p) for p in prompts], dtype=np.int64), prompts)


def test_generated_vocab_gives_sensible_tokens(sd15_dir: Path) -> None:
    tok = ClipTokenizer.from_dir(sd15_dir)
    assert tok.max_length == 77
    assert tok.tokenize("A photo of an astronaut") == [
        BOS_TOKEN, "a</w>", "photo</w>", "of</w>", "an</w>", "astronaut</w>", EOS_TOKEN,
    ]  # fmt: skip
    last = tok.vocab_size - 1
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (last - 1, last, last)
    # Words outside the vocabulary fall back to smaller pieces, never to an unknown token.
    assert "".join(tok.tokenize("zyzzyva")[1:-1]) == "zyzzyva</w>"


def test_output_layout(sd15_dir: Path) -> None:
    tok = ClipTokenizer.from_dir(sd15_dir)
    ids = tok(["a cat", "cat " * 200, ""])
    assert ids.dtype == np.int64 and ids.shape == (3, 77)
    assert tok.tokenize("a cat") == [BOS_TOKEN, "a</w>", "cat</w>", EOS_TOKEN]
    assert (ids[0, 0], ids[0, 3]) == (tok.bos_token_id, tok.eos_token_id)
    assert (ids[0, 4:] == tok.pad_token_id).all()
    # Truncation keeps BOS ... EOS: 75 text tokens in between.
    assert ids[1, 0] == tok.bos_token_id and ids[1, -1] == tok.eos_token_id
    assert (ids[1, 1:-1] != tok.eos_token_id).all()
    assert ids[2, :2].tolist() == [tok.bos_token_id, tok.eos_token_id]
    assert tok([]).shape == (0, 77)


def test_a_truncated_prompt_is_reported(sd15_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    tok = ClipTokenizer.from_dir(sd15_dir)
    with caplog.at_level("WARNING", logger="sdengine"):
        tok(["a cat", "cat " * 75])  # 75 text tokens fit exactly
    assert not caplog.records
    with caplog.at_level("WARNING", logger="sdengine"):
        tok(["a cat", "cat " * 76])
    assert len(caplog.records) == 1 and "longer than the text encoder's 77 tokens" in caplog.text


def test_rejects_a_bare_string(sd15_dir: Path) -> None:
    tok = ClipTokenizer.from_dir(sd15_dir)
    with pytest.raises(InvalidArgumentError):
        tok("a cat")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        tok(["a cat", None])  # type: ignore[list-item]


def _break(directory: Path, how: str) -> None:
    if how == "no_dir":
        for f in directory.iterdir():
            f.unlink()
        directory.rmdir()
    elif how == "no_vocab":
        (directory / "vocab.json").unlink()
    elif how == "no_merges":
        (directory / "merges.txt").unlink()
    elif how == "vocab_not_json":
        (directory / "vocab.json").write_text("{not json")
    elif how == "vocab_not_ids":
        (directory / "vocab.json").write_text(json.dumps({"a": "b"}))
    elif how == "merges_bad_line":
        (directory / "merges.txt").write_text("#version: 0.2\na b c\n")
    elif how == "merges_unknown_token":
        (directory / "merges.txt").write_text("#version: 0.2\nqqqq zzzz\n")
    elif how == "config_not_json":
        (directory / "tokenizer_config.json").write_text("[1, 2")
    elif how == "bad_max_length":
        _write_config(directory, "tokenizer_config.json", lambda c: {**c, "model_max_length": "77"})
    elif how == "added_tokens_not_ids":
        (directory / "added_tokens.json").write_text(json.dumps({"<x>": "1"}))
    elif how == "bad_special_token":
        _write_config(directory, "special_tokens_map.json", lambda m: {**m, "pad_token": 3})
    else:  # pragma: no cover
        raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "no_dir", "no_vocab", "no_merges", "vocab_not_json", "vocab_not_ids", "merges_bad_line",
        "merges_unknown_token", "config_not_json", "bad_max_length", "bad_special_token",
        "added_tokens_not_ids",
    ],
)  # fmt: skip
def test_broken_directories_raise_model_directory_error(tmp_path: Path, how: str) -> None:
    directory = tmp_path / "tokenizer"
    write_tokenizer_files(directory)
    _break(directory, how)
    with pytest.raises(ModelDirectoryError) as info:
        ClipTokenizer.from_dir(directory)
    message = str(info.value)
    assert "\n" not in message
    assert str(directory) in message


def test_missing_config_files_use_clip_defaults(tmp_path: Path) -> None:
    write_tokenizer_files(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "special_tokens_map.json").unlink()
    tok = ClipTokenizer.from_dir(tmp_path)
    assert tok.max_length == 77
    assert tok.pad_token == EOS_TOKEN


def test_import_pulls_in_no_torch_or_transformers(sd15_dir: Path) -> None:
    code = (
        "import sys\n"
        "from sdengine.tokenizer import ClipTokenizer\n"
        f"ClipTokenizer.from_dir({str(sd15_dir)!r})(['a photo of a cat'])\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == ""
