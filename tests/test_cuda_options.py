"""ONNX Runtime CUDA provider options from the user (``--cuda-option``): read, checked, and passed to every
CUDA session beside the backend's own. Whether ONNX Runtime takes a given key is checked on a GPU only."""

from __future__ import annotations

import pytest

from sdengine.backends.cuda_options import checked_cuda_options, parse_cuda_options
from sdengine.errors import InvalidArgumentError


def test_options_are_read_as_key_value_strings():
    assert parse_cuda_options(["prefer_nhwc=1", " cudnn_conv_algo_search = HEURISTIC", "prefer_nhwc=0"]) == {
        "prefer_nhwc": "0",  # the last one given
        "cudnn_conv_algo_search": "HEURISTIC",
    }
    assert parse_cuda_options([]) == {}
    assert checked_cuda_options({"prefer_nhwc": True, "gpu_mem_limit": 2**33}) == {
        "prefer_nhwc": "1",
        "gpu_mem_limit": "8589934592",
    }


@pytest.mark.parametrize("item", ["prefer_nhwc", "=1", "prefer_nhwc=", " = "])
def test_an_option_without_key_or_value_is_refused(item):
    with pytest.raises(InvalidArgumentError, match="expected KEY=VALUE"):
        parse_cuda_options([item])


@pytest.mark.parametrize(
    "key", ["device_id", "enable_cuda_graph", "user_compute_stream", "has_user_compute_stream"]
)
def test_the_backends_own_options_cannot_be_changed(key):
    with pytest.raises(InvalidArgumentError, match=f"{key} is set by sdengine itself"):
        parse_cuda_options([f"{key}=1"])


def test_every_cuda_session_gets_the_options_beside_the_backends_own(onnx_fp32):
    """The provider list the backend hands ONNX Runtime on a GPU. Built here on the CPU provider (the
    backend's test mode), then asked for its CUDA list."""
    from sdengine.backends.ort_cuda import CUDA, OrtCudaBackend
    from sdengine.model_dir import open_onnx_dir

    backend = OrtCudaBackend(open_onnx_dir(onnx_fp32), device="cpu", cuda_options={"prefer_nhwc": True})
    assert backend._providers() == ["CPUExecutionProvider"]  # the CPU run ignores them
    backend.device = "cuda"
    name, options = backend._providers(ort_graphs=True)[0]
    assert name == CUDA
    assert options == {"prefer_nhwc": "1", "device_id": "0", "enable_cuda_graph": "1"}
    with pytest.raises(InvalidArgumentError, match="enable_cuda_graph is set by sdengine"):
        OrtCudaBackend(open_onnx_dir(onnx_fp32), device="cpu", cuda_options={"enable_cuda_graph": "1"})


def test_only_onnx_runtime_on_cuda_takes_them(onnx_fp32, tiny_checkpoint):
    from sdengine.pipeline import Pipeline

    with pytest.raises(InvalidArgumentError, match="this run is ort on cpu"):
        Pipeline.load(onnx_fp32, device="cpu", cuda_options={"prefer_nhwc": "1"})
    with pytest.raises(InvalidArgumentError, match="this run is torch on cpu"):
        Pipeline.load(tiny_checkpoint, device="cpu", cuda_options={"prefer_nhwc": "1"})
    assert Pipeline.load(onnx_fp32, device="cpu", cuda_options={}).choice.device == "cpu"  # none: no check


def test_bench_passes_them_to_the_ort_worker_only(onnx_fp32, tmp_path, monkeypatch):
    import subprocess

    from benchmarks import bench

    commands = []

    def record(cmd, **kwargs):
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="")

    monkeypatch.setattr(bench.subprocess, "run", record)
    config = bench.BenchConfig(
        onnx_dir=onnx_fp32,
        checkpoint=tmp_path,
        backends=("ort", "torch"),
        height=64,
        width=64,
        batch=1,
        steps=2,
        guidance=7.5,
        runs=1,
        warmup=0,
        device="cuda",
        cuda_options=("prefer_nhwc=1", "cudnn_conv_algo_search=HEURISTIC"),
    )
    for backend in config.backends:
        with pytest.raises(bench.SDEngineError, match=f"the {backend} benchmark failed"):
            bench._run_worker(config, backend, tmp_path / "image.npy")
    ort, torch = commands
    assert ort[ort.index("--cuda-option") :][:4] == [
        "--cuda-option",
        "prefer_nhwc=1",
        "--cuda-option",
        "cudnn_conv_algo_search=HEURISTIC",
    ]
    assert "--cuda-option" not in torch


def test_bench_refuses_them_on_the_cpu_before_any_work(capsys):
    from sdengine.cli import main

    assert main(["bench", "sd15-cpu", "--device", "cpu", "--cuda-option", "prefer_nhwc=1"]) == 1
    assert "--cuda-option is for ONNX Runtime on cuda" in capsys.readouterr().err
