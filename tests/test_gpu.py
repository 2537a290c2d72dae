"""GPU checks; each skips itself where its GPU path is not available (so everywhere in CI).

Run on a GPU machine with onnxruntime-gpu (and tensorrt + cuda-python for the TensorRT part).
"""

from __future__ import annotations

import numpy as np
import pytest

from sdengine.backends.select import detect
from sdengine.images import psnr

HAS = detect()
needs_ort_cuda = pytest.mark.skipif(not HAS.ort_cuda, reason="needs onnxruntime-gpu and a CUDA GPU")
needs_trt = pytest.mark.skipif(
    not (HAS.tensorrt and HAS.cuda_python), reason="needs TensorRT and cuda-python"
)
PROMPT = "a photo of a cat"
SETTINGS = dict(steps=6, seed=3, height=64, width=96, guidance=7.5)


def _pipelines(onnx_dir, mode):
    from sdengine.backends.ort_cuda import OrtCudaBackend
    from sdengine.model_dir import open_onnx_dir
    from sdengine.pipeline import Pipeline
    from sdengine.tokenizer import ClipTokenizer

    model_dir = open_onnx_dir(onnx_dir)
    tok = ClipTokenizer.from_dir(model_dir.tokenizer_dir)
    graphs = Pipeline(model_dir, OrtCudaBackend(model_dir, graphs=mode), tok)
    eager = Pipeline(model_dir, OrtCudaBackend(model_dir, graphs="none"), tok)
    return graphs, eager


@needs_ort_cuda
@pytest.mark.parametrize("mode", ["step", "ort"])
@pytest.mark.parametrize("scheduler", ["pndm", "euler_a", "dpmpp_2m"])
def test_replayed_graphs_give_the_eager_latents(onnx_fp32, scheduler, mode):
    graphs, eager = _pipelines(onnx_fp32, mode)
    assert graphs.backend.graph_mode == mode, graphs.backend.graphs_refused
    for seed in (3, 4):  # the second run replays the graphs captured by the first
        a = graphs(PROMPT, scheduler=scheduler, **{**SETTINGS, "seed": seed})
        b = eager(PROMPT, scheduler=scheduler, **{**SETTINGS, "seed": seed})
        np.testing.assert_allclose(a.latents, b.latents, rtol=0, atol=1e-5)


@needs_ort_cuda
def test_cuda_matches_the_cpu(onnx_fp32):
    from sdengine.pipeline import Pipeline

    gpu = Pipeline.load(onnx_fp32, backend="ort", device="cuda")(PROMPT, **SETTINGS)
    cpu = Pipeline.load(onnx_fp32, backend="ort", device="cpu")(PROMPT, **SETTINGS)
    assert psnr(gpu.array, cpu.array) >= 40


@needs_ort_cuda
@pytest.mark.skipif(not HAS.torch_cuda, reason="needs torch with CUDA")
def test_fp16_cuda_matches_diffusers_fp16(onnx_fp16, tiny_checkpoint):
    from sdengine.pipeline import Pipeline

    ours = Pipeline.load(onnx_fp16, backend="ort", device="cuda")(PROMPT, **SETTINGS)
    ref = Pipeline.load(tiny_checkpoint, backend="torch", device="cuda")(PROMPT, **SETTINGS)
    assert psnr(ours.array, ref.array) >= 30


@needs_trt
def test_tensorrt_matches_onnx_runtime(onnx_fp16, tmp_path):
    from export.trt_build import build_engines
    from sdengine.pipeline import Pipeline

    engines = tmp_path / "engines"
    build_engines(onnx_fp16, engines, batch=1, height=SETTINGS["height"], width=SETTINGS["width"])
    trt = Pipeline.load(engines, backend="trt")
    a = trt(PROMPT, **SETTINGS)
    b = trt(PROMPT, **SETTINGS)  # graph replay
    ref = Pipeline.load(onnx_fp16, backend="ort", device="cpu")(PROMPT, **SETTINGS)
    np.testing.assert_array_equal(a.latents, b.latents)
    assert psnr(a.array, ref.array) >= 30


@needs_ort_cuda
@pytest.mark.parametrize("mode", ["step", "ort"])
def test_inpainting_graphs_give_the_eager_latents(onnx_fp32, mode):
    """The blend's inputs (mask, image latents, noise, factors) read in place by replayed graphs."""
    from sdengine.demo import centre_mask

    graphs, eager = _pipelines(onnx_fp32, mode)
    height, width = SETTINGS["height"], SETTINGS["width"]
    image = np.random.default_rng(0).uniform(0, 1, (1, height, width, 3)).astype(np.float32)
    inpaint = dict(SETTINGS, image=image, mask=centre_mask(height, width), scheduler="dpmpp_2m")
    for seed in (3, 4):
        a, b = graphs(PROMPT, **{**inpaint, "seed": seed}), eager(PROMPT, **{**inpaint, "seed": seed})
        np.testing.assert_allclose(a.latents, b.latents, rtol=0, atol=1e-5)


@needs_ort_cuda
@pytest.mark.skipif(not HAS.torch_cuda, reason="needs torch with CUDA")
def test_the_unet_fused_for_cuda_matches_the_portable_export_and_diffusers(
    onnx_fp16, tiny_checkpoint, tmp_path
):
    """``export --target cuda``: replayed graphs give its plain runs' latents, and its images are the
    portable fp16 export's and diffusers fp16's within float16 tolerance."""
    from export.onnx_export import export_checkpoint
    from sdengine.pipeline import Pipeline

    fused = tmp_path / "fused"
    export_checkpoint(tiny_checkpoint, fused, precision="fp16", target="cuda")
    graphs, eager = _pipelines(fused, "step")
    assert graphs.backend.graph_mode == "step", graphs.backend.graphs_refused
    a, b = graphs(PROMPT, **SETTINGS), eager(PROMPT, **SETTINGS)
    np.testing.assert_allclose(a.latents, b.latents, rtol=0, atol=1e-5)
    portable = Pipeline.load(onnx_fp16, backend="ort", device="cuda")(PROMPT, **SETTINGS)
    ref = Pipeline.load(tiny_checkpoint, backend="torch", device="cuda")(PROMPT, **SETTINGS)
    assert psnr(a.array, portable.array) >= 30 and psnr(a.array, ref.array) >= 30
