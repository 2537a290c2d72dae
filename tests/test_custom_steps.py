"""Custom timesteps and sigmas (sdengine/schedulers/custom.py) through the whole pipeline, against diffusers'
pipelines given the same ``timesteps=`` or ``sigmas=``, with the same draws. The schedulers' own step-by-step
checks against diffusers are in tests/test_schedulers.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fake_tensorrt import engine_pipeline
from test_img2img import picture
from test_pag import mask

from sdengine.errors import InvalidArgumentError, UnsupportedConfigError
from sdengine.images import psnr
from sdengine.pipeline import Pipeline
from sdengine.schedulers.custom import PRESETS

PROMPT, NEGATIVE = "a lantern on a table", "blurry"
SETTINGS = dict(seed=4, height=64, width=64)
AYS = PRESETS["ays"]
HAND_MADE = (920, 640, 410, 190, 35)


@pytest.fixture(scope="module")
def torch_pipe(tiny_checkpoint):
    return Pipeline.load(tiny_checkpoint, backend="torch")


@pytest.mark.parametrize(
    "settings",
    [
        dict(scheduler="euler", timesteps="ays"),
        dict(scheduler="euler", sigmas="ays"),
        dict(scheduler="euler", sigmas=(9.0, 2.5, 0.8, 0.2)),  # ends above 0: the last step stops there
        dict(scheduler="heun", timesteps=HAND_MADE),
        dict(scheduler="dpmpp_2m", timesteps="ays"),
        # sigmas in the place of diffusers' Karras ones (sdengine.baseline.sigmas_in_place)
        dict(scheduler="dpmpp_2m", sigmas="ays"),
        dict(scheduler="euler_a", sigmas=(9.0, 2.5, 0.8, 0.2, 0.0)),
        dict(scheduler="unipc", sigmas="ays", image=picture(64, 64), strength=0.7),
        dict(scheduler="dpmpp_2m_sde", timesteps=HAND_MADE, batch=2),
        dict(scheduler="euler", timesteps="ays", image=picture(64, 64), strength=0.6),
        dict(scheduler="dpmpp_2m", timesteps=HAND_MADE, image=picture(64, 64), mask=mask()),
        # the hires fix: each pass its own (the second runs the last hires_strength of its ten)
        dict(scheduler="euler", sigmas=(9.0, 2.5, 0.8, 0.0), hires_scale=1.5, hires_timesteps="ays"),
    ],
    ids=[
        "euler-ays",
        "ays-sigmas",
        "euler-sigmas",
        "heun",
        "dpmpp_2m",
        "dpmpp_2m-sigmas",
        "euler_a-sigmas",
        "unipc-img2img",
        "sde-batch",
        "img2img",
        "inpaint",
        "hires",
    ],
)
def test_custom_steps_match_diffusers_pipelines(ort_pipe_fp32, torch_pipe, settings):
    settings = {**SETTINGS, **settings}
    ours, ref = ort_pipe_fp32(PROMPT, NEGATIVE, **settings), torch_pipe(PROMPT, NEGATIVE, **settings)
    assert psnr(ours.array, ref.array) >= 100
    kind = "timesteps" if "timesteps" in settings else "sigmas"
    given = settings[kind]
    values = [float(v) for v in (AYS[kind]["sd"] if given == "ays" else given)]
    recorded = ours.request.parameters()
    assert recorded[kind] == values and recorded["steps"] == len(values) - (kind == "sigmas")
    spaced = {k: v for k, v in settings.items() if k != kind}
    plain = ort_pipe_fp32(PROMPT, NEGATIVE, steps=recorded["steps"], **spaced)
    assert psnr(ours.array, plain.array) < 60  # the scheduler's own spacing gives another image


def test_sdxl_takes_its_own_preset(tmp_path):
    from export.checkpoint import write_random_checkpoint
    from export.onnx_export import export_checkpoint

    checkpoint = write_random_checkpoint(tmp_path / "tiny-xl", "tiny-xl", seed=0)
    export_checkpoint(checkpoint, tmp_path / "onnx")
    ours = Pipeline.load(tmp_path / "onnx", backend="ort", device="cpu")
    theirs = Pipeline.load(checkpoint, backend="torch")
    settings = {**SETTINGS, "scheduler": "dpmpp_2m", "timesteps": "ays"}
    a, b = ours(PROMPT, NEGATIVE, **settings), theirs(PROMPT, NEGATIVE, **settings)
    assert psnr(a.array, b.array) >= 100
    assert a.request.custom.values == tuple(map(float, AYS["timesteps"]["xl"]))
    assert AYS["timesteps"]["xl"] != AYS["timesteps"]["sd"]


def test_the_count_sets_the_steps_and_refusals_are_clear(ort_pipe_fp32):
    request = ort_pipe_fp32.request(PROMPT, steps=30, timesteps="ays", **SETTINGS)
    assert request.steps == 10  # as in diffusers, the custom schedule's count wins
    with pytest.raises(UnsupportedConfigError, match="euler_a takes no custom timesteps"):
        ort_pipe_fp32(PROMPT, scheduler="euler_a", timesteps="ays", **SETTINGS)
    with pytest.raises(UnsupportedConfigError, match="ddim takes no custom sigmas"):
        ort_pipe_fp32(PROMPT, scheduler="ddim", sigmas="ays", **SETTINGS)
    with pytest.raises(InvalidArgumentError, match="only euler ends anywhere"):
        ort_pipe_fp32(PROMPT, scheduler="lms", sigmas=(3.0, 0.5), **SETTINGS)
    with pytest.raises(InvalidArgumentError, match="hires fix: give its second pass's own too"):
        ort_pipe_fp32.request(PROMPT, scheduler="euler", timesteps="ays", hires_scale=2.0, **SETTINGS)
    with pytest.raises(InvalidArgumentError, match="hires_steps 7 and the second pass's 10 custom"):
        ort_pipe_fp32.request(PROMPT, hires_scale=2.0, hires_steps=7, hires_timesteps="ays", **SETTINGS)
    with pytest.raises(InvalidArgumentError, match="apply to the hires fix only"):
        ort_pipe_fp32.request(PROMPT, hires_sigmas="ays", **SETTINGS)
    request = ort_pipe_fp32.request(
        PROMPT, hires_scale=1.5, hires_strength=0.5, hires_sigmas="ays", **SETTINGS
    )
    assert request.hires.steps == 10 and request.hires_pass(init_latents=np.zeros(0)).custom.kind == "sigmas"
    with pytest.raises(InvalidArgumentError, match="not both"):
        ort_pipe_fp32.request(PROMPT, timesteps="ays", sigmas="ays", **SETTINGS)
    with pytest.raises(InvalidArgumentError, match="decrease strictly"):
        ort_pipe_fp32.request(PROMPT, timesteps=(10, 500), **SETTINGS)


def test_the_bound_loop_runs_them_as_the_host_loop(ort_pipe_fp32):
    from sdengine.backends.ort_cuda import OrtCudaBackend

    model_dir = ort_pipe_fp32.model_dir
    bound = Pipeline(model_dir, OrtCudaBackend(model_dir, device="cpu"), ort_pipe_fp32.tokenizer)
    for custom in (dict(timesteps="ays"), dict(sigmas="ays")):
        settings = {**SETTINGS, "scheduler": "euler", **custom}
        np.testing.assert_allclose(
            bound(PROMPT, NEGATIVE, **settings).latents,
            ort_pipe_fp32(PROMPT, NEGATIVE, **settings).latents,
            atol=1e-4,
        )


def test_generate_takes_them_on_the_command_line(onnx_fp32, tmp_path, capsys):
    from PIL import Image

    from sdengine.cli import main

    out = tmp_path / "ays.png"
    args = ["generate", str(onnx_fp32), PROMPT, "--height", "64", "--width", "64", "--seed", "1"]
    args += ["--device", "cpu", "--scheduler", "euler"]
    assert main([*args, "--sigmas", "9,2.5,0.8,0", "--output", str(out)]) == 0
    recorded = json.loads(Image.open(out).info["sdengine"])
    assert recorded["sigmas"] == [9.0, 2.5, 0.8, 0.0] and recorded["steps"] == 3
    hires = ["--sigmas", "9,0", "--hires-scale", "1.5", "--hires-sigmas", "5,1,0", "--output", str(out)]
    assert main([*args, *hires]) == 0
    recorded = json.loads(Image.open(out).info["sdengine"])
    assert recorded["hires_sigmas"] == [5.0, 1.0, 0.0] and recorded["hires_steps"] == 2
    capsys.readouterr()
    for bad, message in [
        (["--steps", "5", "--timesteps", "ays"], "--steps and --timesteps: --timesteps sets the steps"),
        (["--timesteps", "10,500"], "custom timesteps must decrease strictly"),
        (["--sigmas", "ays10"], "a custom schedule takes a preset (ays) or numbers"),
        (["--timesteps", "ays", "--scheduler", "lms"], "lms takes no custom timesteps"),
    ]:
        assert main([*args, *bad, "--output", str(tmp_path / "bad.png")]) != 0
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "bad.png").exists()
    with pytest.raises(SystemExit):  # argparse: one or the other
        main([*args, "--timesteps", "ays", "--sigmas", "ays"])


def test_the_tensorrt_path_runs_them_in_its_captured_steps(simulated, onnx_fp32, ort_pipe_fp32, tmp_path):
    """On the simulated TensorRT and CUDA runtime (tests/fake_tensorrt.py): a custom schedule is the
    step model's tables, so the captured steps run it as the host loop does."""

    engines = tmp_path / "engines"
    pipe = engine_pipeline(onnx_fp32, engines, ort_pipe_fp32.tokenizer, height=64, width=64)
    for custom in (dict(scheduler="dpmpp_2m", timesteps="ays"), dict(scheduler="euler_a", sigmas="ays")):
        settings = {**SETTINGS, **custom}
        ours, ref = pipe(PROMPT, NEGATIVE, **settings), ort_pipe_fp32(PROMPT, NEGATIVE, **settings)
        scale = float(np.abs(ref.latents).max())
        np.testing.assert_allclose(ours.latents, ref.latents, rtol=0, atol=1e-5 * scale)


def test_each_scheduler_names_the_kinds_it_takes():
    """custom_kinds (which the HTTP API's schedules consult) answers what load_scheduler accepts: the Karras,
    exponential and beta variants take sigmas, not timesteps."""
    from sdengine.schedulers import SCHEDULER_NAMES, custom_kinds, load_scheduler
    from sdengine.schedulers.custom import custom_steps

    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    for name in SCHEDULER_NAMES:
        taken = []
        for kind in ("timesteps", "sigmas"):
            try:
                load_scheduler(name, config, custom_steps(**{kind: "ays"}))
            except (InvalidArgumentError, UnsupportedConfigError):
                continue
            taken.append(kind)
        assert custom_kinds(name) == tuple(taken), name
    assert custom_kinds("dpmpp_2m_karras") == ("sigmas",) and custom_kinds("dpmpp_2m") == (
        "timesteps",
        "sigmas",
    )
