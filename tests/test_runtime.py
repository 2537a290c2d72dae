"""The lean runtime end to end: parity with diffusers, torch-free imports, requests and errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from model_variants import retype_input, with_fp16_unet_io

from sdengine.baseline import TorchPipeline
from sdengine.errors import (
    CorruptModelError,
    InvalidArgumentError,
    ModelDirectoryError,
    UnknownSchedulerError,
)
from sdengine.images import psnr
from sdengine.pipeline import Pipeline
from sdengine.schedulers import SCHEDULER_NAMES

PROMPT = "a photo of an astronaut riding a horse"


@pytest.fixture(scope="module")
def torch_pipe(tiny_checkpoint):
    return Pipeline.load(tiny_checkpoint, backend="torch")


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_image_matches_diffusers(ort_pipe_fp32, torch_pipe, scheduler):
    """Every scheduler, the stochastic ones too: the baseline draws the engine's per-step noise."""
    settings = dict(steps=6, seed=3, scheduler=scheduler, height=64, width=96, guidance=7.5)
    ours = ort_pipe_fp32(PROMPT, "ugly", **settings)
    ref = torch_pipe(PROMPT, "ugly", **settings)
    assert ours.array.shape == ref.array.shape == (1, 64, 96, 3)
    assert psnr(ours.array, ref.array) >= 40
    np.testing.assert_allclose(ours.latents, ref.latents, rtol=0, atol=1e-3)


def test_batch_and_no_guidance_match_diffusers(ort_pipe_fp32, torch_pipe):
    for settings in (dict(batch=2, guidance=5.0), dict(batch=1, guidance=1.0)):
        ours = ort_pipe_fp32(
            ["a cat", "a dog"][: settings["batch"]],
            steps=4,
            seed=11,
            height=64,
            width=64,
            guidance=settings["guidance"],
        )
        ref = torch_pipe(
            ["a cat", "a dog"][: settings["batch"]],
            steps=4,
            seed=11,
            height=64,
            width=64,
            guidance=settings["guidance"],
        )
        assert ours.array.shape[0] == settings["batch"]
        assert psnr(ours.array, ref.array) >= 40, settings


def test_v_prediction_checkpoint_matches_diffusers(tiny_v_checkpoint, tmp_path_factory):
    from export.onnx_export import export_checkpoint

    onnx_dir = tmp_path_factory.mktemp("onnx-v")
    export_checkpoint(tiny_v_checkpoint, onnx_dir, components=["text_encoder", "unet", "vae_decoder"])
    settings = dict(steps=5, seed=5, height=64, width=64, scheduler="euler")
    ours = Pipeline.load(onnx_dir)(PROMPT, **settings)
    ref = Pipeline.load(tiny_v_checkpoint, backend="torch")(PROMPT, **settings)
    assert psnr(ours.array, ref.array) >= 40


def test_supplied_latents_and_seeds(ort_pipe_fp32):
    base = ort_pipe_fp32(PROMPT, steps=3, seed=1, height=64, width=64)
    again = ort_pipe_fp32(PROMPT, steps=3, seed=1, height=64, width=64)
    other = ort_pipe_fp32(PROMPT, steps=3, seed=2, height=64, width=64)
    np.testing.assert_array_equal(base.array, again.array)
    assert not np.array_equal(base.array, other.array)
    latents = np.random.default_rng(1).standard_normal((1, 4, 8, 8), dtype=np.float32)
    supplied = ort_pipe_fp32(PROMPT, steps=3, seed=99, height=64, width=64, latents=latents)
    np.testing.assert_array_equal(base.array, supplied.array)


def test_stochastic_schedulers_run_and_follow_the_seed(ort_pipe_fp32):
    for scheduler in ("euler_a", "lcm", "dpmpp_2m_sde", "dpmpp_2m_sde_karras"):
        a = ort_pipe_fp32(PROMPT, steps=3, seed=4, height=64, width=64, scheduler=scheduler)
        b = ort_pipe_fp32(PROMPT, steps=3, seed=4, height=64, width=64, scheduler=scheduler)
        assert np.isfinite(a.array).all()
        np.testing.assert_array_equal(a.array, b.array)


def test_timings_cover_every_stage(ort_pipe_fp32):
    result = ort_pipe_fp32(PROMPT, steps=3, seed=0, height=64, width=64)
    summary = result.times.summary()
    assert summary["unet"]["calls"] == 4  # PNDM makes steps + 1 model calls, as diffusers does
    assert summary["step"]["calls"] == 4
    for stage in ("tokenize", "text_encoder", "vae_decode", "total"):
        assert summary[stage]["calls"] == 1
    assert summary["total"]["total_ms"] >= summary["unet"]["total_ms"]


def test_runtime_never_imports_torch(onnx_fp32):
    code = (
        "import sys; from sdengine.pipeline import Pipeline; "
        f"Pipeline.load({str(onnx_fp32)!r})('a cat', steps=2, height=64, width=64, seed=0); "
        "bad = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("settings", "error", "match"),
    [
        (dict(height=60), InvalidArgumentError, "height must be a positive multiple of 8"),
        (dict(width=0), InvalidArgumentError, "width"),
        (dict(steps=0), InvalidArgumentError, "steps must be at least 1"),
        (dict(scheduler="heun2"), UnknownSchedulerError, "heun2"),
        (dict(batch=0), InvalidArgumentError, "batch"),
        (dict(guidance=float("nan")), InvalidArgumentError, "guidance"),
        (dict(latents=np.zeros((1, 4, 3, 3), np.float32)), InvalidArgumentError, "latents have shape"),
    ],
)
def test_bad_requests_raise_typed_errors(ort_pipe_fp32, settings, error, match):
    with pytest.raises(error, match=match):
        ort_pipe_fp32(PROMPT, **{"steps": 2, "height": 64, "width": 64, **settings})


def test_empty_batch(ort_pipe_fp32):
    with pytest.raises(InvalidArgumentError, match="empty batch"):
        ort_pipe_fp32([], steps=2)


def test_bad_model_directories(tmp_path, onnx_fp32):
    import shutil

    with pytest.raises(ModelDirectoryError, match="does not exist"):
        Pipeline.load(tmp_path / "missing")
    broken = tmp_path / "broken"
    shutil.copytree(onnx_fp32, broken)
    (broken / "unet" / "model.onnx").unlink()
    with pytest.raises(ModelDirectoryError, match="missing unet/model.onnx"):
        Pipeline.load(broken)
    (broken / "unet" / "model.onnx").write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(CorruptModelError, match="cannot load"):
        Pipeline.load(broken)


def test_checkpoint_is_not_an_onnx_dir(tiny_checkpoint):
    with pytest.raises(ModelDirectoryError, match="export it first"):
        Pipeline.load(tiny_checkpoint, backend="ort")


def test_torch_pipeline_is_the_baseline(torch_pipe):
    assert isinstance(torch_pipe, TorchPipeline)


def test_models_declaring_other_input_types_load_and_match(onnx_fp32, ort_pipe_fp32, tmp_path):
    """Other exporters' models (e.g. Optimum's) declare int64 input ids and a (batch,) timestep."""
    import shutil

    from onnx import TensorProto, helper

    other = tmp_path / "other"
    shutil.copytree(onnx_fp32, other)
    retype_input(
        other / "text_encoder" / "model.onnx",
        "input_ids",
        TensorProto.INT64,
        ["batch", "sequence"],
        lambda src, dst: [helper.make_node("Cast", [src], [dst], to=TensorProto.INT32)],
    )
    retype_input(
        other / "unet" / "model.onnx",
        "timestep",
        TensorProto.INT64,
        ["batch"],
        lambda src, dst: [
            helper.make_node("Cast", [src], [f"{src}_f"], to=TensorProto.FLOAT),
            helper.make_node(
                "Constant", [], [f"{src}_0"], value=helper.make_tensor("i", TensorProto.INT64, [], [0])
            ),
            helper.make_node("Gather", [f"{src}_f", f"{src}_0"], [dst], axis=0),
        ],
    )
    pipe = Pipeline.load(other)
    assert pipe.backend._inputs["unet"]["timestep"] == (np.int64, 1)
    settings = dict(steps=4, seed=8, height=64, width=64, scheduler="pndm")  # integer timesteps
    np.testing.assert_allclose(
        pipe(PROMPT, **settings).array, ort_pipe_fp32(PROMPT, **settings).array, atol=1e-5
    )


def test_device_state_loop_matches_the_host_loop(onnx_fp32, ort_pipe_fp32):
    """The GPU backend's bound, ping-ponged, reused-buffer loop, run on the CPU provider."""
    from sdengine.backends.ort_cuda import OrtCudaBackend

    bound = Pipeline(
        ort_pipe_fp32.model_dir,
        OrtCudaBackend(ort_pipe_fp32.model_dir, device="cpu"),
        ort_pipe_fp32.tokenizer,
    )
    runs = [
        dict(seed=1, scheduler="pndm", height=64, width=64),  # PNDM: 6 model calls for 5 steps
        dict(seed=2, scheduler="dpmpp_2m", height=64, width=64),
        dict(
            seed=5, scheduler="ddim", height=64, width=64
        ),  # same shapes and calls: buffers refilled in place
        dict(seed=3, scheduler="euler_a", height=64, width=96),  # new shape: new buffers
        dict(seed=4, scheduler="ddim", height=64, width=64, guidance=1.0),  # no guidance: batch not doubled
    ]
    fresh = {}
    for settings in runs:
        a = bound(PROMPT, steps=5, **settings)
        b = ort_pipe_fp32(PROMPT, steps=5, **settings)
        # the UNet session with pinned dimensions may pick other kernels: float32 rounding, scaled to the data
        scale = float(np.abs(b.latents).max())
        np.testing.assert_allclose(a.latents, b.latents, rtol=0, atol=1e-5 * scale, err_msg=str(settings))
        fresh[settings["seed"]] = a.latents
    assert len(bound.backend._denoisers) == 4
    # the three 64x64 CFG plans share one UNet session; each replays a graph of its own in it
    ids = [
        d.unet_graph_id
        for k, d in bound.backend._denoisers.items()
        if (k.latent_width, k.guidance) == (8, True)
    ]
    assert sorted(ids) == [1, 2]  # pndm (6 calls), dpmpp_2m and ddim (5 calls: one plan, refilled)
    assert bound.backend.graphs_refused is None
    # buffers refilled in place give exactly what freshly allocated ones give
    again = Pipeline(
        ort_pipe_fp32.model_dir,
        OrtCudaBackend(ort_pipe_fp32.model_dir, device="cpu"),
        ort_pipe_fp32.tokenizer,
    )
    np.testing.assert_array_equal(again(PROMPT, steps=5, **runs[2]).latents, fresh[5])


def test_optimized_graph_cache(onnx_fp32, ort_pipe_fp32, tmp_path, monkeypatch):
    import shutil

    from sdengine.backends.ort_cache import cache_key

    monkeypatch.setenv("SDENGINE_CACHE", str(tmp_path / "cache"))
    settings = dict(steps=2, seed=6, height=64, width=64)
    first = Pipeline.load(onnx_fp32, optimized_cache=True)  # optimises and saves
    models = sorted((tmp_path / "cache" / "ort-optimized").glob("*/*/model.onnx"))
    assert sorted(m.parent.name for m in models) == ["text_encoder", "unet", "vae_decoder"]
    assert not list((tmp_path / "cache").rglob("*.partial-*"))
    written = {m: m.stat().st_mtime_ns for m in models}
    second = Pipeline.load(onnx_fp32, optimized_cache=True)  # loads the saved graphs, rewrites nothing
    assert {m: m.stat().st_mtime_ns for m in models} == written
    expected = ort_pipe_fp32(PROMPT, **settings).array
    np.testing.assert_allclose(first(PROMPT, **settings).array, expected, atol=1e-6)
    np.testing.assert_allclose(second(PROMPT, **settings).array, expected, atol=1e-6)
    damaged = next(m for m in models if m.parent.name == "vae_decoder")
    damaged.write_bytes(b"not a model")
    third = Pipeline.load(onnx_fp32, optimized_cache=True)  # the damaged entry is detected and remade
    assert damaged.stat().st_size > 100
    np.testing.assert_allclose(third(PROMPT, **settings).array, expected, atol=1e-6)
    copy = tmp_path / "copy"
    shutil.copytree(onnx_fp32, copy)
    assert cache_key(copy / "unet" / "model.onnx") != cache_key(onnx_fp32 / "unet" / "model.onnx")


def test_whole_step_graphs_replay_the_host_loop(ort_pipe_fp32, monkeypatch):
    """``step`` mode on the CPU provider with a simulated CUDA runtime: each parity's whole step (both runs)
    is captured, recorded rather than run, and every step of every later run is one graph launch."""
    from fake_cuda import install_fake_cuda, record_ort_steps_on_capture

    from sdengine.backends import ort_cuda
    from sdengine.backends.cuda_runtime import Stream

    cudart = install_fake_cuda(monkeypatch)
    record_ort_steps_on_capture(monkeypatch, cudart)
    backend = ort_cuda.OrtCudaBackend(ort_pipe_fp32.model_dir, device="cpu", stream=Stream())
    assert backend.graph_mode == "step"
    bound = Pipeline(ort_pipe_fp32.model_dir, backend, ort_pipe_fp32.tokenizer)
    runs = [
        dict(seed=1, scheduler="pndm"),
        dict(seed=2, scheduler="pndm"),  # same shapes and length: the graphs are replayed
        dict(seed=3, scheduler="euler_a", width=96),  # a new shape: new buffers, new graphs
        dict(seed=4, scheduler="ddim", steps=1),  # one call: both graphs still captured in range
    ]
    calls = 0
    for settings in runs:
        settings = {"steps": 4, "height": 64, "width": 64, **settings}
        ours, ref = bound(PROMPT, **settings), ort_pipe_fp32(PROMPT, **settings)
        scale = float(np.abs(ref.latents).max())
        np.testing.assert_allclose(
            ours.latents, ref.latents, rtol=0, atol=1e-5 * scale, err_msg=str(settings)
        )
        assert ours.times.count("denoise_gpu") == 1
        calls += ours.times.count("step_call")
    # every step one launch, plus one per parity when each shape's graphs were checked against plain runs
    assert cudart.launches == calls + 2 * len(backend._denoisers) and backend.graphs_refused is None
    assert all(len(d.graphs) == 2 for d in backend._denoisers.values())


def test_a_graph_that_does_not_replay_the_plain_runs_is_refused(ort_pipe_fp32, monkeypatch, capsys):
    """A capture that recorded the wrong work (here: parity 0's step for both graphs) fails the check made
    right after capture; the backend falls back and the images stay right."""
    from fake_cuda import install_fake_cuda

    from sdengine.backends import ort_cuda
    from sdengine.backends.cuda_runtime import Stream

    cudart = install_fake_cuda(monkeypatch)
    enqueue_step = ort_cuda.DeviceDenoiser._eager_step

    def wrong_capture(self, parity, options=None, whole=True):
        if cudart.capture is not None:
            cudart.capture.append(lambda: enqueue_step(self, 0, whole=whole))  # always parity 0's bindings
        else:
            enqueue_step(self, parity, options, whole)

    monkeypatch.setattr(ort_cuda.DeviceDenoiser, "_eager_step", wrong_capture)
    backend = ort_cuda.OrtCudaBackend(ort_pipe_fp32.model_dir, device="cpu", stream=Stream())
    bound = Pipeline(ort_pipe_fp32.model_dir, backend, ort_pipe_fp32.tokenizer)
    settings = dict(steps=4, seed=1, height=64, width=64)
    np.testing.assert_allclose(
        bound(PROMPT, **settings).latents, ort_pipe_fp32(PROMPT, **settings).latents, atol=1e-4
    )
    assert backend.graph_mode == "ort" and "does not reproduce the plain runs" in backend.graphs_refused
    assert "step graphs refused" in capsys.readouterr().err


def test_device_loop_runs_without_graphs_when_capture_fails(ort_pipe_fp32, monkeypatch, capsys):
    from sdengine.backends import ort_cuda

    def refuse(self, plan, **_):
        raise RuntimeError("Error in execution: operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(ort_cuda.DeviceDenoiser, "capture", refuse)
    backend = ort_cuda.OrtCudaBackend(ort_pipe_fp32.model_dir, device="cpu")
    bound = Pipeline(ort_pipe_fp32.model_dir, backend, ort_pipe_fp32.tokenizer)
    for seed in (1, 2):
        settings = dict(steps=3, seed=seed, height=64, width=64)
        np.testing.assert_allclose(
            bound(PROMPT, **settings).latents, ort_pipe_fp32(PROMPT, **settings).latents, atol=1e-4
        )
    assert backend.graphs_refused.endswith("stream is capturing") and backend.graph_mode == "none"
    assert capsys.readouterr().err.count("without CUDA graphs") == 1


def test_device_tensors_keep_their_dtype_and_shape():
    from sdengine.backends.ort_cuda import DeviceTensor

    tensor = DeviceTensor((3,), np.float32, "cpu", 0)
    tensor.fill(np.array([1.0, 2.0, 3.0]))  # float64 in: converted, not reinterpreted
    np.testing.assert_array_equal(tensor.numpy(), [1, 2, 3])
    scalar = DeviceTensor((), np.int64, "cpu", 0)
    scalar.fill(np.array(7, np.int32))
    assert scalar.numpy() == 7
    with pytest.raises(ValueError, match="expected shape"):
        tensor.fill(np.zeros(4))


@pytest.mark.parametrize("refused", ["step", "step and ort"])
def test_refused_graph_modes_fall_back_in_turn(ort_pipe_fp32, monkeypatch, capsys, refused):
    from fake_cuda import install_fake_cuda

    from sdengine.backends import cuda_runtime, ort_cuda
    from sdengine.backends.cuda_runtime import Stream
    from sdengine.errors import BackendUnavailableError

    install_fake_cuda(monkeypatch)

    def no_capture(stream, enqueue):
        raise BackendUnavailableError("CUDA error: cudaErrorStreamCaptureUnsupported")

    def no_ort_graphs(self, plan, *, whole_steps):
        raise RuntimeError("This session cannot use the graph capture feature as requested by the user")

    monkeypatch.setattr(cuda_runtime, "capture_graph", no_capture)
    if refused == "step and ort":
        monkeypatch.setattr(ort_cuda.DeviceDenoiser, "capture", no_ort_graphs)
    backend = ort_cuda.OrtCudaBackend(ort_pipe_fp32.model_dir, device="cpu", stream=Stream())
    bound = Pipeline(ort_pipe_fp32.model_dir, backend, ort_pipe_fp32.tokenizer)
    for seed in (1, 2):
        settings = dict(steps=3, seed=seed, height=64, width=64)
        np.testing.assert_allclose(
            bound(PROMPT, **settings).latents, ort_pipe_fp32(PROMPT, **settings).latents, atol=1e-4
        )
    err = capsys.readouterr().err
    if refused == "step":
        assert backend.graph_mode == "ort" and "steps run in ONNX Runtime's own graph mode" in err
        assert backend.graphs_refused.endswith("cudaErrorStreamCaptureUnsupported")
    else:
        assert backend.graph_mode == "none" and err.count("graphs refused") == 2
        assert next(iter(backend._denoisers.values())).final_options is not None  # plain runs end synced


def test_one_pipeline_serves_threads_in_turn(ort_pipe_fp32):
    """The bound backend keeps one set of buffers per shape: concurrent calls must take turns."""
    from concurrent.futures import ThreadPoolExecutor

    from sdengine.backends.ort_cuda import OrtCudaBackend

    bound = Pipeline(
        ort_pipe_fp32.model_dir,
        OrtCudaBackend(ort_pipe_fp32.model_dir, device="cpu"),
        ort_pipe_fp32.tokenizer,
    )
    settings = [dict(steps=3, seed=seed, height=64, width=64) for seed in range(6)]
    alone = [ort_pipe_fp32(PROMPT, **s).latents for s in settings]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda s: bound(PROMPT, **s).latents, settings))
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_results_are_not_overwritten_by_the_next_run(ort_pipe_fp32):
    from sdengine.backends.ort_cuda import OrtCudaBackend

    bound = Pipeline(
        ort_pipe_fp32.model_dir,
        OrtCudaBackend(ort_pipe_fp32.model_dir, device="cpu"),
        ort_pipe_fp32.tokenizer,
    )
    first = bound(PROMPT, steps=2, seed=1, height=64, width=64)
    kept = first.latents.copy()
    bound(PROMPT, steps=2, seed=2, height=64, width=64)  # same shape: same device buffers
    np.testing.assert_array_equal(first.latents, kept)


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a"])
def test_any_image_of_a_batch_is_made_again_alone(ort_pipe_fp32, scheduler):
    """Image i of a batch draws all its noise from seed + i: a batch of one with that seed repeats it."""
    prompts = ["a cat", "a dog", "a cow"]
    image = np.random.default_rng(5).uniform(0, 1, (1, 64, 64, 3)).astype(np.float32)
    for extra in ({}, {"image": image, "strength": 0.7}):
        settings = dict(steps=3, height=64, width=64, scheduler=scheduler, **extra)
        batch = ort_pipe_fp32(prompts, "ugly", seed=40, **settings)
        assert batch.request.seeds == (40, 41, 42)
        assert batch.request.parameters(2)["seed"] == 42 and batch.request.parameters(2)["prompt"] == [
            "a cow"
        ]
        for i, prompt in enumerate(prompts):
            alone = ort_pipe_fp32(prompt, "ugly", seed=40 + i, **settings)
            scale = float(np.abs(batch.latents[i]).max())
            np.testing.assert_allclose(alone.latents[0], batch.latents[i], rtol=0, atol=1e-4 * scale)


def test_only_errors_a_graph_mode_can_cause_trigger_a_fall_back():
    import onnxruntime as ort

    from sdengine.backends.ort_cuda import refused_graph
    from sdengine.errors import BackendUnavailableError, UnsupportedConfigError

    assert refused_graph(CorruptModelError("cannot load unet: fallback to CPU EP has been disabled"))
    assert refused_graph(BackendUnavailableError("CUDA error: cudaErrorStreamCaptureInvalidated"))
    assert refused_graph(ort.capi.onnxruntime_pybind11_state.EPFail("capture failed"))
    assert refused_graph(RuntimeError("Error in execution"))
    assert not refused_graph(UnsupportedConfigError("the device loop needs a UNet with float32 inputs"))
    assert not refused_graph(InvalidArgumentError("steps must be at least 1"))


def test_least_recently_used_unet_shapes_are_freed(ort_pipe_fp32, monkeypatch):
    from sdengine.backends import ort_cuda

    monkeypatch.setattr(ort_cuda, "MAX_UNET_SHAPES", 2)
    backend = ort_cuda.OrtCudaBackend(ort_pipe_fp32.model_dir, device="cpu")
    bound = Pipeline(ort_pipe_fp32.model_dir, backend, ort_pipe_fp32.tokenizer)
    for width in (64, 96, 64, 128, 96):  # 128 evicts 96 (64 was used since); 96 then evicts 64
        settings = dict(steps=2, seed=width, height=64, width=width)
        np.testing.assert_allclose(
            bound(PROMPT, **settings).latents, ort_pipe_fp32(PROMPT, **settings).latents, atol=1e-4
        )
        assert len(backend._unet_sessions) <= 2
    assert sorted(key[3] for key in backend._unet_sessions) == [12, 16]  # latent widths of 96 and 128
    assert sorted(key.latent_width for key in backend._denoisers) == [12, 16]
    assert len(backend._step_sessions) == 2


def test_the_device_loop_binds_a_unet_with_fp16_inputs_and_outputs(onnx_fp32, tmp_path):
    """Exports that keep fp16 inputs and outputs (e.g. Optimum's fp16 ones): the device loop binds the UNet's
    own dtypes, and its step model converts; the host loop converts on the host. The two agree."""
    from sdengine.backends.ort_cuda import OrtCudaBackend

    half = with_fp16_unet_io(onnx_fp32, tmp_path / "half-io")
    host = Pipeline.load(half, backend="ort", device="cpu")
    backend = OrtCudaBackend(host.model_dir, device="cpu")
    assert backend.unet_io_dtypes() == (np.float16, np.float16, np.float16)
    bound = Pipeline(host.model_dir, backend, host.tokenizer)
    for scheduler in ("pndm", "euler_a"):
        settings = dict(steps=4, seed=3, height=64, width=64, scheduler=scheduler)
        a, b = bound(PROMPT, **settings).latents, host(PROMPT, **settings).latents
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-3 * float(np.abs(b).max()), err_msg=scheduler)


class Stop(Exception):
    pass


def test_a_run_stopped_from_its_progress_callback_leaves_the_pipeline_usable(ort_pipe_fp32):
    """``progress`` wraps the step loop: raising from it stops a generation between two steps. The next
    generation, on the host loop and on the bound device loop (its buffers half-way through a run), is
    exactly what it would have been."""
    from sdengine.backends.ort_cuda import OrtCudaBackend

    def stop_after_two(steps):
        for i in steps:
            if i == 2:
                raise Stop
            yield i

    def record(seen):
        return lambda steps: (seen.append(i) or i for i in steps)

    model_dir = ort_pipe_fp32.model_dir
    bound = Pipeline(model_dir, OrtCudaBackend(model_dir, device="cpu"), ort_pipe_fp32.tokenizer)
    settings = dict(steps=5, seed=8, height=64, width=64, scheduler="dpmpp_2m")
    for pipe in (ort_pipe_fp32, bound):
        expected = pipe(PROMPT, **settings).array
        with pytest.raises(Stop):
            pipe(PROMPT, progress=stop_after_two, **{**settings, "seed": 9})
        np.testing.assert_array_equal(pipe(PROMPT, **settings).array, expected)
        seen: list[int] = []
        pipe(PROMPT, progress=record(seen), **settings)
        assert seen == list(range(5))  # one model call per step with dpmpp_2m


def test_the_torch_baseline_steps_progress_as_the_engine_does(ort_pipe_fp32, torch_pipe):
    """The torch backend hands ``progress`` diffusers' calls one by one (callback_on_step_end), in the
    engine's order: each call asked for before it runs, the end after the last; raising stops it."""

    def record(events):
        def wrap(calls):
            for call in calls:
                events.append(call)
                yield call
            events.append("end")

        return wrap

    settings = dict(steps=3, seed=8, height=64, width=64, scheduler="heun")  # 5 model calls
    seen = {}
    for name, pipe in (("ort", ort_pipe_fp32), ("torch", torch_pipe)):
        seen[name] = []
        pipe(PROMPT, progress=record(seen[name]), **settings)
    assert seen["torch"] == seen["ort"] == [0, 1, 2, 3, 4, "end"]

    def stop_at_two(calls):
        for call in calls:
            if call == 2:
                raise Stop
            yield call

    with pytest.raises(Stop):
        torch_pipe(PROMPT, progress=stop_at_two, **settings)
