"""Prompt weighting in compel's syntax: the parse against compel's parser, and the images against diffusers
fed compel's embeddings (``DownweightMode.REMOVE``, ``SplitLongTextMode.BRUTAL``)."""

from __future__ import annotations

import numpy as np
import pytest

from sdengine.cli import main
from sdengine.errors import InvalidArgumentError, UnsupportedConfigError
from sdengine.images import psnr, read_png_parameters
from sdengine.pipeline import Pipeline
from sdengine.prompt_weights import parse_weighted

SETTINGS = dict(steps=4, seed=1, height=64, width=64)
PROMPTS = [
    "a (red cat)1.3 dog+ and ((blue)-)++ sky",
    "a red- blue- cat",
    "(red blue)- cat",
    "semi-realistic photo, cat++, (a dog)0.5",
    "a \\(cat\\) (dog)",
    "photo of a cat+++,dog--",
    "a (b (c)1.5 d)0.8 e",
    "a (cat",
    "a (cat)- (dog)1.2x",
    "cat+ +",
    "red+blue",
    "(a)(b)1.5",
    "1+1",
    "hello-world- yes",
    "x (a, b)1.5, c",
    "a (b)-.5",
    "blurry",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_parse_matches_compel(onnx_fp32, prompt):
    """The same fragments, weights and tokens as compel's parser (spacing aside, which tokens ignore)."""
    from compel import Compel

    tokenizer = Pipeline.load(onnx_fp32, backend="ort", device="cpu").tokenizer
    theirs = [(f.text, f.weight) for f in Compel.parse_prompt_string(prompt).prompts[0].children]
    ours = parse_weighted(prompt)
    assert [tokenizer.content_ids(t) for t, _ in ours] == [tokenizer.content_ids(t) for t, _ in theirs]
    np.testing.assert_allclose([w for _, w in ours], [w for _, w in theirs], rtol=1e-12)


@pytest.fixture(scope="module")
def pipes(onnx_fp32, tiny_checkpoint):
    return Pipeline.load(onnx_fp32, backend="ort", device="cpu"), Pipeline.load(
        tiny_checkpoint, backend="torch"
    )


LONG = ", ".join(["a (highly)1.2 detailed photo of a red- cat sitting on a wooden chair"] * 8)


@pytest.mark.parametrize(
    ("prompt", "negative", "extra"),
    [
        ("a (red cat)1.3 on a chair++", "blurry", {}),
        ("a red- cat on a (wooden chair)0.5", "(blurry)1.2, ugly-", {}),  # two fragments blended out
        (["a (b (c)1.5 d)0.8 e", "a cat+++,dog--"], "blurry", {}),  # a batch
        (LONG, "blurry", {"long_prompts": True}),  # weights across windows
    ],
    ids=["up", "down", "batch", "long"],
)
def test_weighted_prompts_match_diffusers_with_compel(pipes, prompt, negative, extra):
    pipe, ref = pipes
    a, b = (p(prompt, negative, prompt_weights=True, **SETTINGS, **extra).array for p in (pipe, ref))
    assert psnr(a, b) >= 60
    plain = pipe(parse_text(prompt), negative, **SETTINGS, **extra).array
    assert psnr(a, plain) < 80  # the weights did something (the same words unweighted agree to 130 dB)


def parse_text(prompt):
    """The prompt's words without its weights."""
    texts = [prompt] if isinstance(prompt, str) else prompt
    words = [" ".join(t for t, _ in parse_weighted(text)) for text in texts]
    return words[0] if isinstance(prompt, str) else words


def test_prompts_without_weights_are_unchanged(pipes):
    pipe, _ = pipes
    np.testing.assert_allclose(
        pipe("a photo of a cat", "blurry", prompt_weights=True, **SETTINGS).array,
        pipe("a photo of a cat", "blurry", **SETTINGS).array,
        atol=1e-5,
    )


def test_refusals(pipes):
    pipe, ref = pipes
    with pytest.raises(InvalidArgumentError, match="not supported"):
        pipe('("a cat", "a dog").blend(0.5, 0.5)', prompt_weights=True, **SETTINGS)
    with pytest.raises(UnsupportedConfigError, match="compel, which has no clip_skip"):
        ref("a cat+", prompt_weights=True, clip_skip=1, **SETTINGS)


def test_cli_prompt_weights(onnx_fp32, tmp_path):
    out = tmp_path / "cat.png"
    args = ["generate", str(onnx_fp32), "a (red cat)1.3", "--steps", "2", "--height", "64", "--width", "64"]
    assert main([*args, "--prompt-weights", "--device", "cpu", "--output", str(out)]) == 0
    assert read_png_parameters(out)["prompt_weights"] == "compel"
