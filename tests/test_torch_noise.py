"""PyTorch's CPU noise without PyTorch (sdengine.torch_noise): against torch.randn itself, and whole runs
against diffusers drawing from real ``torch.Generator("cpu")`` generators, nothing handed to it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_inpaint import inpaint_checkpoint, inpaint_onnx, inpaint_pipes  # noqa: F401 (fixtures)

from sdengine.cli import main
from sdengine.errors import InvalidArgumentError
from sdengine.images import psnr, read_png_parameters
from sdengine.pipeline import Pipeline
from sdengine.torch_noise import TorchCpuGenerator

PROMPT = "a watercolour of a fox in the snow"
SETTINGS = dict(steps=6, seed=11, height=64, width=64, noise_source="torch-cpu")


@pytest.mark.parametrize("seed", [0, 42, 2**32 + 7, 2**63 - 1])
def test_draws_are_torch_s(seed):
    """One generator, draws one after another, sizes that fill whole blocks of 16 and sizes that do not
    (the last 16 values drawn again): within float32 rounding of PyTorch's vectorised log and sincos."""
    ours, theirs = TorchCpuGenerator(seed), torch.Generator("cpu").manual_seed(seed)
    for shape in ((1, 4, 8, 8), (4, 9, 9), (2, 4, 8, 12), (17,), (1, 4, 64, 64), (3, 5, 7)):
        want = torch.randn(shape, generator=theirs).numpy()
        got = ours.randn(shape)
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=5e-6)
    with pytest.raises(ValueError, match="fewer than 16"):
        ours.randn((3, 5))


@pytest.fixture(scope="module")
def torch_pipe(tiny_checkpoint):
    return Pipeline.load(tiny_checkpoint, backend="torch")


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"scheduler": "euler_a", "batch": 2},  # per-step noise: the generators' later draws
        {"scheduler": "dpmpp_2m_sde", "negative_prompt": "grey"},
        {"scheduler": "lcm", "guidance": 1.0},
        {"scheduler": "euler_a", "variation_seed": 5, "variation_strength": 0.3},
        # image to image: the image's latent sample, then the noise added to it, then the steps' noise
        {"image": "picture", "strength": 0.6},
        {"image": "picture", "scheduler": "euler_a", "batch": 2},
        {"image": "pictures", "scheduler": "dpmpp_2m_sde", "strength": 0.9},
    ],
    ids=lambda extra: "-".join(map(str, extra.values())) or "pndm",
)
def test_the_same_seed_makes_diffusers_image(ort_pipe_fp32, torch_pipe, extra):
    """diffusers draws everything itself from ``torch.Generator("cpu").manual_seed(seed + i)`` (the
    baseline hands it no latents and no step noise); the engine draws the same without PyTorch."""
    extra = dict(extra)
    if extra.get("image") in ("picture", "pictures"):  # one for the batch, or one per image
        count = extra.get("batch", 1) if extra["image"] == "picture" else 2
        extra["image"] = np.random.default_rng(3).random((count, 64, 64, 3)).astype(np.float32)
        extra["image"] = extra["image"][0] if count == 1 else extra["image"]
        extra.setdefault("batch", count)
    ours, theirs = ort_pipe_fp32(PROMPT, **SETTINGS, **extra), torch_pipe(PROMPT, **SETTINGS, **extra)
    assert psnr(ours.array, theirs.array) >= 100
    default = ort_pipe_fp32(PROMPT, **{**SETTINGS, "noise_source": "sdengine"}, **extra)
    assert psnr(ours.array, default.array) < 40  # other noise indeed


@pytest.mark.parametrize("inpainting_unet", [False, True], ids=["blended", "inpainting-unet"])
@pytest.mark.parametrize(
    "extra",
    [{}, {"strength": 0.7, "scheduler": "euler_a", "batch": 2}, {"scheduler": "dpmpp_2m_sde"}],
    ids=lambda extra: "-".join(map(str, extra.values())) or "full-strength",
)
def test_inpainting_draws_diffusers_noise(
    ort_pipe_fp32,
    torch_pipe,
    inpaint_pipes,  # noqa: F811
    inpainting_unet,
    extra,
):
    """diffusers' inpainting draws the image's sample where it needs one (a plain UNet blends the image in;
    below full strength the run starts from it), the noise, then the masked image's sample whatever the
    UNet, then the steps' noise."""
    from test_inpaint import rectangle

    ours, theirs = inpaint_pipes if inpainting_unet else (ort_pipe_fp32, torch_pipe)
    image = np.random.default_rng(4).random((64, 96, 3)).astype(np.float32)
    settings = {**SETTINGS, "width": 96, "image": image, "mask": rectangle(), **extra}
    assert psnr(ours(PROMPT, **settings).array, theirs(PROMPT, **settings).array) >= 100


def test_initial_latents_are_torch_randn_per_image(ort_pipe_fp32):
    request = ort_pipe_fp32.request(PROMPT, batch=3, **SETTINGS)
    latents = request.initial_latents(ort_pipe_fp32.model_dir.arch)
    for i, seed in enumerate(request.seeds):
        want = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(seed)).numpy()
        np.testing.assert_allclose(latents[i : i + 1], want, rtol=0, atol=5e-6)


def test_what_it_refuses_and_records(ort_pipe_fp32, tmp_path, capsys):
    image = np.zeros((64, 64, 3), np.float32)
    with pytest.raises(InvalidArgumentError, match="image to image from supplied or varied noise draw"):
        ort_pipe_fp32.request(PROMPT, image=image, variation_seed=2, variation_strength=0.5, **SETTINGS)
    with pytest.raises(InvalidArgumentError, match="the hires fix draw otherwise"):
        ort_pipe_fp32.request(PROMPT, hires_scale=2.0, **SETTINGS)
    with pytest.raises(InvalidArgumentError, match="unknown noise source 'gpu'"):
        ort_pipe_fp32.request(PROMPT, **{**SETTINGS, "noise_source": "gpu"})
    model = str(ort_pipe_fp32.model_dir.root)
    out = tmp_path / "fox.png"
    size = ["--steps", "2", "--height", "64", "--width", "64"]
    argv = ["generate", model, PROMPT, *size, "--output", str(out)]
    assert main([*argv, "--noise-source", "torch-cpu"]) == 0
    assert read_png_parameters(out)["noise_source"] == "torch-cpu"
    assert main([*argv, "--hires-scale", "2", "--noise-source", "torch-cpu"]) == 1
    assert "follows diffusers' text-to-image, image-to-image and inpainting draws" in capsys.readouterr().err
