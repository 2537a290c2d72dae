"""Prompt weights in the AUTOMATIC1111 web UI's syntax: its parser's documented examples, how windows fill,
the mean-keeping arithmetic, and end to end against the torch baseline."""

from __future__ import annotations

import numpy as np
import pytest

from sdengine.cli import main
from sdengine.errors import InvalidArgumentError
from sdengine.images import psnr, read_png_parameters
from sdengine.prompt_weights_a1111 import BREAK, a1111_embeddings, a1111_windows, parse_a1111

SETTINGS = dict(steps=4, seed=5, height=64, width=64, prompt_weights="a1111")


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [  # the examples of the web UI's parse_prompt_attention docstring
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        ),
        # and what follows from its grammar
        ("a cat BREAK a dog", [("a cat", 1.0), BREAK, ("a dog", 1.0)]),
        ("ratio 16:9, (x : 1.5 ) y)", [("ratio 16:9, ", 1.0), ("x ", 1.5), (" y)", 1.0)]),
        ("[[dim]] \\\\ end\\", [("dim", 1 / 1.1 / 1.1), (" \\ end", 1.0)]),
        ("", [("", 1.0)]),
    ],
)
def test_parse_as_the_web_ui(prompt, expected):
    assert parse_a1111(prompt) == expected


def test_a_weight_that_is_no_number_is_refused():
    with pytest.raises(InvalidArgumentError, match="'1.2.3' is not a weight"):
        parse_a1111("a (cat:1.2.3)")


@pytest.mark.parametrize("prompt", ["a cat AND a dog", "a cat AND a dog:0.5", "[a cat AND a dog:a fox:0.5]"])
def test_the_web_uis_composable_and_splits_positive_prompts_only(prompt):
    from sdengine.request import make_request

    size = {"height": 64, "width": 64}

    assert len(make_request(prompt, prompt_weights="a1111", **size).composable[0]) == 2
    assert make_request(["a fox", prompt], prompt_weights="a1111", batch=2, **size).copies == 3
    # the web UI reads these as text, and so does sdengine
    for text in ("ANDROID, a cat and a dog", "a cat, BAND"):
        assert make_request(text, prompt_weights="a1111", **size).composable == ()
    negative = make_request("a fox", negative_prompt=prompt, prompt_weights="a1111", **size)
    assert negative.composable == () and negative.texts == [prompt, "a fox"]
    assert make_request(prompt, **size).composable == ()  # another syntax: plain text


def fake_ids(text: str) -> list[int]:
    """Word i -> token i + 10, a comma -> 1: one token per word."""
    return [1 if word == "," else int(word[1:]) + 10 for word in text.replace(",", " , ").split()]


def words(first: int, count: int) -> str:
    return " ".join(f"w{i}" for i in range(first, first + count))


def test_windows_break_after_a_recent_comma_at_breaks_and_when_full():
    specials, window = (0, 2, 3), 75
    # a comma 5 tokens before the end of a full window: the window ends after it (EOS, then the padding, as
    # the web UI lays out a tokenizer whose pad is not its EOS), the rest moves on
    ids, weights = a1111_windows([(words(0, 70) + " , " + words(70, 10), 1.2)], fake_ids, specials, 1, window)
    assert ids.shape == (2, 77) and list(ids[0, 70:74]) == [79, 1, 2, 3] and ids[0, -1] == 3
    assert list(ids[1, 1:11]) == list(range(80, 90)) and weights[1, 1] == pytest.approx(1.2)
    # a comma further back than 20 tokens: the window is cut where it is full
    ids, _ = a1111_windows([(words(0, 40) + " , " + words(40, 40), 1.0)], fake_ids, specials, 1, window)
    assert list(ids[0, 74:77]) == [82, 83, 2] and ids[1, 1] == 84
    # BREAK closes a window early; the markers and padding weigh 1
    ids, weights = a1111_windows([("w0 w1", 1.5), BREAK, ("w2", 1.0)], fake_ids, specials, 1, window)
    assert list(ids[:, :4].ravel()) == [0, 10, 11, 2, 0, 12, 2, 3]
    assert list(weights[0, :4]) == [1.0, 1.5, 1.5, 1.0]


def test_each_window_keeps_its_mean():
    rng = np.random.default_rng(0)

    def encode(ids: np.ndarray) -> np.ndarray:
        return rng.normal(0.5, 1.0, (*ids.shape, 8)).astype(np.float32)

    fragments = [(words(0, 60), 1.3), BREAK, (words(60, 5), 0.7)]
    z = a1111_embeddings(fragments, fake_ids, encode, (0, 2, 3), 1, 75, True).reshape(2, 77, 8)
    rng = np.random.default_rng(0)
    plain = encode(np.zeros((2, 77)))
    np.testing.assert_allclose(z.mean(axis=(1, 2)), plain.mean(axis=(1, 2)), rtol=1e-5)
    ratio = z / plain  # one factor per window, times each token's weight
    np.testing.assert_allclose(ratio[0, 1] / ratio[0, 0], 1.3, rtol=1e-5)
    np.testing.assert_allclose(ratio[1, 1] / ratio[1, 0], 0.7, rtol=1e-5)


@pytest.fixture(scope="module")
def pipes(biased_pipes):
    return biased_pipes


LONG = ", ".join(["a (big:1.2) red [cat]"] * 12) + " BREAK (sky:0.6)"


@pytest.mark.parametrize(
    ("prompt", "extra"),
    [
        ("a (red:1.4) cat on a [blue] chair", {}),
        ("a ((house)), sun BREAK (sky:0.6)", {"long_prompts": True}),
        (LONG, {"long_prompts": True}),
        (LONG, {}),  # cut after the first window
        ("a (red:1.4) cat", {"clip_skip": 1}),
    ],
)
def test_matches_the_torch_baseline(pipes, prompt, extra):
    ours, ref = (pipe(prompt, "(blurry:1.3)", **SETTINGS, **extra) for pipe in pipes)
    assert psnr(ours.array, ref.array) >= 100
    plain = pipes[0](
        prompt.replace("BREAK", ""), "(blurry:1.3)", **{**SETTINGS, **extra, "prompt_weights": False}
    )
    assert psnr(ours.array, plain.array) < 50  # the weights matter


def test_syntaxes_are_named(pipes, tmp_path):
    with pytest.raises(InvalidArgumentError, match="unknown prompt weighting syntax 'webui'"):
        pipes[0].request("a cat", prompt_weights="webui")
    assert pipes[0].request("a cat", prompt_weights=True).prompt_weights == "compel"
    out = tmp_path / "cat.png"
    root = pipes[0].model_dir.root
    args = ["generate", str(root), "a (red cat:1.3)", "--steps", "2", "--device", "cpu", "--output", str(out)]
    assert main([*args, "--prompt-weights", "a1111"]) == 0
    assert read_png_parameters(out)["prompt_weights"] == "a1111"
