"""Image to image: the VAE encoder, the strength-shortened schedule and the noised start, against diffusers'
``StableDiffusionImg2ImgPipeline`` fed the same draws, on every backend the CPU can run."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdengine.cli import main
from sdengine.errors import InvalidArgumentError, ModelDirectoryError
from sdengine.images import image_array, psnr, read_png_parameters
from sdengine.pipeline import Pipeline

PROMPT = "a watercolour of a lighthouse"
#: stochastic ones included: the baseline draws the engine's per-step noise
SCHEDULERS = ["ddim", "pndm", "euler", "euler_a", "heun", "dpm2", "dpmpp_2m", "dpmpp_2m_sde", "unipc"]


def picture(height: int = 64, width: int = 96, seed: int = 0) -> np.ndarray:
    """A smooth colour image (1, H, W, 3) in [0, 1]: structure for the VAE to encode."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    phase = np.random.default_rng(seed).uniform(0, 2 * np.pi, 3)
    channels = [0.5 + 0.4 * np.sin(6 * x + 4 * y + p) for p in phase]
    return np.stack(channels, axis=-1)[None].astype(np.float32)


@pytest.fixture(scope="module")
def torch_pipe(tiny_checkpoint):
    return Pipeline.load(tiny_checkpoint, backend="torch")


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_image_to_image_matches_diffusers(ort_pipe_fp32, torch_pipe, scheduler):
    settings = dict(steps=8, seed=4, scheduler=scheduler, guidance=7.5, image=picture(), strength=0.6)
    ours = ort_pipe_fp32(PROMPT, "blurry", **settings)
    ref = torch_pipe(PROMPT, "blurry", **settings)
    assert ours.array.shape == ref.array.shape == (1, 64, 96, 3)  # the size follows the image
    assert ours.times.count("vae_encode") == 1
    assert psnr(ours.array, ref.array) >= 40
    np.testing.assert_allclose(ours.latents, ref.latents, rtol=0, atol=1e-3)


def test_strength_changes_how_much_of_the_image_survives(ort_pipe_fp32, torch_pipe):
    """One image for a batch of two, strength 1 (noise only at the top of the schedule) and a light touch."""
    image = picture(seed=1)
    for strength in (1.0, 0.3):
        settings = dict(steps=10, seed=9, image=image, strength=strength, batch=2)
        ours = ort_pipe_fp32(["a cat", "a dog"], **settings)
        ref = torch_pipe(["a cat", "a dog"], **settings)
        assert psnr(ours.array, ref.array) >= 40, strength
    light = ort_pipe_fp32(PROMPT, steps=10, seed=9, image=image, strength=0.1, scheduler="ddim")
    heavy = ort_pipe_fp32(PROMPT, steps=10, seed=9, image=image, strength=1.0, scheduler="ddim")
    assert (light.times.count("step_call"), heavy.times.count("step_call")) == (1, 10)
    mean = ort_pipe_fp32.backend.encode_image(light.request.pixels())[:, :4]
    target = mean * ort_pipe_fp32.model_dir.vae_scaling_factor  # where the image itself sits
    assert np.abs(light.latents - target).mean() < 0.5 * np.abs(heavy.latents - target).mean()


def test_every_bound_backend_gives_the_host_image(ort_pipe_fp32):
    from sdengine.backends.ort_cuda import OrtCudaBackend

    bound = Pipeline(
        ort_pipe_fp32.model_dir,
        OrtCudaBackend(ort_pipe_fp32.model_dir, device="cpu"),
        ort_pipe_fp32.tokenizer,
    )
    settings = dict(steps=6, seed=2, image=picture(), strength=0.7, scheduler="euler_a")
    np.testing.assert_allclose(
        bound(PROMPT, **settings).latents, ort_pipe_fp32(PROMPT, **settings).latents, atol=1e-4
    )


def test_input_images_are_sized_like_diffusers(ort_pipe_fp32):
    odd = Image.fromarray((picture(70, 90)[0] * 255).astype(np.uint8))
    request = ort_pipe_fp32.request(PROMPT, image=odd)
    assert (request.height, request.width) == (64, 88)  # rounded down to a multiple of 8
    assert request.image.shape == (1, 64, 88, 3)
    request = ort_pipe_fp32.request(PROMPT, image=[odd, odd], height=32, width=48, batch=2)
    assert request.image.shape == (2, 32, 48, 3)  # resized to the size asked for
    same = image_array(picture(), 64, 96)
    np.testing.assert_array_equal(same, picture())  # the right size is taken as it is
    np.testing.assert_allclose(
        image_array((picture() * 255).round().astype(np.uint8), 64, 96), picture(), atol=0.5 / 255
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(strength=0.0), "strength must be"),
        (dict(strength=1.5), "strength must be"),
        (dict(strength=float("nan")), "strength must be"),
        (dict(strength=0.05, steps=10), "no denoising step"),
        (dict(image=np.zeros((1, 64, 96, 4))), "image array must be"),
        (dict(image=np.full((1, 64, 96, 3), 2.0)), r"\[0, 1\]"),
        (dict(image=np.zeros((3, 64, 96, 3)), batch=2), "image has shape"),
        (dict(image="cat.png"), "PIL image"),
    ],
)
def test_bad_image_requests_are_refused(ort_pipe_fp32, settings, message):
    settings = {"image": picture(), "steps": 4, **settings}
    with pytest.raises(InvalidArgumentError, match=message):
        ort_pipe_fp32(PROMPT, **settings)


def test_strength_without_an_image_is_refused(ort_pipe_fp32):
    with pytest.raises(InvalidArgumentError, match="strength applies to image to image only"):
        ort_pipe_fp32(PROMPT, steps=2, strength=0.5)
    with pytest.raises(InvalidArgumentError, match="cannot resize"):
        ort_pipe_fp32(PROMPT, steps=2, image=picture(), height=0)


def test_cli_image_to_image(onnx_fp32, tmp_path, capsys):
    source = tmp_path / "in.png"
    Image.fromarray((picture()[0] * 255).astype(np.uint8)).save(source)
    out = tmp_path / "out.png"
    args = ["generate", str(onnx_fp32), PROMPT, "--image", str(source), "--strength", "0.5", "--steps", "4"]
    assert main([*args, "--seed", "3", "--output", str(out), "--device", "cpu"]) == 0
    params = read_png_parameters(out)
    assert (params["image"], params["strength"]) == ("supplied", 0.5)
    with Image.open(out) as img:
        assert img.size == (96, 64)
    capsys.readouterr()
    assert main(["generate", str(onnx_fp32), PROMPT, "--image", str(tmp_path / "missing.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert "cannot read image" in err and "\n" not in err


def test_an_export_without_the_vae_encoder_says_how_to_get_one(tiny_checkpoint, tmp_path, capsys):
    from export.onnx_export import export_checkpoint

    onnx = tmp_path / "onnx"
    export_checkpoint(tiny_checkpoint, onnx, components=["text_encoder", "unet", "vae_decoder"])
    pipe = Pipeline.load(onnx, backend="ort", device="cpu")
    assert pipe(PROMPT, steps=2, height=64, width=64).array.shape == (1, 64, 64, 3)  # text to image runs
    with pytest.raises(ModelDirectoryError, match="no vae_encoder model"):
        pipe(PROMPT, steps=2, image=picture())
