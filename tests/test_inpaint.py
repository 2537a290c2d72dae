"""Inpainting, against diffusers' ``StableDiffusionInpaintPipeline`` fed the same draws: with an inpainting
(9-channel) UNet, and with a plain UNet whose result is blended with the noised image after every step; on
the host loop, the bound ONNX Runtime loop and the simulated TensorRT runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fake_tensorrt import ENV, write_plan
from PIL import Image
from test_img2img import picture

from sdengine.cli import main
from sdengine.errors import InvalidArgumentError, UnsupportedConfigError
from sdengine.images import mask_array, psnr, read_png_parameters
from sdengine.pipeline import Pipeline

PROMPT = "a lighthouse at dusk"
#: stochastic ones included: the baseline draws the engine's per-step noise
SCHEDULERS = ["ddim", "pndm", "euler", "euler_a", "heun", "dpm2", "dpmpp_2m", "dpmpp_2m_sde", "unipc"]


def rectangle(height: int = 64, width: int = 96, batch: int = 1) -> np.ndarray:
    """A mask (B, H, W): 1 (repaint) in a rectangle away from the borders, 0 (keep) around it. Its edges
    are off the 8-pixel grid, so which pixel of a block stands for it in latent space matters."""
    mask = np.zeros((batch, height, width), np.float32)
    mask[:, height // 4 - 3 : 3 * height // 4 + 3, width // 4 - 5 : 3 * width // 4 + 2] = 1
    return mask


@pytest.fixture(scope="module")
def inpaint_checkpoint(tmp_path_factory):
    from export.checkpoint import write_random_checkpoint

    path = tmp_path_factory.mktemp("checkpoints") / "tiny-inpaint"
    return write_random_checkpoint(path, "tiny", seed=2, inpainting=True)


@pytest.fixture(scope="module")
def inpaint_onnx(inpaint_checkpoint, tmp_path_factory):
    from export.onnx_export import export_checkpoint

    out = tmp_path_factory.mktemp("onnx") / "inpaint"
    export_checkpoint(inpaint_checkpoint, out)
    return out


@pytest.fixture(scope="module")
def inpaint_pipes(inpaint_checkpoint, inpaint_onnx):
    """(ONNX Runtime on the CPU, diffusers) on the inpainting checkpoint."""
    return Pipeline.load(inpaint_onnx, backend="ort", device="cpu"), Pipeline.load(
        inpaint_checkpoint, backend="torch"
    )


@pytest.fixture(scope="module")
def torch_pipe(tiny_checkpoint):
    return Pipeline.load(tiny_checkpoint, backend="torch")


def test_an_inpainting_checkpoint_is_read_and_exported_with_nine_unet_channels(inpaint_pipes, inpaint_onnx):
    import onnx

    arch = inpaint_pipes[0].model_dir.arch
    assert (arch.latent_channels, arch.unet_in_channels, arch.inpainting_unet) == (4, 9, True)
    graph = onnx.load(str(inpaint_onnx / "unet" / "model.onnx"), load_external_data=False).graph
    sample = next(i for i in graph.input if i.name == "sample")
    assert sample.type.tensor_type.shape.dim[1].dim_value == 9
    assert inpaint_pipes[1].model_dir.arch == arch


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_inpainting_unet_matches_diffusers(inpaint_pipes, scheduler, strength):
    ours, ref = (
        pipe(PROMPT, "blurry", steps=6, seed=4, scheduler=scheduler, image=picture(), mask=rectangle(),
             strength=strength)
        for pipe in inpaint_pipes
    )  # fmt: skip
    assert ours.array.shape == ref.array.shape == (1, 64, 96, 3)
    assert psnr(ours.array, ref.array) >= 40
    np.testing.assert_allclose(ours.latents, ref.latents, rtol=0, atol=1e-3)


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_plain_unet_inpainting_matches_diffusers(ort_pipe_fp32, torch_pipe, scheduler, strength):
    settings = dict(
        steps=6, seed=5, scheduler=scheduler, image=picture(), mask=rectangle(), strength=strength
    )
    ours, ref = ort_pipe_fp32(PROMPT, "blurry", **settings), torch_pipe(PROMPT, "blurry", **settings)
    assert psnr(ours.array, ref.array) >= 40
    np.testing.assert_allclose(ours.latents, ref.latents, rtol=0, atol=1e-3)


def test_batches_share_one_image_and_mask_or_take_one_each(inpaint_pipes, ort_pipe_fp32, torch_pipe):
    """Batch 2 from one image and mask, without guidance (the UNet batch is not doubled), and with a mask
    per image."""
    masks = np.concatenate([rectangle(), 1 - rectangle()])
    for pipes, mask, guidance in (
        (inpaint_pipes, rectangle(), 1.0),
        ((ort_pipe_fp32, torch_pipe), masks, 5.0),
    ):
        ours, ref = (
            pipe(["a cat", "a dog"], steps=5, seed=7, image=picture(), mask=mask, guidance=guidance)
            for pipe in pipes
        )
        assert ours.array.shape == (2, 64, 96, 3)
        assert psnr(ours.array, ref.array) >= 40


def test_plain_unet_keeps_the_image_latents_outside_the_mask(ort_pipe_fp32):
    """The last step's blend puts the image's own latents back wherever the mask keeps the image."""
    result = ort_pipe_fp32(PROMPT, steps=5, seed=3, image=picture(), mask=rectangle(), scheduler="euler")
    request = result.request
    image_latents = ort_pipe_fp32.encode(request.pixels(), 1, request.encoder_noise)
    keep_image = rectangle()[:, None, ::8, ::8] == 0
    outside = np.broadcast_to(keep_image, result.latents.shape)
    np.testing.assert_allclose(result.latents[outside], image_latents[outside], rtol=0, atol=1e-5)
    assert np.abs(result.latents[~outside] - image_latents[~outside]).mean() > 0.1


def test_the_mask_reaches_the_unet(inpaint_pipes):
    """An inpainting UNet sees the mask and the masked image: changing either changes the image."""
    ours = inpaint_pipes[0]
    settings = dict(steps=3, seed=1, image=picture())
    base = ours(PROMPT, mask=rectangle(), **settings).array
    assert psnr(base, ours(PROMPT, mask=1 - rectangle(), **settings).array) < 60
    assert psnr(base, ours(PROMPT, mask=rectangle(), steps=3, seed=1, image=picture(seed=5)).array) < 60


def test_bound_loops_match_the_host_loop(inpaint_pipes, ort_pipe_fp32):
    """The device loop (here on the CPU provider) binds the step model's inpainting inputs and the wider UNet
    input; its images match the host loop's."""
    from sdengine.backends.ort_cuda import OrtCudaBackend

    settings = dict(steps=5, seed=2, image=picture(), mask=rectangle(), strength=0.8, scheduler="euler_a")
    for host in (inpaint_pipes[0], ort_pipe_fp32):
        bound = Pipeline(host.model_dir, OrtCudaBackend(host.model_dir, device="cpu"), host.tokenizer)
        for _ in range(2):  # the second run refills the same buffers
            np.testing.assert_allclose(
                bound(PROMPT, **settings).latents, host(PROMPT, **settings).latents, atol=1e-4
            )
        assert len(bound.backend._denoisers) == 1


def test_simulated_tensorrt_inpaints_like_the_host_loop(simulated, inpaint_onnx, inpaint_pipes, tmp_path):
    from export.trt_build import build_engines
    from sdengine.backends.trt import TrtBackend

    engines = tmp_path / "engines"
    components = ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    build_engines(
        inpaint_onnx,
        engines,
        batch=1,
        height=64,
        width=96,
        env=ENV,
        builder=write_plan,
        components=components,
    )
    backend = TrtBackend.load(engines)
    pipe = Pipeline(backend.model_dir, backend, inpaint_pipes[0].tokenizer)
    settings = dict(steps=4, seed=6, image=picture(), mask=rectangle(), scheduler="dpmpp_2m")
    ours, ref = pipe(PROMPT, **settings), inpaint_pipes[0](PROMPT, **settings)
    np.testing.assert_allclose(ours.array, ref.array, atol=1e-4)
    assert backend.graphs_refused is None and len(backend._graphs) == 1


def test_masks_are_made_like_diffusers_mask_processor():
    """Grayscale, Lanczos-resized, then binarised at 0.5: 1 repaints."""
    from diffusers.image_processor import VaeImageProcessor

    gray = (np.random.default_rng(0).uniform(0, 1, (50, 70)) * 255).astype(np.uint8)
    pil = Image.fromarray(np.stack([gray] * 3, axis=-1))  # an RGB mask
    ours = mask_array(pil, 64, 96)
    processor = VaeImageProcessor(do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    ref = processor.preprocess(pil, height=64, width=96).numpy()[:, 0]
    assert ours.shape == (1, 64, 96) and set(np.unique(ours)) <= {0.0, 1.0}
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(mask_array(gray, 50, 70)[0], gray / 255 >= 0.5)  # uint8 (H, W)
    assert mask_array([pil, pil], 64, 96).shape == (2, 64, 96)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(image=None), "a mask needs the image"),
        (dict(mask=rectangle(batch=3), batch=2), "mask has shape"),
        (dict(mask=np.zeros((1, 1, 64, 96))), "mask array must be"),
        (dict(mask=np.full((64, 96), 1.5)), r"\[0, 1\]"),
        (dict(mask="mask.png"), "mask must be a PIL image"),
    ],
)
def test_bad_masks_are_refused(ort_pipe_fp32, settings, message):
    settings = {"image": picture(), "mask": rectangle(), "steps": 2, **settings}
    with pytest.raises(InvalidArgumentError, match=message):
        ort_pipe_fp32(PROMPT, **settings)


def test_requests_check_masks_and_default_the_strength(ort_pipe_fp32):
    from sdengine.request import make_request

    request = ort_pipe_fp32.request(PROMPT, image=picture(), mask=rectangle())
    assert (
        request.strength == 1.0 and request.starts_from_noise and request.parameters()["mask"] == "supplied"
    )
    assert ort_pipe_fp32.request(PROMPT, image=picture()).strength == 0.8
    with pytest.raises(InvalidArgumentError, match="0 \\(keep\\) or 1"):
        make_request(PROMPT, height=64, width=96, image=picture(), mask=rectangle() * 0.5)


def test_unsupported_unet_channel_counts_are_refused(tiny_checkpoint, tmp_path):
    import shutil

    from sdengine.model_dir import open_checkpoint_dir

    copy = tmp_path / "depth"
    shutil.copytree(tiny_checkpoint, copy)
    config = json.loads((copy / "unet" / "config.json").read_text())
    (copy / "unet" / "config.json").write_text(json.dumps({**config, "in_channels": 5}))
    with pytest.raises(UnsupportedConfigError, match="5 input channels"):
        open_checkpoint_dir(copy)


def test_cli_inpainting(inpaint_onnx, tmp_path, capsys):
    source, mask, out = tmp_path / "in.png", tmp_path / "mask.png", tmp_path / "out.png"
    Image.fromarray((picture()[0] * 255).astype(np.uint8)).save(source)
    Image.fromarray((rectangle()[0] * 255).astype(np.uint8)).save(mask)
    args = ["generate", str(inpaint_onnx), PROMPT, "--image", str(source), "--steps", "3", "--device", "cpu"]
    assert main([*args, "--mask", str(mask), "--output", str(out)]) == 0
    params = read_png_parameters(out)
    assert (params["mask"], params["strength"]) == ("supplied", 1.0)
    capsys.readouterr()
    assert main([*args, "--mask", str(tmp_path / "missing.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert "cannot read mask" in err and "\n" not in err
    assert main(["generate", str(inpaint_onnx), PROMPT, "--mask", str(mask), "--device", "cpu"]) == 1
    assert "a mask needs the image" in capsys.readouterr().err


def test_composable_prompts_give_every_part_the_mask(inpaint_pipes, ort_pipe_fp32):
    settings = dict(steps=3, seed=1, image=picture(), mask=rectangle(), strength=0.9, prompt_weights="a1111")
    for pipe in (inpaint_pipes[0], ort_pipe_fp32):  # an inpainting UNet's channels, a plain one's blend
        doubled = pipe(f"{PROMPT} AND {PROMPT}", guidance=3.0, **settings)
        np.testing.assert_allclose(doubled.latents, pipe(PROMPT, guidance=6.0, **settings).latents, atol=1e-4)
