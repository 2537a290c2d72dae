"""Backend and device selection: every rule and every refusal, on the CPU."""

from __future__ import annotations

import numpy as np
import pytest

from sdengine.backends.base import DenoisePlan, GraphKey
from sdengine.backends.select import Availability, choose, detect, model_kind
from sdengine.cli import main
from sdengine.errors import BackendUnavailableError, InvalidArgumentError, ModelDirectoryError
from sdengine.schedulers import load_scheduler
from sdengine.step_graph import step_tables

CPU_ONLY = Availability(torch=True)
GPU_ALL = Availability(ort_cuda=True, tensorrt=True, cuda_python=True, torch=True, torch_cuda=True)


def test_model_kinds(tiny_checkpoint, onnx_fp32, tmp_path):
    assert model_kind(tiny_checkpoint) == "checkpoint"
    assert model_kind(onnx_fp32) == "onnx"
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / "sdengine_engines.json").write_text("{}")
    assert model_kind(tmp_path / "engines") == "engines"
    with pytest.raises(ModelDirectoryError, match="does not exist"):
        model_kind(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelDirectoryError, match="neither"):
        model_kind(tmp_path / "empty")


@pytest.mark.parametrize(
    ("kind", "has", "expected"),
    [
        ("onnx", CPU_ONLY, ("ort", "cpu")),
        ("onnx", GPU_ALL, ("ort", "cuda")),
        ("checkpoint", CPU_ONLY, ("torch", "cpu")),
        ("checkpoint", GPU_ALL, ("torch", "cuda")),
        ("engines", GPU_ALL, ("trt", "cuda")),
    ],
)
def test_auto_picks_the_fastest_available(kind, has, expected):
    choice = choose("auto", None, kind, has)
    assert (choice.backend, choice.device) == expected
    assert choice.reason.startswith("auto")


def test_explicit_device_is_honoured():
    assert choose("ort", "cpu", "onnx", GPU_ALL).device == "cpu"
    assert choose("torch", "cpu", "checkpoint", GPU_ALL).device == "cpu"


@pytest.mark.parametrize(
    ("backend", "device", "kind", "has", "message"),
    [
        ("trt", None, "engines", CPU_ONLY, "TensorRT or cuda-python is not installed"),
        ("trt", "cpu", "engines", GPU_ALL, "NVIDIA GPUs only"),
        ("ort", "cuda", "onnx", CPU_ONLY, "no CUDA execution provider"),
        ("torch", "cuda", "checkpoint", CPU_ONLY, "cannot see a CUDA GPU"),
        ("torch", None, "checkpoint", Availability(), "needs torch and diffusers"),
        ("auto", None, "engines", CPU_ONLY, "TensorRT or cuda-python is not installed"),
    ],
)
def test_refusals_are_one_line(backend, device, kind, has, message):
    with pytest.raises(BackendUnavailableError, match=message) as err:
        choose(backend, device, kind, has)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("backend", "kind", "message"),
    [
        ("trt", "onnx", "trt backend runs an engine directory, not an ONNX export .build engines first"),
        ("ort", "checkpoint", "runs an ONNX export, not a diffusers checkpoint .export it first"),
        ("torch", "onnx", "runs a diffusers checkpoint, not an ONNX export .the torch backend runs the diff"),
    ],
)
def test_wrong_kind_of_directory(backend, kind, message):
    with pytest.raises(ModelDirectoryError, match=message):
        choose(backend, None, kind, GPU_ALL)


def test_unknown_names():
    with pytest.raises(InvalidArgumentError, match="unknown backend"):
        choose("onnx", None, "onnx", CPU_ONLY)
    with pytest.raises(InvalidArgumentError, match="unknown device"):
        choose("ort", "tpu", "onnx", CPU_ONLY)


def test_detect_reports_a_consistent_machine():
    has = detect()
    assert has.torch  # the test environment has the export extra
    assert not (has.torch_cuda and not has.torch)


def test_cli_refuses_missing_gpu_paths_in_one_line(onnx_fp32, capsys):
    if detect().ort_cuda:
        pytest.skip("this machine has a CUDA GPU")
    assert main(["generate", str(onnx_fp32), "a cat", "--device", "cuda", "--steps", "1"]) == 1
    assert "no CUDA execution provider" in capsys.readouterr().err
    assert main(["generate", str(onnx_fp32), "a cat", "--backend", "trt", "--steps", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert "build engines first" in err and "\n" not in err


def _plan(batch=1, size=(8, 8), steps=4, guidance=7.5, scheduler="ddim"):
    config = {"_class_name": "PNDMScheduler", "skip_prk_steps": True, "clip_sample": False}
    schedule = load_scheduler(scheduler, config).schedule(steps)
    latents = np.zeros((batch, 4, *size), np.float32)
    noise = np.zeros((len(schedule.timesteps), *latents.shape), np.float32)
    copies = 1 if guidance is None else 2
    context = np.zeros((copies * batch, 77, 32), np.float32)
    return DenoisePlan(latents, context, step_tables(schedule, noise), guidance)


def test_graph_key_follows_shapes_and_schedule_length_only():
    base = GraphKey.of(_plan())
    assert GraphKey.of(_plan(guidance=3.0)) == base  # guidance scale is an input, not part of the graph
    assert GraphKey.of(_plan(scheduler="euler")) == base  # so are the scheduler's tables
    for other in (_plan(batch=2), _plan(size=(8, 16)), _plan(steps=5), _plan(guidance=None)):
        assert GraphKey.of(other) != base


def test_an_explicit_cpu_load_skips_the_cuda_probe(onnx_fp32, monkeypatch):
    import sdengine.backends.select as select
    from sdengine.pipeline import Pipeline

    def probe() -> bool:
        raise AssertionError("the CUDA probe ran for an explicit CPU load")

    monkeypatch.setattr(select, "ort_cuda_works", probe)
    assert Pipeline.load(onnx_fp32, backend="ort", device="cpu").choice.device == "cpu"
    with pytest.raises(AssertionError, match="CUDA probe"):
        Pipeline.load(onnx_fp32, backend="ort")  # no device given: auto must probe
