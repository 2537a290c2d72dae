"""Tiled VAE runs, against diffusers' ``AutoencoderKL.enable_tiling()`` on the same latents and draws."""

from __future__ import annotations

import numpy as np
import pytest
from test_img2img import picture

from sdengine.cli import main
from sdengine.images import psnr
from sdengine.pipeline import Pipeline
from sdengine.vae_tiling import needs_tiles, run_tiled

PROMPT = "a harbour at night"


@pytest.fixture(scope="module")
def tiled_pipes(tiny_checkpoint, onnx_fp32):
    """(ONNX Runtime, diffusers) with tiling on; the tiny VAE's tiles are 64 pixels (8 latents)."""
    return (
        Pipeline.load(onnx_fp32, backend="ort", device="cpu", vae_tiling=True),
        Pipeline.load(tiny_checkpoint, backend="torch", vae_tiling=True),
    )


@pytest.mark.parametrize(
    "settings",
    [dict(height=80, width=136), dict(image=picture(80, 136), strength=0.6)],
    ids=["decode", "encode-and-decode"],
)
def test_tiled_runs_match_diffusers_tiling(tiled_pipes, ort_pipe_fp32, settings):
    settings = dict(steps=3, seed=2, scheduler="ddim", **settings)
    ours, ref = (pipe(PROMPT, **settings) for pipe in tiled_pipes)
    assert tiled_pipes[0].model_dir.vae_sample_size == 64
    assert psnr(ours.array, ref.array) >= 40
    np.testing.assert_allclose(ours.array, ref.array, rtol=0, atol=1e-4)  # the seams blended alike
    whole = ort_pipe_fp32(PROMPT, **settings)  # the same run without tiles differs: tiling really happened
    assert psnr(ours.array, whole.array) < 60


def test_images_of_one_tile_are_not_tiled(tiled_pipes, ort_pipe_fp32):
    settings = dict(steps=2, seed=1, height=64, width=64)
    np.testing.assert_array_equal(
        tiled_pipes[0](PROMPT, **settings).array, ort_pipe_fp32(PROMPT, **settings).array
    )


def test_each_run_sees_at_most_one_tile():
    seen = []

    def upsample(tile: np.ndarray) -> np.ndarray:  # a stand-in decoder: 8x nearest upsampling
        seen.append(tile.shape)
        return tile.repeat(8, axis=2).repeat(8, axis=3)

    latents = np.random.default_rng(0).standard_normal((2, 4, 20, 30)).astype(np.float32)
    assert needs_tiles(latents, 8) and not needs_tiles(latents[:, :, :8, :8], 8)
    out = run_tiled(upsample, latents, 8, 64)
    assert out.shape == (2, 4, 160, 240)
    assert all(h <= 8 and w <= 8 for *_, h, w in seen) and len(seen) == 4 * 5  # tiles every 6 latents
    constant = np.full((1, 3, 20, 30), 0.5, np.float32)
    np.testing.assert_allclose(run_tiled(upsample, constant, 8, 64), 0.5, rtol=1e-6)  # blends are convex


def test_cli_vae_tiling(onnx_fp32, tmp_path):
    out = tmp_path / "wide.png"
    args = ["generate", str(onnx_fp32), PROMPT, "--steps", "2", "--height", "64", "--width", "136"]
    assert main([*args, "--vae-tiling", "--device", "cpu", "--output", str(out)]) == 0
    assert out.is_file()
