"""The hires fix: its latent upscaler against torch's, its settings and refusals, both upscalers end to end
against diffusers (text to image, then image to image from the enlarged latents or images), previews over both
passes, and the CLI."""

from __future__ import annotations

import numpy as np
import pytest

from sdengine.cli import main
from sdengine.errors import InvalidArgumentError
from sdengine.hires import upscale_latents
from sdengine.images import psnr, read_png_parameters
from sdengine.pipeline import Pipeline

PROMPT = "a photo of an astronaut riding a horse on mars"
SETTINGS = dict(steps=4, seed=3, height=64, width=64, scheduler="euler")


@pytest.mark.parametrize("size", [(16, 24), (12, 18), (13, 17), (8, 12)])
def test_latents_upscale_as_torch_interpolates(size):
    import torch

    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 12)).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(latents), size=size, mode="bilinear")
    np.testing.assert_allclose(upscale_latents(latents, *size), expected.numpy(), rtol=0, atol=1e-5)


def test_settings_and_defaults(ort_pipe_fp32):
    request = ort_pipe_fp32.request(PROMPT, **{**SETTINGS, "width": 96}, hires_scale=1.5)
    hires = request.hires
    assert (hires.height, hires.width, hires.steps, hires.strength, hires.upscale) == (
        96,
        144,
        4,
        0.7,
        "latent",
    )
    assert request.parameters()["hires_size"] == "96x144"
    odd = ort_pipe_fp32.request(PROMPT, **SETTINGS, hires_scale=1.3, hires_steps=10, hires_strength=0.3)
    assert (odd.hires.height, odd.hires.steps, odd.hires.strength) == (80, 10, 0.3)  # int(83.2) // 8 * 8
    second = odd.hires_pass(init_latents=np.zeros((1, 4, 10, 10), np.float32))
    assert (second.height, second.steps, second.strength, second.hires, second.latents) == (
        80,
        10,
        0.3,
        None,
        None,
    )
    assert second.image_to_image and second.schedule_strength == 0.3


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(hires_scale=1.0), r"hires_scale must be a number in \(1, 4\]"),
        (dict(hires_scale=5), r"hires_scale must be a number in \(1, 4\]"),
        (dict(hires_scale="2"), r"hires_scale must be a number"),
        (dict(hires_scale=1.1), "hires_scale 1.1 leaves 64x64 as it is"),
        (dict(hires_scale=2, hires_strength=0), r"hires_strength must be a number in \(0, 1\]"),
        (dict(hires_scale=2, hires_steps=0), "hires_steps must be a whole number >= 1"),
        (dict(hires_scale=2, hires_steps=2, hires_strength=0.4), "runs no step"),
        (dict(hires_scale=2, hires_upscale="esrgan"), "hires_upscale must be latent or image"),
        (
            dict(hires_strength=0.5, hires_upscale="image"),
            "hires_strength, hires_upscale apply to the hires fix",
        ),
        (
            dict(hires_scale=2, image=np.zeros((64, 64, 3))),
            "the hires fix follows text to image: it takes no",
        ),
    ],
)
def test_bad_settings_are_refused(ort_pipe_fp32, settings, message):
    with pytest.raises(InvalidArgumentError, match=message):
        ort_pipe_fp32.request(PROMPT, **SETTINGS, **settings)


@pytest.fixture(scope="module")
def torch_pipe(tiny_checkpoint):
    return Pipeline.load(tiny_checkpoint, backend="torch")


@pytest.mark.parametrize(
    "extra",
    [
        dict(hires_scale=2),
        dict(hires_scale=1.5, hires_upscale="image", hires_strength=0.5),
        dict(hires_scale=2, scheduler="euler_a", hires_steps=6, batch=2),  # per-step noise at the larger size
    ],
)
def test_matches_diffusers_text_to_image_then_image_to_image(ort_pipe_fp32, torch_pipe, extra):
    settings = {**SETTINGS, **extra}
    ours, ref = ort_pipe_fp32(PROMPT, "blurry", **settings), torch_pipe(PROMPT, "blurry", **settings)
    hires = ours.request.hires
    assert ours.array.shape == (settings.get("batch", 1), hires.height, hires.width, 3)
    # "image": the first pass's images are rounded to 8 bits before they are resized, as every input image is,
    # so a pixel that rounds one way on one backend and the other way on the other differs by 1/255
    assert psnr(ours.array, ref.array) >= (90 if settings.get("hires_upscale") == "image" else 100)
    # not the larger size drawn straight away: the first pass shapes the second
    plain = {k: v for k, v in settings.items() if not k.startswith("hires")}
    straight = ort_pipe_fp32(PROMPT, "blurry", **{**plain, "height": hires.height, "width": hires.width})
    assert psnr(ours.array, straight.array) < 40
    assert ours.times.count("denoise") == 2


def test_first_pass_latents_are_the_text_to_image_ones(ort_pipe_fp32, monkeypatch):
    """The second pass starts from the first pass's final latents, upscaled: caught at the hand-over."""
    seen = {}
    upscale = ort_pipe_fp32.upscale_latents

    def spy(latents, height, width):
        seen["first"] = latents
        return upscale(latents, height, width)

    monkeypatch.setattr(ort_pipe_fp32, "upscale_latents", spy)
    ort_pipe_fp32(PROMPT, **SETTINGS, hires_scale=2)
    np.testing.assert_array_equal(seen["first"], ort_pipe_fp32(PROMPT, **SETTINGS).latents)


def test_previews_count_on_over_both_passes(ort_pipe_fp32):
    calls = []
    result = ort_pipe_fp32(
        PROMPT,
        **SETTINGS,
        hires_scale=2,
        preview=lambda k, x: calls.append((k, x.shape[-1])),
        preview_every=1,
    )
    # euler: 4 calls, then int(4 * 0.7) = 2 calls at twice the size; the last call of each pass is no preview
    assert calls == [(1, 8), (2, 8), (3, 8), (5, 16)]
    assert result.latents.shape[-1] == 16


def test_cli_writes_the_larger_image(onnx_fp32, tmp_path, capsys):
    out = tmp_path / "cat.png"
    args = ["generate", str(onnx_fp32), PROMPT, "--steps", "2", "--height", "64", "--width", "64"]
    args += ["--device", "cpu", "--output", str(out)]
    assert main([*args, "--hires-scale", "1.5", "--hires-upscale", "image"]) == 0
    from PIL import Image

    assert Image.open(out).size == (96, 96)
    recorded = read_png_parameters(out)
    assert (recorded["height"], recorded["hires_size"], recorded["hires_upscale"]) == (64, "96x96", "image")
    assert main([*args, "--hires-scale", "0.5"]) == 1
    assert "hires_scale must be a number in (1, 4]" in capsys.readouterr().err


def test_composable_prompts_carry_into_the_second_pass(ort_pipe_fp32):
    settings = dict(SETTINGS, hires_scale=2.0, prompt_weights="a1111")
    doubled = ort_pipe_fp32(f"{PROMPT} AND {PROMPT}", guidance=3.0, **settings)
    np.testing.assert_allclose(
        doubled.latents, ort_pipe_fp32(PROMPT, guidance=6.0, **settings).latents, atol=1e-4
    )
