"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight ``tiny`` SD 1.x checkpoint in diffusers format (seed 0, epsilon), written once per run.

    Shared by every test: treat it as read-only.
    """
    from export.checkpoint import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("checkpoints") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_v_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``tiny`` architecture as a ``v_prediction`` model (seed 1)."""
    from export.checkpoint import write_random_checkpoint

    path = tmp_path_factory.mktemp("checkpoints") / "tiny-v"
    return write_random_checkpoint(path, "tiny", seed=1, prediction_type="v_prediction")


@pytest.fixture(scope="session")
def onnx_fp32(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_checkpoint`` exported to ONNX in float32 (read-only)."""
    from export.onnx_export import export_checkpoint

    out = tmp_path_factory.mktemp("onnx") / "fp32"
    export_checkpoint(tiny_checkpoint, out)
    return out


@pytest.fixture(scope="session")
def onnx_fp16(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_checkpoint`` exported to ONNX in float16 (read-only)."""
    from export.onnx_export import export_checkpoint

    out = tmp_path_factory.mktemp("onnx") / "fp16"
    export_checkpoint(tiny_checkpoint, out, precision="fp16")
    return out


@pytest.fixture(scope="session")
def ort_pipe_fp32(onnx_fp32: Path):
    """The CPU ONNX Runtime pipeline on ``onnx_fp32`` (shared; treat as read-only)."""
    from sdengine.pipeline import Pipeline

    return Pipeline.load(onnx_fp32, backend="ort", device="cpu")


@pytest.fixture(scope="session")
def biased_pipes(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """(ONNX Runtime, torch) pipelines on a copy of ``tiny_checkpoint`` whose text encoder's final layer norm
    has a bias: random weights leave it 0, which puts the mean that the AUTOMATIC1111 web UI's weighting keeps
    at about 0, where a trained text encoder's is not."""
    import shutil

    import torch
    from transformers import CLIPTextModel

    from export.onnx_export import export_checkpoint
    from sdengine.pipeline import Pipeline

    root = tmp_path_factory.mktemp("biased")
    checkpoint = shutil.copytree(tiny_checkpoint, root / "checkpoint")
    encoder = CLIPTextModel.from_pretrained(checkpoint / "text_encoder")
    with torch.no_grad():
        norm = getattr(encoder, "text_model", encoder).final_layer_norm
        norm.bias.copy_(torch.linspace(-0.2, 0.8, norm.bias.numel()))
    encoder.save_pretrained(checkpoint / "text_encoder")
    components = ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    export_checkpoint(checkpoint, root / "onnx", components=components)
    return Pipeline.load(root / "onnx", backend="ort", device="cpu"), Pipeline.load(
        checkpoint, backend="torch"
    )


@pytest.fixture
def simulated(monkeypatch: pytest.MonkeyPatch):
    """TensorRT and the CUDA runtime simulated for the test (fake_tensorrt.py, fake_cuda.py): the TensorRT
    backend runs on them and ``export.trt_build`` writes simulated plans. The simulated CUDA runtime, whose
    counts (``launches``) a test may read."""
    import sys

    from fake_cuda import install_fake_cuda
    from fake_tensorrt import fake_tensorrt, write_plan

    import export.trt_build

    cudart = install_fake_cuda(monkeypatch)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    monkeypatch.setattr(export.trt_build, "build_serialized_engine", write_plan)
    return cudart
