"""Guidance-embedded UNets, latent consistency models' (sdengine/guidance_embedding.py): the scale's
embedding exported as the UNet's ``timestep_cond`` and fed each run, one UNet call per step, against
diffusers' pipelines (which run such a UNet the same way) with the same draws."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fake_tensorrt import ENV, write_plan
from test_img2img import picture

from sdengine.errors import InvalidArgumentError, UnsupportedConfigError
from sdengine.images import psnr
from sdengine.pipeline import Pipeline

PROMPT = "a lantern on a table"
#: four steps of the latent consistency scheduler at LCM_Dreamshaper_v7's default scale
SETTINGS = dict(steps=4, seed=4, height=64, width=64, scheduler="lcm", guidance=8.5)
WIDTH = 256  # LCM_Dreamshaper_v7's time_cond_proj_dim


@pytest.fixture(scope="module")
def lcm_checkpoint(tmp_path_factory):
    from export.checkpoint import write_random_checkpoint

    root = tmp_path_factory.mktemp("lcm")
    return write_random_checkpoint(root / "tiny-lcm", "tiny", seed=0, guidance_embedding=WIDTH)


@pytest.fixture(scope="module")
def onnx_lcm(lcm_checkpoint, tmp_path_factory):
    from export.onnx_export import export_checkpoint

    out = tmp_path_factory.mktemp("onnx") / "lcm"
    export_checkpoint(lcm_checkpoint, out)
    return out


@pytest.fixture(scope="module")
def lcm_pipe(onnx_lcm):
    return Pipeline.load(onnx_lcm, backend="ort", device="cpu")


@pytest.mark.parametrize(("guidance", "width"), [(8.5, 256), (7.5, 256), (1.0, 256), (2.0, 33), (4.0, 512)])
def test_the_embedding_is_diffusers(guidance, width):
    import torch
    from diffusers import StableDiffusionPipeline

    from sdengine.guidance_embedding import guidance_embedding

    scale = torch.tensor(guidance - 1).repeat(3)
    theirs = StableDiffusionPipeline.get_guidance_scale_embedding(None, scale, embedding_dim=width).numpy()
    ours = guidance_embedding(guidance, 3, width)
    assert ours.shape == theirs.shape == (3, width) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=5e-4)  # one frequency in 128: see the docstring


def test_the_unet_takes_the_scale_and_runs_once_a_step(onnx_lcm, lcm_pipe):
    import onnx

    model = onnx.load(str(onnx_lcm / "unet" / "model.onnx"), load_external_data=False)
    inputs = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input
    }
    assert inputs["timestep_cond"] == ["batch", WIDTH]
    assert lcm_pipe.model_dir.arch.guidance_embedding == WIDTH
    request = lcm_pipe.request(PROMPT, "blurry", **SETTINGS)
    assert request.copies == 1 and not request.classifier_free_guidance and request.texts == [PROMPT]
    # the scale reaches the UNet: another scale, another image
    a, b = lcm_pipe(PROMPT, **SETTINGS), lcm_pipe(PROMPT, **{**SETTINGS, "guidance": 2.0})
    assert psnr(a.array, b.array) < 80


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"guidance": 1.0, "batch": 2},
        {"scheduler": "euler", "steps": 6, "guidance": 3.0, "strength": 0.6},  # image to image
    ],
    ids=["lcm", "scale-1-batch-2", "euler-img2img"],
)
def test_images_match_diffusers(lcm_pipe, lcm_checkpoint, settings):
    """diffusers' own pipelines run a UNet with ``time_cond_proj_dim`` without classifier-free guidance
    and with the scale's embedding; so does sdengine, with the same draws."""
    theirs = Pipeline.load(lcm_checkpoint, backend="torch")
    if "strength" in settings:
        settings = {**settings, "image": picture(64, 64)}
    run = {**SETTINGS, **settings}
    assert psnr(lcm_pipe(PROMPT, "blurry", **run).array, theirs(PROMPT, "blurry", **run).array) >= 100


def test_with_a_controlnet_it_matches_diffusers(lcm_checkpoint, tmp_path):
    """The ControlNet beside the UNet takes no embedding (diffusers hands it none); the UNet does."""
    from export.controlnet import write_random_controlnet
    from export.onnx_export import export_checkpoint

    controlnet = write_random_controlnet(lcm_checkpoint, tmp_path / "cn", seed=0)
    export_checkpoint(lcm_checkpoint, tmp_path / "onnx", components=None, controlnets=[controlnet])
    ours = Pipeline.load(tmp_path / "onnx", backend="ort", device="cpu")
    theirs = Pipeline.load(lcm_checkpoint, backend="torch", controlnets=[controlnet])
    edges = (np.random.default_rng(5).random((64, 64, 3)) > 0.8).astype(np.float32)
    run = {**SETTINGS, "control_image": edges}
    assert psnr(ours(PROMPT, **run).array, theirs(PROMPT, **run).array) >= 100


def test_sdxl_matches_diffusers(tmp_path):
    """lcm-sdxl's kind: SDXL's added conditioning and the scale's embedding together."""
    from export.checkpoint import write_random_checkpoint
    from export.onnx_export import export_checkpoint

    checkpoint = write_random_checkpoint(tmp_path / "tiny-xl", "tiny-xl", seed=0, guidance_embedding=64)
    export_checkpoint(checkpoint, tmp_path / "onnx", components=None)
    ours = Pipeline.load(tmp_path / "onnx", backend="ort", device="cpu")
    theirs = Pipeline.load(checkpoint, backend="torch")
    assert psnr(ours(PROMPT, **SETTINGS).array, theirs(PROMPT, **SETTINGS).array) >= 100


def test_the_bound_loop_and_the_tensorrt_graphs_match_the_host_loop(simulated, onnx_lcm, lcm_pipe, tmp_path):
    """The embedding is bound once per run into the device loop (ONNX Runtime's, here on the CPU) and the
    simulated TensorRT graph steps; engines are sized for one copy of the batch, guidance or not."""
    from export.trt_build import build_engines
    from sdengine.backends.ort_cuda import OrtCudaBackend
    from sdengine.backends.trt import TrtBackend

    model_dir = lcm_pipe.model_dir
    bound = Pipeline(model_dir, OrtCudaBackend(model_dir, device="cpu"), lcm_pipe.tokenizer)
    engines = tmp_path / "engines"
    manifest = build_engines(onnx_lcm, engines, height=64, width=64, env=ENV, builder=write_plan)
    assert manifest.engines["unet"].profile["timestep_cond"] == [[1, WIDTH]] * 3  # not doubled
    backend = TrtBackend.load(engines)
    graphs = Pipeline(backend.model_dir, backend, lcm_pipe.tokenizer)
    for guidance in (8.5, 2.0):
        ref = lcm_pipe(PROMPT, **{**SETTINGS, "guidance": guidance}).latents
        scale = float(np.abs(ref).max())
        for pipe in (bound, graphs):
            ours = pipe(PROMPT, **{**SETTINGS, "guidance": guidance}).latents
            np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * scale)
    assert [key.copies for key in backend._graphs] == [1] and backend.graphs_refused is None


def test_refusals_are_one_line(lcm_pipe, ort_pipe_fp32, onnx_lcm):
    from sdengine.info import describe
    from sdengine.refiner import check_refiner
    from sdengine.request import make_request

    for settings in ({"prompt_weights": "a1111"}, {"guidance_rescale": 0.7}):
        prompt = "a lantern AND a table" if settings.get("prompt_weights") else PROMPT
        with pytest.raises(UnsupportedConfigError) as refused:
            lcm_pipe(prompt, **{**SETTINGS, **settings})
        assert "latent consistency model" in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(UnsupportedConfigError, match="perturbed-attention guidance is not supported"):
        make_request(
            PROMPT, steps=4, guidance=8.5, height=64, width=64, pag_scale=3.0, guidance_embedded=True
        )
    for base, refiner in ((lcm_pipe, ort_pipe_fp32), (ort_pipe_fp32, lcm_pipe)):
        with pytest.raises(UnsupportedConfigError, match="latent consistency model"):
            check_refiner(base, refiner)
    with pytest.raises(InvalidArgumentError, match="guidance_embedding must be 0 or a width >= 4"):
        from export.checkpoint import write_random_checkpoint

        write_random_checkpoint(onnx_lcm.parent / "never", "tiny", guidance_embedding=2)
    assert describe(onnx_lcm)["guidance"].startswith("embedded")
    assert json.loads((onnx_lcm / "unet" / "config.json").read_text())["time_cond_proj_dim"] == WIDTH


def test_make_checkpoint_writes_one(tmp_path, capsys):
    from sdengine.cli import main

    out = tmp_path / "lcm"
    assert main(["make-checkpoint", str(out), "--guidance-embedding", "64"]) == 0
    assert json.loads((out / "unet" / "config.json").read_text())["time_cond_proj_dim"] == 64
    assert "latent consistency" in capsys.readouterr().out
    assert main(["make-checkpoint", str(tmp_path / "bad"), "--guidance-embedding", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert "guidance_embedding must be 0 or a width >= 4" in err and "\n" not in err
    assert not (tmp_path / "bad").exists()
