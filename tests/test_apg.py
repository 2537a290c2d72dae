"""Adaptive projected guidance (sdengine/apg.py, its ops in sdengine/step_graph.py) against diffusers'
``normalized_guidance`` and ``MomentumBuffer``: in the step model, step by step, and through whole runs
against diffusers' pipelines with the same draws."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from fake_tensorrt import engine_pipeline
from test_img2img import picture

from export.checkpoint import SD15_SCHEDULER_CONFIG
from sdengine.apg import APG, apg_input, check_apg, parse_apg
from sdengine.errors import InvalidArgumentError
from sdengine.images import psnr
from sdengine.pipeline import Pipeline
from sdengine.schedulers import initial_history, load_scheduler, step
from sdengine.step_graph import APG_SLOT, MAX_HISTORY, STEP_OUTPUTS, build_step_model, step_tables

SD15 = {"_class_name": "PNDMScheduler", **SD15_SCHEDULER_CONFIG}
PROMPT, NEGATIVE = "a lantern on a table", "blurry"
SETTINGS = dict(steps=6, seed=4, height=64, width=64)


def diffusers_apg(settings: APG, guidance: float):
    """diffusers' own guidance for a run: a function of (uncond, cond) keeping its momentum buffer."""
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

    buffer = MomentumBuffer(settings.momentum) if settings.momentum else None

    def guide(uncond: np.ndarray, cond: np.ndarray) -> np.ndarray:
        u, c = torch.from_numpy(uncond), torch.from_numpy(cond)
        pred = normalized_guidance(c, u, guidance, buffer, settings.eta, settings.norm_threshold)
        return pred.numpy()

    return guide


# PNDM keeps 4 history buffers of its own, LMS 3: APG's running average is in the fifth
@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "lms", "euler_a", "pndm"])
@pytest.mark.parametrize(
    "settings",
    [APG(), APG(0.0, 15.0, -0.5), APG(0.3, 1.5, 0.0), APG(1.0, 0.0, 0.7), APG(0.0, 0.8, -0.75)],
    ids=["defaults", "paper", "threshold", "momentum", "all"],
)
def test_the_step_model_guides_as_diffusers(name, settings):
    schedule = load_scheduler(name, SD15).schedule(6)
    batch, latent, guidance = 2, (4, 3, 5), 7.5
    rng = np.random.default_rng(1)
    noise = rng.standard_normal((len(schedule.timesteps), batch, *latent), dtype=np.float32)
    tables = step_tables(schedule, noise, apg=apg_input(settings))
    model = build_step_model(
        batch=batch, latent_shape=latent, num_calls=tables.num_calls, guidance=True, apg=True
    )
    run = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((batch, *latent), dtype=np.float32)
    ref_x, ref_history, guide = x, initial_history(schedule, x.shape), diffusers_apg(settings, guidance)
    state = {
        "sample": x,
        "history": np.zeros((MAX_HISTORY, batch, *latent), np.float32),
        "step_index": np.array(0, np.int64),
    }
    for i in range(tables.num_calls):
        noise_pred = rng.standard_normal((2 * batch, *latent), dtype=np.float32)  # a stand-in UNet
        noise_pred[batch:] += 0.5 * noise_pred[:batch] + 0.3  # cond leans on uncond: a parallel part
        eps = guide(*np.split(noise_pred, 2))
        ref_x, ref_history = step(
            schedule.coeffs[i], ref_x, eps, noise[i] if schedule.needs_noise[i] else None, ref_history
        )
        g = np.array(guidance, np.float32)
        feed = {"noise_pred": noise_pred, **state, **tables.inputs(), "guidance": g}
        sample, history, index, *_ = run.run(STEP_OUTPUTS, feed)
        scale = max(1.0, float(np.abs(ref_x).max()))
        np.testing.assert_allclose(sample, ref_x, rtol=1e-5, atol=2e-5 * scale)
        for j, h in enumerate(ref_history):
            np.testing.assert_allclose(history[j], h, rtol=1e-5, atol=2e-5 * scale)
        state = {"sample": sample, "history": history, "step_index": index}
    assert state["history"][APG_SLOT].any()  # the running average lives there


def test_with_its_neutral_settings_it_is_plain_guidance():
    schedule = load_scheduler("dpmpp_2m", SD15).schedule(3)
    batch, latent = 1, (4, 2, 3)
    noise = np.zeros((3, batch, *latent), np.float32)
    rng = np.random.default_rng(2)
    feed = {
        "noise_pred": rng.standard_normal((2, *latent), dtype=np.float32),
        "sample": rng.standard_normal((1, *latent), dtype=np.float32),
        "history": np.zeros((MAX_HISTORY, 1, *latent), np.float32),
        "step_index": np.array(0, np.int64),
        "guidance": np.array(6.0, np.float32),
    }
    outputs = []
    for apg in (None, APG(1.0, 0.0, 0.0)):
        tables = step_tables(schedule, noise, apg=None if apg is None else apg_input(apg))
        model = build_step_model(
            batch=1, latent_shape=latent, num_calls=3, guidance=True, apg=apg is not None
        )
        run = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        outputs.append(run.run(["next_sample"], {**feed, **tables.inputs()})[0])
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def torch_pipe(tiny_checkpoint):
    return Pipeline.load(tiny_checkpoint, backend="torch")


@pytest.mark.parametrize(
    "settings",
    [
        dict(scheduler="euler", apg=(0.0, 15.0, -0.5)),
        dict(scheduler="dpmpp_2m", apg=(0.3, 1.0, 0.0), batch=2),  # eta: some of the parallel part
        # three buffers of its own, APG's the fourth; diffusers' eta and momentum, a threshold that bites
        # (cond and uncond differ little in this random model)
        dict(scheduler="lms", apg={"norm_threshold": 0.02}, guidance=12.0),
        dict(scheduler="euler_a", apg={"eta": 0.0, "momentum": -0.75}, image=picture(64, 64), strength=0.7),
    ],
    ids=["euler", "dpmpp_2m-batch", "lms", "img2img"],
)
def test_runs_match_diffusers_apg(ort_pipe_fp32, torch_pipe, settings):
    settings = {**SETTINGS, **settings}
    ours, ref = ort_pipe_fp32(PROMPT, NEGATIVE, **settings), torch_pipe(PROMPT, NEGATIVE, **settings)
    assert psnr(ours.array, ref.array) >= 100
    plain = ort_pipe_fp32(PROMPT, NEGATIVE, **{**settings, "apg": None})
    assert np.abs(ours.latents - plain.latents).max() > 1e-2  # APG does change the run
    assert ours.request.parameters()["apg"] == list(check_apg(settings["apg"]))


def test_sdxl_and_the_bound_loop(ort_pipe_fp32, tmp_path):
    from export.checkpoint import write_random_checkpoint
    from export.onnx_export import export_checkpoint
    from sdengine.backends.ort_cuda import OrtCudaBackend

    settings = {**SETTINGS, "scheduler": "euler", "apg": (0.0, 2.0, -0.5)}
    model_dir = ort_pipe_fp32.model_dir
    bound = Pipeline(model_dir, OrtCudaBackend(model_dir, device="cpu"), ort_pipe_fp32.tokenizer)
    np.testing.assert_allclose(
        bound(PROMPT, NEGATIVE, **settings).latents,
        ort_pipe_fp32(PROMPT, NEGATIVE, **settings).latents,
        atol=1e-4,
    )
    checkpoint = write_random_checkpoint(tmp_path / "tiny-xl", "tiny-xl", seed=0)
    export_checkpoint(checkpoint, tmp_path / "onnx")
    ours = Pipeline.load(tmp_path / "onnx", backend="ort", device="cpu")(PROMPT, NEGATIVE, **settings)
    theirs = Pipeline.load(checkpoint, backend="torch")(PROMPT, NEGATIVE, **settings)
    assert psnr(ours.array, theirs.array) >= 100


def test_settings_are_checked_and_refusals_are_clear(ort_pipe_fp32):
    assert check_apg(None) is None and check_apg(False) is None and check_apg(True) == APG(1.0, 15.0, 0.0)
    assert check_apg({"eta": 0}) == APG(0.0, 15.0, 0.0) and check_apg([0, 0, -0.5]) == APG(0.0, 0.0, -0.5)
    assert parse_apg("0, 15,-0.5") == APG(0.0, 15.0, -0.5)
    for bad, match in [
        ((1, 2), "three numbers"),
        ({"beta": 1}, "unknown: beta"),
        ((1, -1, 0), "norm_threshold must be >= 0"),
        ((1, float("nan"), 0), "finite number"),
        ((True, 1, 0), "finite number"),
    ]:
        with pytest.raises(InvalidArgumentError, match=match):
            check_apg(bad)
    with pytest.raises(InvalidArgumentError, match="--apg takes three numbers"):
        parse_apg("0,15")
    for settings, match in [
        (dict(guidance=1.0), "guidance > 1"),
        (dict(guidance_rescale=0.7), "not with guidance_rescale"),
        (dict(prompt_weights="a1111", prompt="a cat AND a dog"), "not with composable prompts"),
    ]:
        with pytest.raises(InvalidArgumentError, match=match):
            ort_pipe_fp32.request(**{"prompt": PROMPT, **settings, "apg": True, **SETTINGS})


def test_generate_takes_it_on_the_command_line(onnx_fp32, tmp_path, capsys):
    from PIL import Image

    from sdengine.cli import main

    out = tmp_path / "apg.png"
    args = ["generate", str(onnx_fp32), PROMPT, "--steps", "2", "--height", "64", "--width", "64"]
    args += ["--seed", "1", "--device", "cpu", "--scheduler", "euler"]
    assert main([*args, "--apg", "0,15,-0.5", "--output", str(out)]) == 0
    assert json.loads(Image.open(out).info["sdengine"])["apg"] == [0.0, 15.0, -0.5]
    capsys.readouterr()
    assert main([*args, "--apg", "0,15", "--output", str(tmp_path / "bad.png")]) != 0
    err = capsys.readouterr().err.strip()
    assert "--apg takes three numbers" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad.png").exists()


def test_the_tensorrt_path_guides_in_its_captured_steps(simulated, onnx_fp32, ort_pipe_fp32, tmp_path):
    """On the simulated TensorRT and CUDA runtime (tests/fake_tensorrt.py): the settings are a constant
    input of the captured steps, and the running average starts from zeros at each run."""

    engines = tmp_path / "engines"
    pipe = engine_pipeline(onnx_fp32, engines, ort_pipe_fp32.tokenizer, height=64, width=64)
    for apg in ((0.0, 0.05, -0.5), (0.0, 0.05, -0.5), (1.0, 0.0, 0.6)):  # the same twice: no state left over
        settings = {**SETTINGS, "scheduler": "dpmpp_2m", "apg": apg}
        ours, ref = pipe(PROMPT, NEGATIVE, **settings), ort_pipe_fp32(PROMPT, NEGATIVE, **settings)
        scale = float(np.abs(ref.latents).max())
        np.testing.assert_allclose(ours.latents, ref.latents, rtol=0, atol=1e-5 * scale)
