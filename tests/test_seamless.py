"""Seamless images (export/seamless.py, ``sdengine export --seamless``; the web UI's "Tiling"): the UNet's
and VAE's convolutions wrap around, so the models work on a torus and their images tile."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_server import call, pixels

from sdengine.errors import InvalidArgumentError
from sdengine.images import psnr
from sdengine.infotext import parse_infotext
from sdengine.pipeline import Pipeline
from sdengine.server import serve_in_thread

PROMPT = "a tiled floor of stones"
#: 128 pixels: 16 latent pixels, so a shift of 8 latent pixels is a whole cell of the tiny UNet's three
#: downsamplings (a shift the torus maps onto itself at every level)
SETTINGS = dict(steps=4, seed=2, height=128, width=128, scheduler="euler", guidance=7.5)


@pytest.fixture(scope="module")
def onnx_seamless(tiny_checkpoint, tmp_path_factory):
    from export.onnx_export import export_checkpoint

    out = tmp_path_factory.mktemp("onnx") / "seamless"
    export_checkpoint(tiny_checkpoint, out, seamless=True)
    return out


@pytest.fixture(scope="module")
def seamless_pipe(onnx_seamless):
    return Pipeline.load(onnx_seamless, backend="ort", device="cpu")


def shifted_latents(shift: int) -> tuple[np.ndarray, np.ndarray]:
    latents = np.random.default_rng(7).standard_normal((1, 4, 16, 16)).astype(np.float32)
    return latents, np.roll(latents, (shift, shift), axis=(2, 3))


def test_shifted_noise_makes_the_shifted_image(seamless_pipe, ort_pipe_fp32):
    """On the torus, the whole run commutes with a shift: the image of shifted noise is the image shifted
    (8 latent pixels, 64 image pixels). Zero padding breaks this at the edges, by far."""
    latents, shifted = shifted_latents(8)
    image = seamless_pipe(PROMPT, **SETTINGS, latents=latents).array
    moved = seamless_pipe(PROMPT, **SETTINGS, latents=shifted).array
    np.testing.assert_allclose(moved, np.roll(image, (64, 64), axis=(1, 2)), rtol=0, atol=2e-4)
    plain = [ort_pipe_fp32(PROMPT, **SETTINGS, latents=x).array for x in (latents, shifted)]
    assert np.abs(plain[1] - np.roll(plain[0], (64, 64), axis=(1, 2))).max() > 0.05


def test_matches_diffusers_with_circular_convolutions(seamless_pipe, tiny_checkpoint):
    theirs = Pipeline.load(tiny_checkpoint, backend="torch", seamless=True)
    for settings in (SETTINGS, dict(SETTINGS, scheduler="dpmpp_2m", batch=2, height=64, width=96)):
        ours, ref = seamless_pipe(PROMPT, "blurry", **settings), theirs(PROMPT, "blurry", **settings)
        assert psnr(ours.array, ref.array) >= 100
        assert ours.request.parameters(0)["seamless"] is True and ref.request.seamless


def test_the_export_records_it_and_info_says_so(onnx_seamless, seamless_pipe, onnx_fp32, ort_pipe_fp32):
    from sdengine.info import describe
    from sdengine.manifest import Manifest

    assert Manifest.read(onnx_seamless).seamless and not Manifest.read(onnx_fp32).seamless
    assert seamless_pipe.seamless and not ort_pipe_fp32.seamless
    assert describe(onnx_seamless)["seamless"] == "yes: its images tile"
    assert describe(onnx_fp32)["seamless"] == "no"


def test_refusals(onnx_fp32):
    with pytest.raises(InvalidArgumentError, match="only the torch backend takes it at load"):
        Pipeline.load(onnx_fp32, backend="ort", device="cpu", seamless=True)


def test_the_web_uis_tiling_field(seamless_pipe, ort_pipe_fp32):
    body = {"prompt": PROMPT, "width": 64, "height": 64, "steps": 2, "seed": 3, "tiling": True}
    answers = {}
    for name, pipe in (("seamless", seamless_pipe), ("plain", ort_pipe_fp32)):
        server = serve_in_thread(pipe)
        try:
            answers[name] = call(f"http://127.0.0.1:{server.server_address[1]}", "/sdapi/v1/txt2img", body)
        finally:
            server.shutdown()
    status, answer = answers["seamless"]
    assert status == 200 and pixels(answer["images"][0]).shape == (64, 64, 3)
    assert parse_infotext(json.loads(answer["info"])["infotexts"][0])["Tiling"] == "True"
    status, refused = answers["plain"]
    assert status == 422 and "not seamless" in refused["detail"]


def test_generate_and_export_flags(tiny_checkpoint, tmp_path):
    from PIL import Image

    from sdengine.cli import main

    assert main(["export", str(tiny_checkpoint), "--output", str(tmp_path / "onnx"), "--seamless"]) == 0
    args = ["generate", str(tmp_path / "onnx"), PROMPT, "--steps", "2", "--height", "64", "--width", "64"]
    assert main([*args, "--device", "cpu", "--output", str(tmp_path / "a.png")]) == 0
    image = Image.open(tmp_path / "a.png")
    assert json.loads(image.info["sdengine"])["seamless"] is True
    assert parse_infotext(image.info["parameters"])["Tiling"] == "True"
