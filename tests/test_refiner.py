"""A base model and a refiner sharing one run: the split against diffusers' for every scheduler, whole runs
against diffusers' SDXL base then refiner pipelines, and what is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_controlnet import control, control_onnx, controlnet_dirs  # noqa: F401 (fixtures)
from test_inpaint import rectangle

from sdengine.cli import main
from sdengine.errors import InvalidArgumentError, UnsupportedConfigError
from sdengine.images import psnr
from sdengine.pipeline import Pipeline
from sdengine.schedulers import SCHEDULER_NAMES, diffusers_scheduler_class, load_scheduler
from sdengine.server import generation_settings, serve_in_thread

PROMPT = "a photo of an astronaut riding a horse"
SETTINGS = dict(steps=10, seed=3, height=64, width=96)
#: SDXL's scheduler config (its "leading" spacing with an offset), with the options PNDM and DDIM read
XL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
}


def diffusers_split(name: str, steps: int, share: float) -> tuple[np.ndarray, int, int]:
    """diffusers' full timesteps, the calls its SDXL pipeline makes with ``denoising_end=share`` and the
    call its SDXL image to image starts at with ``denoising_start=share`` (their own code, run here)."""
    import diffusers

    cls, overrides = diffusers_scheduler_class(name)
    scheduler = getattr(diffusers, cls).from_config(XL_SCHEDULER, **overrides)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    cutoff = int(round(1000 - share * 1000))
    base = len(list(filter(lambda ts: ts >= cutoff, timesteps)))
    refiner = (timesteps < cutoff).sum().item()
    if scheduler.order == 2 and refiner % 2 == 0:
        refiner += 1
    return timesteps.numpy(), base, len(timesteps) - refiner


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_the_split_is_diffusers(name):
    scheduler = load_scheduler(name, XL_SCHEDULER)
    for steps in (4, 7, 20):
        for share in (0.1, 0.5, 0.8, 0.93):
            timesteps, base, first = diffusers_split(name, steps, share)
            if not base:  # a switch before the first step: refused
                with pytest.raises(InvalidArgumentError, match="switch later"):
                    scheduler.schedule(steps, denoising_end=share)
                continue
            ours = scheduler.schedule(steps, denoising_end=share)
            assert len(ours.timesteps) == base, (steps, share)
            np.testing.assert_allclose(ours.timesteps, timesteps[:base], atol=1e-3)
            if first == len(timesteps):  # a switch after the last step: refused
                with pytest.raises(InvalidArgumentError, match="switch earlier"):
                    scheduler.schedule(steps, denoising_start=share)
            else:
                refiner = scheduler.schedule(steps, denoising_start=share)
                np.testing.assert_allclose(refiner.timesteps, timesteps[first:], atol=1e-3)
            fresh = scheduler.schedule(steps)  # the base's calls are the whole run's, row for row
            np.testing.assert_array_equal(ours.coeffs, fresh.coeffs[:base])


def test_a_split_that_leaves_a_model_no_call_is_refused():
    scheduler = load_scheduler("euler", XL_SCHEDULER)
    with pytest.raises(InvalidArgumentError, match="the refiner would run no step; switch earlier"):
        scheduler.schedule(20, denoising_start=0.999)  # timestep 1 is the last; none is below it
    with pytest.raises(InvalidArgumentError, match="the base model would run no step; switch later"):
        scheduler.schedule(20, 0.1, denoising_end=0.5)  # image to image from timestep 101
    for bad in (0, 1, 1.5, True, "0.8"):
        with pytest.raises(InvalidArgumentError, match=r"must be a number in \(0, 1\)"):
            scheduler.schedule(20, denoising_end=bad)


@pytest.fixture(scope="module")
def xl_models(tmp_path_factory):
    """(checkpoint, export) of a tiny random SDXL base and of a tiny random refiner."""
    from export.checkpoint import write_random_checkpoint
    from export.onnx_export import export_checkpoint

    root = tmp_path_factory.mktemp("refiner")
    models = {}
    for name, preset, seed in (("base", "tiny-xl", 0), ("refiner", "tiny-xl-refiner", 1)):
        checkpoint = write_random_checkpoint(root / name / "checkpoint", preset, seed=seed)
        export_checkpoint(checkpoint, root / name / "onnx")
        models[name] = checkpoint, root / name / "onnx"
    return models


@pytest.fixture(scope="module")
def refined_pipes(xl_models):
    """(ONNX Runtime, torch), each SDXL base with its refiner."""
    (base_ckpt, base_onnx), (refiner_ckpt, refiner_onnx) = xl_models["base"], xl_models["refiner"]
    ours = Pipeline.load(base_onnx, backend="ort", device="cpu", refiner=refiner_onnx)
    return ours, Pipeline.load(base_ckpt, backend="torch", refiner=refiner_ckpt)


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"scheduler": "dpmpp_2m", "negative_prompt": "blurry", "batch": 2},
        {"scheduler": "heun", "refiner_switch": 0.7},  # the base ends half way through a Heun step
        {"scheduler": "euler_a", "original_size": (512, 512)},
        {"scheduler": "ddim", "guidance": 1.0},
        {"image": "random", "strength": 0.6, "refiner_switch": 0.9},
        {"prompt": "a [cat:dog:0.9] (red:1.2)", "prompt_weights": "a1111"},  # edited in the refiner's part
        # edited before the refiner takes over: its first call already reads the edited text
        {"prompt": "a [cat:dog:0.5] (red:1.2)", "prompt_weights": "a1111", "refiner_switch": 0.5},
        {"image": "random", "mask": "rectangle"},  # inpainting: both parts blend the image back in
        {"image": "random", "mask": "rectangle", "strength": 0.7, "scheduler": "dpmpp_2m", "batch": 2},
        {"image": "random", "mask": "rectangle", "scheduler": "euler_a", "negative_prompt": "blurry"},
        {"image": "random", "mask": "rectangle", "scheduler": "heun", "refiner_switch": 0.7},
    ],
    ids=lambda extra: "-".join(extra) or "euler",
)
def test_base_then_refiner_matches_diffusers(refined_pipes, extra):
    """Against diffusers' SDXL pipeline with ``denoising_end`` (latents out), then its SDXL image to image
    on the refiner with ``denoising_start``, as diffusers' documentation runs the two."""
    extra = dict(extra)
    prompt = extra.pop("prompt", PROMPT)
    if extra.get("image") == "random":
        extra["image"] = np.random.default_rng(0).random((64, 96, 3)).astype(np.float32)
    if extra.get("mask") == "rectangle":
        extra["mask"] = rectangle()
    ours, ref = refined_pipes
    a, b = ours(prompt, **SETTINGS, **extra), ref(prompt, **SETTINGS, **extra)
    assert psnr(a.array, b.array) >= 100
    if "mask" in extra:  # kept outside the mask, as far as the VAE's round trip keeps an image
        kept = extra["mask"][0] == 0
        assert psnr(a.array[0][kept], extra["image"][kept]) > psnr(a.array[0][~kept], extra["image"][~kept])
    assert a.request.refiner_switch == extra.get("refiner_switch", 0.8)


def test_the_refiner_makes_the_last_calls(refined_pipes):
    """euler, 10 steps, switch 0.8 (timestep 200): the base runs 901 ... 201 (8 calls), the refiner 101 and 1;
    the preview counts on over both parts, and progress wraps each part's calls."""
    ours, _ = refined_pipes
    looks, ticks = [], []

    def progress(calls):
        ticks.append(len(calls))
        return calls

    result = ours(PROMPT, **SETTINGS, preview=lambda k, x: looks.append(k), progress=progress)
    assert looks == [1, 2, 3, 4, 5, 6, 7, 9] and ticks == [8, 2]  # a part's last call is no preview
    assert result.times.count("step_call") == 10


def test_a_stop_before_the_refiner_keeps_the_bases_latents(refined_pipes):
    ours, _ = refined_pipes
    asked = []

    def stop():
        asked.append(True)
        return len(asked) > 7  # the eighth question comes after the base's last call

    stopped = ours(PROMPT, **SETTINGS, stop=stop)
    base = ours.request(PROMPT, **SETTINGS)
    from sdengine.timing import StageTimes

    np.testing.assert_array_equal(stopped.latents, ours.denoised(base, StageTimes()))


def test_the_hand_over_on_the_device_loop(refined_pipes, xl_models):
    """The GPU backends' loop (ONNX Runtime's CUDA backend's bound loop, here on the CPU) cuts the base's run
    from the tables as the host loop does."""
    from sdengine.backends.ort_cuda import OrtCudaBackend
    from sdengine.model_dir import open_onnx_dir
    from sdengine.tokenizer import ClipTokenizer

    def bound(name: str) -> Pipeline:
        model_dir = open_onnx_dir(xl_models[name][1])
        backend = OrtCudaBackend(model_dir, device="cpu")
        return Pipeline(model_dir, backend, ClipTokenizer.from_dir(model_dir.tokenizer_dir))

    pipe, (host, _) = bound("base"), refined_pipes
    pipe.set_refiner(bound("refiner"))
    for scheduler in ("euler", "dpmpp_2m"):
        ours, expected = (
            pipe(PROMPT, **SETTINGS, scheduler=scheduler),
            host(PROMPT, **SETTINGS, scheduler=scheduler),
        )
        assert psnr(ours.array, expected.array) >= 100


def test_the_same_model_as_its_own_refiner_is_one_run(tiny_checkpoint, onnx_fp32, ort_pipe_fp32):
    """Euler and DDIM keep no state between steps, so an SD 1.x model finishing its own run (loaded again)
    makes the run it would make alone: a check of the hand-over that needs no SDXL pipeline."""
    pipe = Pipeline.load(onnx_fp32, backend="ort", device="cpu", refiner=onnx_fp32)
    for scheduler, switch in (("euler", 0.8), ("ddim", 0.35)):
        settings = dict(steps=6, seed=1, height=64, width=64, scheduler=scheduler)
        alone = ort_pipe_fp32(PROMPT, **settings)
        shared = pipe(PROMPT, refiner_switch=switch, **settings)
        assert psnr(shared.array, alone.array) >= 100
    with pytest.raises(UnsupportedConfigError, match="only diffusers' SDXL pipelines without ControlNet"):
        Pipeline.load(tiny_checkpoint, backend="torch", refiner=tiny_checkpoint)(PROMPT, steps=2)


def test_what_a_refiner_refuses(refined_pipes, xl_models, ort_pipe_fp32, onnx_fp32, tmp_path):
    from export.checkpoint import write_random_checkpoint

    ours, ref = refined_pipes
    inpainting = write_random_checkpoint(tmp_path / "inpainting", "tiny-xl", seed=4, inpainting=True)
    pipe = Pipeline.load(inpainting, backend="torch", refiner=xl_models["refiner"][0])
    image = np.zeros((64, 96, 3), np.float32)
    with pytest.raises(
        UnsupportedConfigError, match="an inpainting model's run cannot be handed to a refiner"
    ):
        pipe.request(PROMPT, image=image, mask=rectangle())
    with pytest.raises(InvalidArgumentError, match="refiner_switch needs a refiner"):
        ort_pipe_fp32.request(PROMPT, refiner_switch=0.8)
    for bad in (0.0, 1.0, -1, True):
        with pytest.raises(InvalidArgumentError, match=r"refiner_switch must be a number in \(0, 1\)"):
            ours.request(PROMPT, refiner_switch=bad)
    with pytest.raises(InvalidArgumentError, match="the hires fix and a refiner"):
        ours.request(PROMPT, hires_scale=2.0)
    with pytest.raises(InvalidArgumentError, match="switch earlier"):
        ours.request(PROMPT, steps=20, refiner_switch=0.999)
    with pytest.raises(InvalidArgumentError, match="is not the base's|are not the base's"):
        ours.set_refiner(ort_pipe_fp32)  # SD 1.x latents: scaled by 0.18215, SDXL's by 0.13025
    with pytest.raises(InvalidArgumentError, match="load both on the same backend"):
        ours.set_refiner(ref.refiner)
    with pytest.raises(InvalidArgumentError, match="cannot refine its own runs"):
        ours.set_refiner(ours)
    with pytest.raises(InvalidArgumentError, match="a refiner's takes the latents alone"):
        Pipeline.load(onnx_fp32, backend="ort", device="cpu").set_refiner(controlled(onnx_fp32))


def controlled(onnx_fp32):
    """A pipeline whose model directory says its UNet takes a ControlNet's image (the check reads no more)."""
    import dataclasses

    pipe = Pipeline.load(onnx_fp32, backend="ort", device="cpu")
    arch = dataclasses.replace(pipe.model_dir.arch, controlnets=1)
    pipe.model_dir = dataclasses.replace(pipe.model_dir, arch=arch)
    return pipe


def test_cli_generates_with_a_refiner(xl_models, tmp_path, capsys):
    out = tmp_path / "refined.png"
    args = ["generate", str(xl_models["base"][1]), PROMPT, "--steps", "4", "--height", "64", "--width", "64"]
    args += [
        "--device",
        "cpu",
        "--seed",
        "1",
        "--output",
        str(out),
        "--refiner",
        str(xl_models["refiner"][1]),
    ]
    assert main([*args, "--refiner-switch", "0.7"]) == 0
    parameters = json.loads(Image.open(out).info["sdengine"])
    assert parameters["refiner_switch"] == 0.7
    capsys.readouterr()
    assert main([*args[:-2], "--refiner-switch", "0.7"]) != 0
    assert "--refiner-switch needs a refiner" in capsys.readouterr().err


def test_the_servers_refiner_fields():
    assert (
        generation_settings({"refiner_switch_at": 0.7}, img2img=False, refiner=True)[0]["refiner_switch"]
        == 0.7
    )
    assert "refiner_switch" not in generation_settings({}, img2img=False, refiner=True)[0]  # the default
    assert "refiner_switch" not in generation_settings({"refiner_switch_at": 0.7}, img2img=False)[0]
    with pytest.raises(InvalidArgumentError, match="this server has no refiner"):
        generation_settings({"refiner_checkpoint": "sd_xl_refiner_1.0"}, img2img=False)


def test_the_server_runs_the_refiner(refined_pipes):
    from test_server import call, pixels

    ours, _ = refined_pipes
    server = serve_in_thread(ours)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        body = {"prompt": PROMPT, "width": 96, "height": 64, "steps": 10, "seed": 3, "refiner_switch_at": 0.7}
        status, answer = call(url, "/sdapi/v1/txt2img", {**body, "refiner_checkpoint": "sd_xl_refiner_1.0"})
    finally:
        server.shutdown()
    assert status == 200 and json.loads(answer["info"])["refiner_switch_at"] == 0.7
    direct = ours(
        PROMPT,
        "",
        **SETTINGS,
        guidance=7.0,
        scheduler="euler",
        refiner_switch=0.7,
        prompt_weights="a1111",
        long_prompts=True,
    )
    np.testing.assert_allclose(pixels(answer["images"][0]), direct.array[0], atol=0.5 / 255)


def test_a_controlled_base_reads_its_controlnet_over_the_whole_run(control_onnx, onnx_fp32):  # noqa: F811
    """The base's calls are those of the whole run, ControlNet weights and all: ``control_end=0.5`` of 6 Euler
    calls keeps the ControlNet on calls 0-2 (of the run), not 0-1 (of the base's 4: timesteps 999 ... 399.6);
    the base hands over the latents the run has after those 4 calls."""
    from sdengine.timing import StageTimes

    settings = dict(steps=6, seed=1, height=64, width=96, scheduler="euler", control_end=0.5)
    settings["control_image"] = control()
    pipe = Pipeline.load(control_onnx, backend="ort", device="cpu", refiner=onnx_fp32)
    request = pipe.request(PROMPT, **settings)
    assert len(request.schedule(pipe.model_dir.scheduler_config).timesteps) == 4
    asked = []
    alone = Pipeline.load(control_onnx, backend="ort", device="cpu")
    stopped = alone(PROMPT, **settings, stop=lambda: asked.append(1) or len(asked) == 4)
    np.testing.assert_array_equal(pipe.denoised(request, StageTimes()), stopped.latents)
    assert np.isfinite(pipe(PROMPT, **settings).array).all()


def test_bench_runs_base_and_refiner_against_diffusers(xl_models, tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["bench", str(xl_models["base"][1]), "--refiner", str(xl_models["refiner"][1]), "--device", "cpu"]
    args += ["--runs", "1", "--warmup", "0", "--steps", "10", "--height", "64", "--width", "64"]
    assert main([*args, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["refiner"] == str(xl_models["refiner"][1])
    assert report["config"]["refiner_checkpoint"] == str(xl_models["refiner"][0].resolve())
    ours = report["backends"]["ort"]
    assert ours["unet_calls_per_run"] == 10 and ours["psnr_vs_torch_db"] >= 100
    assert report["flops_per_call"] == {}  # two UNets: no one FLOP count per call


def test_the_hand_over_on_simulated_tensorrt(simulated, refined_pipes, xl_models, tmp_path):
    """TensorRT's path with simulated engines (each runs its ONNX model; tests/fake_tensorrt.py): the base's
    captured steps stop at the switch, the refiner's engines take over from there."""
    from fake_tensorrt import engine_pipeline

    pipes = [
        engine_pipeline(xl_models[name][1], tmp_path / name, batch=1, height=64, width=96)
        for name in ("base", "refiner")
    ]
    pipes[0].set_refiner(pipes[1])
    host = refined_pipes[0]
    for extra in ({}, {"scheduler": "dpmpp_2m", "refiner_switch": 0.6}):
        a, b = pipes[0](PROMPT, **SETTINGS, **extra), host(PROMPT, **SETTINGS, **extra)
        np.testing.assert_allclose(a.latents, b.latents, rtol=0, atol=1e-5 * float(np.abs(b.latents).max()))
    assert simulated.launches > 0 and pipes[0].backend.graphs_refused is None
