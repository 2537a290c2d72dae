"""sdengine.tokenizer.ClipTokenizer against transformers' CLIP tokenizers, on the generated vocabulary."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from export.tokenizer_vocab import BOS_TOKEN, EOS_TOKEN, bytes_to_unicode, write_tokenizer_files
from sdengine.errors import CorruptModelError, InvalidArgumentError, ModelDirectoryError
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


# tokenizer.json: transformers 5 saves it alone (no vocab.json or merges.txt), and so do the diffusers
# checkpoints and Optimum exports written with it.

TI_TOKENS = ["<cat-toy>", "<cat-toy>_1"]  # a textual-inversion token, as pipelines add one
TI_PROMPTS = ["a <cat-toy> on a <CAT-TOY>, <cat-toy>s", "<cat-toy>_1<cat-toy> x", "no token here"]


def _json_only(source: Path, out: Path, add: list[str] | None = None) -> Path:
    """``source`` loaded and saved again by transformers' fast CLIP tokenizer (``add``: tokens added first),
    without vocab.json and merges.txt."""
    import transformers

    ref = transformers.CLIPTokenizerFast.from_pretrained(str(source))  # CLIPTokenizer too, in transformers 5
    if add:
        ref.add_tokens(add)
    ref.save_pretrained(str(out))
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert not (out / "vocab.json").exists() and not (out / "merges.txt").exists()
    for name in ("vocab.json", "merges.txt"):  # transformers 4 writes them beside tokenizer.json
        (out / name).unlink(missing_ok=True)
    assert (out / "tokenizer.json").is_file()
    return out


def _reference_ids(directory: Path, prompts: list[str], add: list[str] | None = None) -> np.ndarray:
    import transformers

    ref = transformers.CLIPTokenizerFast.from_pretrained(str(directory))
    if add:
        ref.add_tokens(add)
    ids = ref(prompts, padding="max_length", max_length=ref.model_max_length, truncation=True)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def _check_json_only(source: Path, out: Path, prompts: list[str]) -> ClipTokenizer:
    """The tokenizer.json-only form of ``source`` gives the ids of ``source`` and of transformers on both."""
    tok = ClipTokenizer.from_dir(_json_only(source, out))
    ours = tok(prompts)
    _assert_same(ours, ClipTokenizer.from_dir(source)(prompts), prompts)
    _assert_same(ours, _reference_ids(out, prompts), prompts)
    _assert_same(ours, _reference_ids(source, prompts), prompts)
    return tok


@pytest.fixture(scope="module")
def xl_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.checkpoint import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("xl") / "tiny-xl", "tiny-xl", seed=0)


def test_tokenizer_json_alone_gives_the_same_ids(tiny_checkpoint: Path, tmp_path: Path) -> None:
    prompts = PROMPTS + FAST_ONLY_PROMPTS
    tok = _check_json_only(tiny_checkpoint / "tokenizer", tmp_path / "tokenizer", prompts)
    assert tok.max_length == 77 and tok.pad_token == EOS_TOKEN
    assert tok(["cat " * 100])[0, -1] == tok.eos_token_id  # truncated, as transformers does


@pytest.mark.parametrize("variant", VARIANTS)
def test_tokenizer_json_alone_matches_each_layout(tmp_path: Path, variant: str) -> None:
    source = _variant(tmp_path / "source", variant)
    _check_json_only(source, tmp_path / "json", PROMPTS + FAST_ONLY_PROMPTS)


def test_sdxl_second_tokenizer_json_alone_pads_with_bang(xl_checkpoint: Path, tmp_path: Path) -> None:
    prompts = PROMPTS + FAST_ONLY_PROMPTS
    tok = _check_json_only(xl_checkpoint / "tokenizer_2", tmp_path / "tokenizer_2", prompts)
    assert tok.pad_token == "!" and tok.pad_token_id == 0
    ids = tok(["a cat", "bang! bang!! !"])
    assert (ids[0, 4:] == 0).all()
    assert 0 in ids[1, 1:-1].tolist()  # a "!" in a prompt is the pad id, as in transformers
    _check_json_only(xl_checkpoint / "tokenizer", tmp_path / "tokenizer", prompts)


def test_textual_inversion_tokens_on_tokenizer_json(tiny_checkpoint: Path, tmp_path: Path) -> None:
    source = tiny_checkpoint / "tokenizer"
    prompts = PROMPTS[:5] + TI_PROMPTS
    # Added at run time, as a pipeline loading an embedding does.
    tok = ClipTokenizer.from_dir(_json_only(source, tmp_path / "plain"))
    first = tok.vocab_size
    assert tok.add_tokens(TI_TOKENS[:1]) == [first]
    _assert_same(tok(prompts), _reference_ids(tmp_path / "plain", prompts, add=TI_TOKENS[:1]), prompts)
    base = ClipTokenizer.from_dir(source)
    base.add_tokens(TI_TOKENS[:1])
    _assert_same(tok(prompts), base(prompts), prompts)
    # Saved in tokenizer.json's added_tokens by a pipeline that added them, then loaded.
    tok = ClipTokenizer.from_dir(_json_only(source, tmp_path / "saved", add=TI_TOKENS))
    assert [tok._tokenizer.token_to_id(t) for t in TI_TOKENS] == [first, first + 1]
    _assert_same(tok(prompts), _reference_ids(tmp_path / "saved", prompts), prompts)
    with pytest.raises(InvalidArgumentError, match="already in the tokenizer's vocabulary"):
        tok.next_ids(TI_TOKENS[:1])
    assert tok.add_tokens(["<dog-toy>"]) == [first + 2]


def test_string_merges_of_older_tokenizers(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """tokenizers before 0.20 wrote each merge as one "a b" string, not a pair."""
    source = tiny_checkpoint / "tokenizer"
    directory = _json_only(source, tmp_path / "tokenizer")
    data = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    assert all(isinstance(m, list) for m in data["model"]["merges"])
    data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
    (directory / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    prompts = PROMPTS + FAST_ONLY_PROMPTS
    _assert_same(ClipTokenizer.from_dir(directory)(prompts), ClipTokenizer.from_dir(source)(prompts), prompts)


def test_vocab_and_merges_are_preferred_to_tokenizer_json(sd15_dir: Path, tmp_path: Path) -> None:
    directory = _variant(tmp_path / "both", "sd15")
    (directory / "tokenizer.json").write_text("{not json")  # never read while the pair is there
    prompts = PROMPTS + FAST_ONLY_PROMPTS
    _assert_same(
        ClipTokenizer.from_dir(directory)(prompts), ClipTokenizer.from_dir(sd15_dir)(prompts), prompts
    )
    # With half the pair, tokenizer.json is read.
    json_only = _json_only(sd15_dir, tmp_path / "json")
    (json_only / "vocab.json").write_text((sd15_dir / "vocab.json").read_text(encoding="utf-8"))
    _assert_same(
        ClipTokenizer.from_dir(json_only)(prompts), ClipTokenizer.from_dir(sd15_dir)(prompts), prompts
    )


def _to_json_only(root: Path, folders: tuple[str, ...] = ("tokenizer",)) -> None:
    """Each tokenizer folder of model directory ``root`` rewritten as transformers 5 saves it."""
    import shutil

    for folder in folders:
        original = root.parent / f"{root.name}-{folder}"
        (root / folder).rename(original)
        _json_only(original, root / folder)
        shutil.rmtree(original)


def test_model_directories_accept_tokenizer_json(
    tiny_checkpoint: Path, xl_checkpoint: Path, onnx_fp32: Path, tmp_path: Path
) -> None:
    import shutil

    from sdengine.model_dir import open_checkpoint_dir, open_onnx_dir

    prompts = PROMPTS[:4]
    for source, opener in ((tiny_checkpoint, open_checkpoint_dir), (onnx_fp32, open_onnx_dir)):
        root = shutil.copytree(source, tmp_path / source.name)
        _to_json_only(root)
        model_dir = opener(root)
        assert model_dir.arch.text_max_length == 77
        ours = ClipTokenizer.from_dir(model_dir.tokenizer_dir)(prompts)
        _assert_same(ours, ClipTokenizer.from_dir(source / "tokenizer")(prompts), prompts)
    root = shutil.copytree(xl_checkpoint, tmp_path / "xl")
    _to_json_only(root, ("tokenizer", "tokenizer_2"))
    model_dir = open_checkpoint_dir(root)
    assert model_dir.arch.xl
    assert ClipTokenizer.from_dir(model_dir.tokenizer_2_dir).pad_token == "!"


@pytest.mark.parametrize(
    ("remove", "missing"),
    [
        (("vocab.json", "merges.txt"), "vocab.json and tokenizer/merges.txt (or tokenizer/tokenizer.json)"),
        (("merges.txt",), "merges.txt (or tokenizer/tokenizer.json)"),
    ],
)
def test_an_incomplete_tokenizer_folder_names_what_is_missing(
    tiny_checkpoint: Path, tmp_path: Path, remove: tuple[str, ...], missing: str
) -> None:
    import shutil

    from sdengine.model_dir import open_checkpoint_dir

    root = shutil.copytree(tiny_checkpoint, tmp_path / "tiny")
    for name in remove:
        (root / "tokenizer" / name).unlink()
    with pytest.raises(ModelDirectoryError, match=re.escape(f"missing tokenizer/{missing} (")) as info:
        open_checkpoint_dir(root)
    assert "\n" not in str(info.value)
    with pytest.raises(ModelDirectoryError, match="needs vocab.json and merges.txt, or tokenizer.json"):
        ClipTokenizer.from_dir(root / "tokenizer")


def _break_json(directory: Path, how: str) -> None:
    path = directory / "tokenizer.json"
    if how == "not_json":
        path.write_text('{"model": ')
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data["model"]
    if how == "not_object":
        data = [data]
    elif how == "no_model":
        del data["model"]
    elif how == "not_bpe":
        model["type"] = "WordPiece"
    elif how == "vocab_not_ids":
        model["vocab"] = {"a": "0"}
    elif how == "no_merges":
        del model["merges"]
    elif how == "merge_three_parts":
        model["merges"][3] = "a b c"
    elif how == "merge_one_part":
        model["merges"][3] = ["a"]
    elif how == "merge_not_text":
        model["merges"][3] = 7
    elif how == "merge_unknown_token":
        model["merges"][3] = ["qqqq", "zzzz"]
    elif how == "added_tokens_not_list":
        data["added_tokens"] = {"0": "!"}
    elif how == "added_token_without_id":
        del data["added_tokens"][0]["id"]
    elif how == "added_token_without_content":
        del data["added_tokens"][0]["content"]
    elif how == "added_token_id_gap":  # the next free id is len(vocab), not len(vocab) + 5
        data["added_tokens"].append({"id": len(model["vocab"]) + 5, "content": "<x>", "special": False})
    else:  # pragma: no cover
        raise AssertionError(how)
    path.write_text(json.dumps(data), encoding="utf-8")


@pytest.mark.parametrize(
    "how",
    [
        "not_json", "not_object", "no_model", "not_bpe", "vocab_not_ids", "no_merges", "merge_three_parts",
        "merge_one_part", "merge_not_text", "merge_unknown_token", "added_tokens_not_list",
        "added_token_without_id", "added_token_without_content", "added_token_id_gap",
    ],
)  # fmt: skip
def test_a_broken_tokenizer_json_raises_corrupt_model_error(sd15_dir: Path, tmp_path: Path, how: str) -> None:
    directory = _json_only(sd15_dir, tmp_path / "tokenizer")
    _break_json(directory, how)
    with pytest.raises(CorruptModelError) as info:
        ClipTokenizer.from_dir(directory)
    message = str(info.value)
    assert "\n" not in message
    assert str(directory) in message
