"""Variations: a seed's initial noise moved along the sphere towards another seed's."""

from __future__ import annotations

import numpy as np
import pytest

from sdengine.errors import InvalidArgumentError
from sdengine.images import psnr
from sdengine.pipeline import Pipeline
from sdengine.request import slerp

PROMPT = "a harbour at night"
SETTINGS = dict(steps=4, seed=10, height=64, width=64)


def test_slerp_keeps_unit_noise_unit_and_ends_at_both_ends():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 4, 64, 64)), rng.standard_normal((2, 4, 64, 64))
    np.testing.assert_allclose(slerp(0.0, a, b), a, atol=1e-6)
    np.testing.assert_allclose(slerp(1.0, a, b), b, atol=1e-6)
    middle = slerp(0.5, a, b)
    norms = np.linalg.norm(middle.reshape(2, -1), axis=1) / np.linalg.norm(a.reshape(2, -1), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=0.03)  # a straight line's midpoint is about 0.71 as long
    np.testing.assert_allclose(slerp(0.3, a, a), a, atol=1e-6)  # parallel: no angle to follow


def test_variations_run_between_the_two_seeds(ort_pipe_fp32):
    plain = ort_pipe_fp32(PROMPT, **SETTINGS).latents
    other = ort_pipe_fp32(PROMPT, **{**SETTINGS, "seed": 77}).latents
    at = {
        t: ort_pipe_fp32(PROMPT, variation_seed=77, variation_strength=t, **SETTINGS) for t in (0.0, 0.2, 1.0)
    }
    np.testing.assert_array_equal(at[0.0].latents, plain)
    np.testing.assert_allclose(at[1.0].latents, other, rtol=0, atol=1e-4 * float(np.abs(other).max()))
    near = ort_pipe_fp32(PROMPT, **SETTINGS)
    assert 20 < psnr(at[0.2].array, near.array) < 60  # close to the seed's image, not the same
    assert at[0.2].request.parameters()["variation_strength"] == 0.2


def test_batch_items_vary_with_their_own_seeds_and_match_diffusers(ort_pipe_fp32, tiny_checkpoint):
    batch = ort_pipe_fp32(PROMPT, batch=2, variation_seed=5, variation_strength=0.4, **SETTINGS)
    second = ort_pipe_fp32(PROMPT, variation_seed=6, variation_strength=0.4, **{**SETTINGS, "seed": 11})
    np.testing.assert_allclose(
        batch.latents[1:], second.latents, rtol=0, atol=1e-5 * float(np.abs(second.latents).max())
    )
    ref = Pipeline.load(tiny_checkpoint, backend="torch")(
        PROMPT, batch=2, variation_seed=5, variation_strength=0.4, **SETTINGS
    )
    assert psnr(batch.array, ref.array) >= 100


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(variation_strength=0.5), "needs a variation_seed"),
        (dict(variation_seed=3, variation_strength=1.5), "variation_strength must be a number in"),
        (dict(variation_seed=-1, variation_strength=0.5), "variation_seed must be in"),
        (dict(variation_seed=3, variation_strength=0.5, latents=np.zeros((1, 4, 8, 8))), "supplied latents"),
    ],
)
def test_bad_variations_are_refused(ort_pipe_fp32, settings, message):
    with pytest.raises(InvalidArgumentError, match=message):
        ort_pipe_fp32.request(PROMPT, **{**SETTINGS, **settings})
