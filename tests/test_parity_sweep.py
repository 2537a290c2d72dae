"""benchmarks/parity_sweep.py: random combinations of settings judged against a reference; a few run here
(the sweep itself is run by hand, longer), and its verdicts can fail."""

from __future__ import annotations

import random

import numpy as np
import pytest

from benchmarks.parity_sweep import (
    Outcome,
    caller,
    compare,
    images_agree,
    latents_agree,
    random_settings,
    sweep,
)
from sdengine.errors import InvalidArgumentError, UnsupportedConfigError
from sdengine.pipeline import Pipeline

NONE = {"pag": False, "freeu": False, "deepcache": False}


@pytest.fixture(scope="module")
def bound_pipe(ort_pipe_fp32):
    from sdengine.backends.ort_cuda import OrtCudaBackend

    model_dir = ort_pipe_fp32.model_dir
    return Pipeline(model_dir, OrtCudaBackend(model_dir, device="cpu"), ort_pipe_fp32.tokenizer)


@pytest.fixture(scope="module")
def torch_pipe(tiny_checkpoint):
    return Pipeline.load(tiny_checkpoint, backend="torch")


def test_the_engine_agrees_with_the_bound_loop_and_with_diffusers(ort_pipe_fp32, bound_pipe, torch_pipe):
    lines: list[str] = []
    bound = sweep(
        caller(ort_pipe_fp32),
        caller(bound_pipe),
        latents_agree(),
        combos=4,
        seed=1,
        features=NONE,
        engine_only=True,
        report=lines.append,
    )
    torch = sweep(
        caller(ort_pipe_fp32),
        caller(torch_pipe),
        images_agree(80.0),
        combos=4,
        seed=2,
        features=NONE,
        engine_only=False,
        report=lines.append,
    )
    assert not [o for o in bound + torch if o.failed], "\n".join(lines)
    assert len(lines) == 8 and lines[0].startswith("[0] ")


def test_settings_are_drawn_as_the_model_and_the_reference_allow():
    rng = random.Random(0)
    drawn = [random_settings(rng, NONE, engine_only=False) for _ in range(200)]
    assert not any(k in s for s in drawn for k in ("pag_scale", "freeu", "deepcache_interval"))
    assert not any(" AND " in s["prompt"] or "(" in s["prompt"] for s in drawn)
    assert all("steps" in s or "sigmas" in s or "timesteps" in s for s in drawn)
    assert {s["scheduler"] for s in drawn} >= {"euler", "dpmpp_2m", "heun"} and any(
        "mask" in s for s in drawn
    )
    wide = [random_settings(rng, {"pag": True, "freeu": True, "deepcache": True}, True) for _ in range(200)]
    assert all(any(k in s for s in wide) for k in ("pag_scale", "freeu", "deepcache_interval"))
    assert any(" AND " in s["prompt"] for s in wide)


def test_the_verdicts():
    ok = lambda negative, settings: settings["seed"]  # noqa: E731
    same = lambda a, b: (a == b, "same" if a == b else "apart")  # noqa: E731

    def refuses(error):
        def call(negative, settings):
            raise error

        return call

    settings = {"prompt": "a cat", "seed": 3}
    assert compare(ok, ok, settings, same) == Outcome("ok", "same", settings)
    assert compare(ok, lambda n, s: 4, settings, same).failed
    lacks = compare(ok, refuses(UnsupportedConfigError("diffusers has none")), settings, same)
    assert lacks.verdict == "reference lacks it" and not lacks.failed
    assert compare(refuses(UnsupportedConfigError("no")), ok, settings, same).failed  # the engine's refusal
    both = compare(refuses(InvalidArgumentError("bad")), refuses(InvalidArgumentError("bad")), settings, same)
    assert both.verdict == "refused by both"
    assert compare(refuses(InvalidArgumentError("a")), refuses(ValueError("b")), settings, same).failed
    assert compare(ok, refuses(InvalidArgumentError("x")), settings, same).failed  # not a lack: a refusal


def test_images_and_latents_apart_fail(ort_pipe_fp32):
    result = ort_pipe_fp32("a cat", height=64, width=64, steps=2, seed=1)
    moved = type(result)(**{**vars(result), "array": np.clip(result.array + 0.01, 0, 1)})
    assert images_agree(80.0)(result, result)[0] and not images_agree(80.0)(result, moved)[0]
    shifted = type(result)(**{**vars(result), "latents": result.latents * 1.001})
    assert latents_agree()(result, result)[0] and not latents_agree()(result, shifted)[0]
