"""The TensorRT backend's orchestration, run against a simulated TensorRT and CUDA runtime (fake_tensorrt.py,
fake_cuda.py; the ``simulated`` fixture of conftest.py installs them)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from fake_tensorrt import ENV, FakeContext, FakeEngine, engine_pipeline, write_plan

from sdengine.errors import UnsupportedConfigError


def test_graph_steps_match_the_cpu_engine(simulated, onnx_fp32, ort_pipe_fp32, tmp_path):
    engines = tmp_path / "engines"
    pipe = engine_pipeline(onnx_fp32, engines, ort_pipe_fp32.tokenizer, batch=1, height=64, width=64)
    backend = pipe.backend
    runs = [
        dict(seed=1, scheduler="pndm"),
        dict(seed=2, scheduler="pndm"),  # same shape and length: the captured graphs are replayed
        dict(seed=3, scheduler="euler_a"),  # 4 model calls: a second set of graphs (the UNet rebound)
        dict(seed=4, scheduler="pndm"),  # back to the first set, captured before the rebinding
        dict(seed=5, scheduler="ddim", steps=1),  # one model call: both graphs still captured in range
    ]
    for settings in runs:
        settings.setdefault("steps", 4)
        ours = pipe("a cat", height=64, width=64, **settings)
        ref = ort_pipe_fp32("a cat", height=64, width=64, **settings)
        scale = float(np.abs(ref.latents).max())
        np.testing.assert_allclose(
            ours.latents, ref.latents, rtol=0, atol=1e-5 * scale, err_msg=str(settings)
        )
        np.testing.assert_allclose(ours.array, ref.array, atol=1e-4)
        assert ours.times.count("denoise_gpu") == 1
    assert len(backend._graphs) == 3
    # every step one launch, plus one per parity when each shape's graphs were checked against plain runs
    assert simulated.launches == 5 + 5 + 4 + 5 + 1 + 2 * 3
    assert backend.graphs_refused is None
    assert sorted(p.name.split(".")[0] for p in engines.glob("*.plan")).count("step") == 3


def test_edited_prompts_run_in_the_captured_steps(simulated, onnx_fp32, ort_pipe_fp32, tmp_path):
    """The step engine writes each next call's text embeddings into the UNet's bound input, inside the
    graphs; runs reading two sets, one set (no step output of embeddings) and two sets again."""

    engines = tmp_path / "engines"
    pipe = engine_pipeline(onnx_fp32, engines, ort_pipe_fp32.tokenizer, batch=1, height=64, width=64)
    backend = pipe.backend
    settings = dict(steps=4, height=64, width=64, seed=3, scheduler="euler", prompt_weights="a1111")
    for prompt in ("a [cat|dog]", "a cat", "a [cat:(dog:1.2):0.5]"):
        ours, ref = pipe(prompt, **settings), ort_pipe_fp32(prompt, **settings)
        scale = float(np.abs(ref.latents).max())
        np.testing.assert_allclose(ours.latents, ref.latents, rtol=0, atol=1e-5 * scale, err_msg=prompt)
    assert sorted(key.context_sets for key in backend._graphs) == [0, 2]
    assert simulated.launches == 3 * 4 + 2 * 2 and backend.graphs_refused is None


def test_steps_run_without_graphs_when_capture_fails(simulated, onnx_fp32, ort_pipe_fp32, tmp_path, capsys):
    enqueue = FakeContext.execute_async_v3

    def failing_enqueue(context, stream):
        if sys.modules["cuda.bindings.runtime"].capture is not None:
            return False  # TensorRT refuses to enqueue under capture
        return enqueue(context, stream)

    engines = tmp_path / "engines"
    pipe = engine_pipeline(onnx_fp32, engines, ort_pipe_fp32.tokenizer, batch=1, height=64, width=64)
    backend = pipe.backend
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FakeContext, "execute_async_v3", failing_enqueue)
        for seed in (1, 2):
            ours = pipe("a cat", steps=4, height=64, width=64, seed=seed, scheduler="pndm")
            ref = ort_pipe_fp32("a cat", steps=4, height=64, width=64, seed=seed, scheduler="pndm")
            np.testing.assert_allclose(ours.array, ref.array, atol=1e-4)
    assert simulated.launches == 0 and simulated.capture is None
    assert "failed to enqueue" in backend.graphs_refused
    assert capsys.readouterr().err.count("without CUDA graphs") == 1


def test_a_step_engine_needing_more_memory_moves_every_context_and_recaptures(
    simulated, onnx_fp32, ort_pipe_fp32, tmp_path, monkeypatch
):
    monkeypatch.setattr(FakeEngine, "step_memory_per_call", 5000)  # 4 calls: 20000, 5 calls: 25000 bytes
    engines = tmp_path / "engines"
    pipe = engine_pipeline(onnx_fp32, engines, ort_pipe_fp32.tokenizer, batch=1, height=64, width=64)
    backend = pipe.backend
    for seed, scheduler in ((1, "euler_a"), (2, "pndm"), (3, "euler_a")):
        ours = pipe("a cat", steps=4, height=64, width=64, seed=seed, scheduler=scheduler)
        ref = ort_pipe_fp32("a cat", steps=4, height=64, width=64, seed=seed, scheduler=scheduler)
        np.testing.assert_allclose(ours.array, ref.array, atol=1e-4, err_msg=scheduler)
    assert backend._memory.nbytes == 25000
    assert len(backend._graphs) == 2  # the 4-call graphs were dropped at the growth and captured again
    assert simulated.launches == 4 + 5 + 4 + 2 * 3  # and each capture checked with one launch per parity


def test_a_graph_that_does_not_replay_the_plain_enqueues_is_refused(
    simulated, onnx_fp32, ort_pipe_fp32, tmp_path, monkeypatch, capsys
):
    from export.trt_build import build_engines
    from sdengine.backends import trt
    from sdengine.pipeline import Pipeline

    enqueue_step = trt.GraphSteps._eager_step

    def wrong_capture(self, parity, whole=True):  # captures parity 0's step for both graphs
        enqueue_step(self, 0 if simulated.capture is not None else parity, whole)

    monkeypatch.setattr(trt.GraphSteps, "_eager_step", wrong_capture)
    engines = tmp_path / "engines"
    build_engines(onnx_fp32, engines, batch=1, height=64, width=64, env=ENV, builder=write_plan)
    backend = trt.TrtBackend.load(engines)
    pipe = Pipeline(backend.model_dir, backend, ort_pipe_fp32.tokenizer)
    settings = dict(steps=4, height=64, width=64, seed=2, scheduler="pndm")
    np.testing.assert_allclose(
        pipe("a cat", **settings).array, ort_pipe_fp32("a cat", **settings).array, atol=1e-4
    )
    assert "does not reproduce the plain runs" in backend.graphs_refused
    assert not next(iter(backend._graphs.values())).graphs and simulated.launches == 2  # the check's own
    assert capsys.readouterr().err.count("without CUDA graphs") == 1


def test_a_unet_engine_with_fp16_inputs_and_outputs(simulated, onnx_fp32, ort_pipe_fp32, tmp_path):
    from model_variants import with_fp16_unet_io

    from export.trt_build import build_engines
    from sdengine.backends.trt import TrtBackend
    from sdengine.pipeline import Pipeline

    half = with_fp16_unet_io(onnx_fp32, tmp_path / "half-io")
    engines = tmp_path / "engines"
    build_engines(half, engines, batch=1, height=64, width=64, env=ENV, builder=write_plan)
    backend = TrtBackend.load(engines)
    assert backend.unet_io_dtypes() == (np.float16, np.float16, np.float16)
    pipe = Pipeline(backend.model_dir, backend, ort_pipe_fp32.tokenizer)
    settings = dict(steps=4, height=64, width=64, seed=2, scheduler="euler")
    for prompt in ("a cat", "a [cat|dog]"):  # edited: the step engine gives fp16 text embeddings
        ours = pipe(prompt, **settings, prompt_weights="a1111").latents
        ref = ort_pipe_fp32(prompt, **settings, prompt_weights="a1111").latents
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-2 * float(np.abs(ref).max()))


def test_graphs_none_enqueues_engine_by_engine(simulated, onnx_fp32, ort_pipe_fp32, tmp_path):
    from export.trt_build import build_engines
    from sdengine.backends.trt import TrtBackend
    from sdengine.errors import InvalidArgumentError
    from sdengine.pipeline import Pipeline

    engines = tmp_path / "engines"
    build_engines(onnx_fp32, engines, batch=1, height=64, width=64, env=ENV, builder=write_plan)
    with pytest.raises(InvalidArgumentError, match="step and none"):
        TrtBackend.load(engines, graphs="ort")
    backend = TrtBackend.load(engines, graphs="none")
    pipe = Pipeline(backend.model_dir, backend, ort_pipe_fp32.tokenizer)
    settings = dict(steps=4, height=64, width=64, seed=2, scheduler="dpmpp_2m")
    np.testing.assert_allclose(
        pipe("a cat", **settings).array, ort_pipe_fp32("a cat", **settings).array, atol=1e-4
    )
    assert simulated.launches == 0 and backend.graphs_refused is None


def test_image_to_image_loads_the_vae_encoder_engine_when_asked(
    simulated, onnx_fp32, ort_pipe_fp32, tmp_path
):
    from export.trt_build import build_engines
    from sdengine.backends.trt import TrtBackend
    from sdengine.errors import ModelDirectoryError
    from sdengine.pipeline import Pipeline

    image = np.random.default_rng(0).uniform(0, 1, (1, 64, 64, 3)).astype(np.float32)
    settings = dict(steps=4, seed=1, image=image, strength=0.5, scheduler="ddim")
    engines = tmp_path / "engines"
    pipe = engine_pipeline(onnx_fp32, engines, ort_pipe_fp32.tokenizer, batch=1, height=64, width=64)
    backend = pipe.backend
    with pytest.raises(ModelDirectoryError, match="--components vae_encoder"):
        pipe("a cat", **settings)
    build_engines(
        onnx_fp32,
        engines,
        batch=1,
        height=64,
        width=64,
        env=ENV,
        builder=write_plan,
        components=["vae_encoder"],
    )
    backend = TrtBackend.load(engines)
    pipe = Pipeline(backend.model_dir, backend, ort_pipe_fp32.tokenizer)
    ours, ref = pipe("a cat", **settings), ort_pipe_fp32("a cat", **settings)
    np.testing.assert_allclose(ours.array, ref.array, atol=1e-4)


def test_stale_engines_are_refused_before_anything_runs(simulated, onnx_fp32, tmp_path):
    import shutil

    from export.trt_build import build_engines
    from sdengine.backends.trt import TrtBackend
    from sdengine.errors import ModelDirectoryError

    onnx_copy = tmp_path / "onnx"
    shutil.copytree(onnx_fp32, onnx_copy)
    engines = tmp_path / "engines"
    build_engines(onnx_copy, engines, batch=1, height=64, width=64, env=ENV, builder=write_plan)
    with open(onnx_copy / "unet" / "model.onnx", "ab") as f:
        f.write(b"\0")  # the ONNX changed after the build
    with pytest.raises(ModelDirectoryError, match="sdengine build"):
        TrtBackend.load(engines)


def test_info_checks_each_engine_against_this_machine(simulated, onnx_fp32, tmp_path):
    import shutil

    from export.trt_build import build_engines
    from sdengine.info import describe

    onnx_copy = tmp_path / "onnx"
    shutil.copytree(onnx_fp32, onnx_copy)
    engines = tmp_path / "engines"
    build_engines(onnx_copy, engines, batch=1, height=64, width=64, env=ENV, builder=write_plan)
    info = describe(engines)
    assert info["kind"] == "engines" and "TensorRT 10.9.0" in info["this_machine"]
    assert {e["status"] for e in info["engines"].values()} == {"usable here"}
    with open(onnx_copy / "unet" / "model.onnx", "ab") as f:
        f.write(b"\0")
    status = describe(engines)["engines"]["unet"]["status"]
    assert status.startswith("refused:") and "stale" in status and "sdengine build" in status


def test_composable_prompts_run_in_the_captured_steps(simulated, onnx_fp32, ort_pipe_fp32, tmp_path):
    """The step engine sums the parts of a composable prompt inside the graphs, the UNet on 1 + K copies."""

    engines = tmp_path / "engines"
    pipe = engine_pipeline(onnx_fp32, engines, ort_pipe_fp32.tokenizer, height=64, width=64)
    backend = pipe.backend
    settings = dict(steps=4, height=64, width=64, seed=3, scheduler="euler", prompt_weights="a1111")
    # a static engine set takes 2 copies of one image: refused before any step, with the build that fits
    with pytest.raises(UnsupportedConfigError) as refused:
        pipe("a cat AND a dog :0.5", **settings)
    assert "needs 3 rows" in str(refused.value) and "--components unet" in str(refused.value)
    assert "--parts 2" in str(refused.value) and not backend._graphs
    # room for 1 + 2 copies of a batch of one (static height and width)
    pipe = engine_pipeline(onnx_fp32, engines, ort_pipe_fp32.tokenizer, height=64, width=64, parts=2)
    backend = pipe.backend
    for prompt in ("a cat AND a dog :0.5", "a cat"):
        ours, ref = pipe(prompt, **settings), ort_pipe_fp32(prompt, **settings)
        scale = float(np.abs(ref.latents).max())
        np.testing.assert_allclose(ours.latents, ref.latents, rtol=0, atol=1e-5 * scale, err_msg=prompt)
    assert sorted(key.copies for key in backend._graphs) == [2, 3] and backend.graphs_refused is None


def test_tiny_previews_run_on_onnx_runtime_beside_the_engines(simulated, tiny_checkpoint, tmp_path):
    """An export's preview decoder is not built as an engine: ONNX Runtime runs it, as the CPU does."""
    from export.onnx_export import export_checkpoint
    from export.tiny_vae import write_random_tiny_vae
    from export.trt_build import build_engines
    from sdengine.backends.ort import OrtBackend
    from sdengine.backends.trt import TrtBackend
    from sdengine.pipeline import Pipeline
    from sdengine.tokenizer import ClipTokenizer

    tiny = write_random_tiny_vae(tmp_path / "taesd")
    onnx_dir = tmp_path / "onnx"
    components = ["text_encoder", "unet", "vae_decoder", "preview_decoder"]
    export_checkpoint(tiny_checkpoint, onnx_dir, components=components, preview_vae=tiny, verify=False)
    engines = tmp_path / "engines"
    build_engines(onnx_dir, engines, batch=1, height=64, width=64, env=ENV, builder=write_plan)
    assert not list(engines.glob("preview_decoder*.plan"))
    backend = TrtBackend.load(engines)
    tokenizer = ClipTokenizer.from_dir(backend.model_dir.tokenizer_dir)
    pipe = Pipeline(backend.model_dir, backend, tokenizer)
    cpu = Pipeline(backend.model_dir, OrtBackend(backend.model_dir), tokenizer)  # Pipeline.load probes CUDA
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    ours, ref = (np.asarray(p.preview_images(latents, "tiny")[0]) for p in (pipe, cpu))
    assert ours.shape == (64, 64, 3) and np.array_equal(ours, ref)
