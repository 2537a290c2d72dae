"""Previews: the latents part way through a run, handed to a callback after every N UNet calls, as diffusers'
``callback_on_step_end`` sees them; the run's result is unchanged, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
from fake_tensorrt import engine_pipeline

from sdengine.cli import main
from sdengine.errors import InvalidArgumentError
from sdengine.pipeline import Pipeline

PROMPT = "a castle on a hill"
SETTINGS = dict(steps=5, seed=3, height=64, width=64)


def collect(pipe, every: int, **settings):
    seen: list[tuple[int, np.ndarray]] = []
    result = pipe(
        PROMPT,
        "blurry",
        preview=lambda calls, latents: seen.append((calls, latents)),
        preview_every=every,
        **{**SETTINGS, **settings},
    )
    return seen, result


@pytest.fixture(scope="module")
def torch_pipe(tiny_checkpoint):
    return Pipeline.load(tiny_checkpoint, backend="torch")


@pytest.mark.parametrize(
    ("scheduler", "calls"), [("pndm", [2, 4]), ("heun", [2, 4, 6, 8]), ("euler_a", [2, 4])]
)
def test_previews_are_diffusers_latents_after_those_calls(ort_pipe_fp32, torch_pipe, scheduler, calls):
    ours, result = collect(ort_pipe_fp32, 2, scheduler=scheduler)
    ref, _ = collect(torch_pipe, 2, scheduler=scheduler)
    assert (
        [k for k, _ in ours] == [k for k, _ in ref] == calls
    )  # never after the last call: that is the result
    for (_, a), (_, b) in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.abs(b).max()))
    plain = ort_pipe_fp32(PROMPT, "blurry", scheduler=scheduler, **SETTINGS)
    np.testing.assert_array_equal(result.latents, plain.latents)  # looking changes nothing
    assert len(ort_pipe_fp32.preview_images(ours[0][1])) == 1


def stop_after(queries: int):
    """A ``stop`` that answers True from its ``queries + 1``-th question on."""
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > queries

    return stop


@pytest.mark.parametrize(("scheduler", "calls"), [("euler", 2), ("heun", 3), ("dpmpp_2m", 4)])
def test_a_stopped_run_ends_with_the_latents_so_far(ort_pipe_fp32, torch_pipe, scheduler, calls):
    """``stop`` is asked between two calls: answering True after ``calls`` calls gives the latents a preview
    sees there, decoded; diffusers' own interrupt stops at the same place."""
    seen, _ = collect(ort_pipe_fp32, 1, scheduler=scheduler)
    ours = ort_pipe_fp32(PROMPT, "blurry", scheduler=scheduler, stop=stop_after(calls - 1), **SETTINGS)
    np.testing.assert_array_equal(ours.latents, dict(seen)[calls])
    assert ours.times.count("step_call") == calls
    ref = torch_pipe(PROMPT, "blurry", scheduler=scheduler, stop=stop_after(calls - 1), **SETTINGS)
    np.testing.assert_allclose(
        ours.latents, ref.latents, rtol=0, atol=1e-5 * float(np.abs(ref.latents).max())
    )
    assert ours.array.shape == (1, 64, 64, 3)


def test_a_stop_before_the_hires_pass_keeps_the_first_passs_images(ort_pipe_fp32):
    # euler, 5 calls: 4 questions between them answered False, then the fifth, before the hires pass, True
    result = ort_pipe_fp32(PROMPT, stop=stop_after(4), hires_scale=2, scheduler="euler", **SETTINGS)
    plain = ort_pipe_fp32(PROMPT, scheduler="euler", **SETTINGS)
    np.testing.assert_array_equal(result.array, plain.array)


def test_bound_loop_previews_are_the_host_loops(ort_pipe_fp32):
    from sdengine.backends.ort_cuda import OrtCudaBackend

    bound = Pipeline(
        ort_pipe_fp32.model_dir,
        OrtCudaBackend(ort_pipe_fp32.model_dir, device="cpu"),
        ort_pipe_fp32.tokenizer,
    )
    ours, result = collect(bound, 1)
    host, expected = collect(ort_pipe_fp32, 1)
    assert [k for k, _ in ours] == [1, 2, 3, 4, 5]  # PNDM: 6 calls for 5 steps
    for (_, a), (_, b) in zip(ours, host, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.abs(b).max()))
    np.testing.assert_allclose(
        result.latents, expected.latents, rtol=0, atol=1e-5 * float(np.abs(expected.latents).max())
    )


def test_simulated_tensorrt_previews_between_graph_launches(simulated, onnx_fp32, ort_pipe_fp32, tmp_path):
    pipe = engine_pipeline(
        onnx_fp32, tmp_path / "engines", ort_pipe_fp32.tokenizer, batch=1, height=64, width=64
    )
    backend = pipe.backend
    ours, result = collect(pipe, 3)
    host, expected = collect(ort_pipe_fp32, 3)
    assert [k for k, _ in ours] == [3]
    np.testing.assert_allclose(ours[0][1], host[0][1], atol=1e-4)
    np.testing.assert_allclose(result.array, expected.array, atol=1e-4)
    assert backend.graphs_refused is None and len(result.times.calls["denoise_gpu"]) == 1


def test_bad_previews_are_refused(ort_pipe_fp32):
    with pytest.raises(InvalidArgumentError, match="preview_every must be a whole number >= 1"):
        ort_pipe_fp32(PROMPT, preview=print, preview_every=0, **SETTINGS)
    with pytest.raises(InvalidArgumentError, match="preview must be callable"):
        ort_pipe_fp32(PROMPT, preview="yes", **SETTINGS)


def test_cli_writes_previews(onnx_fp32, tmp_path, capsys):
    out = tmp_path / "cat.png"
    args = ["generate", str(onnx_fp32), PROMPT, "--steps", "4", "--height", "64", "--width", "64"]
    assert main([*args, "--device", "cpu", "--output", str(out), "--preview-every", "2"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat-step2.png", "cat-step4.png", "cat.png"]
    assert main([*args, "--device", "cpu", "--output", str(out), "--preview-every", "-1"]) == 1
    assert "preview_every must be" in capsys.readouterr().err
