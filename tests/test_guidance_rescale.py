"""Guidance rescale (Lin et al. 2023, sec. 3.4) in the step model, against diffusers' ``guidance_rescale``."""

from __future__ import annotations

import numpy as np
import pytest
from test_img2img import picture

from sdengine.errors import InvalidArgumentError, UnsupportedConfigError
from sdengine.images import psnr
from sdengine.pipeline import Pipeline

PROMPT, NEGATIVE = "a lantern on a table", "blurry"
SETTINGS = dict(steps=4, seed=6, height=64, width=64, guidance_rescale=0.7)


@pytest.fixture(scope="module")
def torch_pipe(tiny_checkpoint):
    return Pipeline.load(tiny_checkpoint, backend="torch")


@pytest.mark.parametrize("settings", [dict(scheduler="ddim"), dict(scheduler="euler", batch=2)])
def test_guidance_rescale_matches_diffusers(ort_pipe_fp32, torch_pipe, settings):
    settings = {**SETTINGS, **settings}
    ours, ref = ort_pipe_fp32(PROMPT, NEGATIVE, **settings), torch_pipe(PROMPT, NEGATIVE, **settings)
    assert psnr(ours.array, ref.array) >= 40
    np.testing.assert_allclose(ours.latents, ref.latents, rtol=0, atol=1e-3)
    plain = ort_pipe_fp32(PROMPT, NEGATIVE, **{**settings, "guidance_rescale": 0.0})
    assert psnr(ours.array, plain.array) < 60  # it does something


def test_without_guidance_there_is_nothing_to_rescale(ort_pipe_fp32):
    settings = {**SETTINGS, "guidance": 1.0}
    np.testing.assert_array_equal(
        ort_pipe_fp32(PROMPT, **settings).array,
        ort_pipe_fp32(PROMPT, **{**settings, "guidance_rescale": 0.0}).array,
    )


def test_the_bound_loop_rescales_like_the_host_loop(ort_pipe_fp32):
    from sdengine.backends.ort_cuda import OrtCudaBackend

    model_dir = ort_pipe_fp32.model_dir
    bound = Pipeline(model_dir, OrtCudaBackend(model_dir, device="cpu"), ort_pipe_fp32.tokenizer)
    settings = {**SETTINGS, "image": picture(64, 64), "strength": 0.75}  # image to image too
    np.testing.assert_allclose(
        bound(PROMPT, NEGATIVE, **settings).latents,
        ort_pipe_fp32(PROMPT, NEGATIVE, **settings).latents,
        atol=1e-4,
    )


def test_bad_factors_are_refused_and_the_baseline_says_what_it_lacks(ort_pipe_fp32, torch_pipe):
    for value in (-0.1, 1.5, float("nan"), "0.5"):
        with pytest.raises(InvalidArgumentError, match="guidance_rescale must be"):
            ort_pipe_fp32(PROMPT, **{**SETTINGS, "guidance_rescale": value})
    with pytest.raises(UnsupportedConfigError, match="no guidance_rescale"):
        torch_pipe(PROMPT, **{**SETTINGS, "image": picture(64, 64)})
