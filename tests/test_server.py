"""The AUTOMATIC1111-compatible HTTP API: its requests map onto the pipeline's settings, its answers carry the
same images a direct call makes, and bad requests get one clear error each while the server keeps serving."""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from sdengine import __version__
from sdengine.errors import InvalidArgumentError
from sdengine.mask_crop import cover_resize, fill_resize
from sdengine.schedulers import load_scheduler
from sdengine.server import (
    OPTION_DEFAULTS,
    SCHEDULES,
    SIGMA_SCHEDULE,
    generation_settings,
    sampler_of,
    scheduler_name,
    serve_in_thread,
)
from sdengine.webui_schedules import schedule_sigmas

SIZE = {"width": 64, "height": 64, "steps": 3}
#: What the server asks of the pipeline where a request leaves it to the web UI's defaults.
WEBUI = {"guidance": 7.0, "scheduler": "euler", "prompt_weights": "a1111", "long_prompts": True}


@pytest.fixture(scope="module")
def server(ort_pipe_fp32):
    server = serve_in_thread(ort_pipe_fp32)
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def call(url: str, path: str, body: object | None = None, raw: bytes | None = None) -> tuple[int, object]:
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def pixels(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        return np.asarray(image.convert("RGB"), np.float32) / 255


def png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray((array * 255).round().astype(np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(
    ("sampler", "scheduler", "expected"),
    [
        (None, None, "euler"),  # the web UI API's default sampler
        ("Euler a", "Automatic", "euler_a"),
        ("DPM++ 2M", "Karras", "dpmpp_2m_karras"),
        ("DPM++ 2M Karras", None, "dpmpp_2m_karras"),
        ("PLMS", "", "pndm"),
        ("LMS", "Karras", "lms_karras"),
        ("DPM++ 2M SDE", "Exponential", "dpmpp_2m_sde_exponential"),
        ("Euler", "Exponential", "euler_exponential"),
        ("Euler", "exponential", "euler_exponential"),  # the schedule's name, as the web UI takes it too
        ("DPM++ 2M", "Beta", "dpmpp_2m_beta"),
    ],
)
def test_sampler_names(sampler, scheduler, expected):
    assert scheduler_name(sampler, scheduler) == expected
    assert scheduler_name(*sampler_of(expected)) == expected


@pytest.mark.parametrize(
    ("sampler", "scheduler", "expected"),
    [
        ("DPM++ 2M", "Align Your Steps", "dpmpp_2m"),
        ("Euler a", "align_your_steps", "euler_a"),
        ("UniPC", "SGM Uniform", "unipc"),
        ("Heun", "Simple", "heun"),
        ("LMS", "Normal", "lms"),
        ("DPM2", "Uniform", "dpm2"),
        ("DDIM", "Align Your Steps", "'DDIM' has no Align Your Steps scheduler"),
        ("LCM", "Simple", "'LCM' has no Simple scheduler"),
        ("DPM++ 2M Karras", "SGM Uniform", "'DPM\\+\\+ 2M Karras' has no SGM Uniform scheduler"),
        ("LMS", "Polyexponential", "lms"),
        ("Euler a", "ddim", "euler_a"),
        ("Euler", "KL Optimal", "euler"),
        ("DPM++ 2M", "KL Optimal", "'DPM\\+\\+ 2M' has no KL Optimal scheduler: its sigmas end above 0"),
    ],
)
def test_sigma_schedules_keep_the_samplers_scheduler(sampler, scheduler, expected):
    """The web UI's schedules that are lists of sigmas (sdengine.webui_schedules) run as custom sigmas of
    the sampler's own scheduler, where it takes them."""
    if "scheduler" in expected:
        with pytest.raises(InvalidArgumentError, match=expected):
            scheduler_name(sampler, scheduler)
        return
    assert scheduler_name(sampler, scheduler) == expected
    settings = generation_settings({"sampler_name": sampler, "scheduler": scheduler}, img2img=False)[0]
    assert settings[SIGMA_SCHEDULE] == SCHEDULES.get(scheduler, scheduler)


def test_align_your_steps_over_http_is_the_pipelines_run_of_its_sigmas(server, ort_pipe_fp32):
    body = {"prompt": "a cat", **SIZE, "seed": 5, "sampler_name": "DPM++ 2M", "scheduler": "Align Your Steps"}
    status, answer = call(server, "/sdapi/v1/txt2img", body)
    assert status == 200, answer
    info = json.loads(answer["info"])
    assert info["scheduler"] == "Align Your Steps" and info["sampler_name"] == "DPM++ 2M"
    assert "Sampler: DPM++ 2M, Schedule type: Align Your Steps" in info["infotexts"][0]
    abar = load_scheduler("dpmpp_2m", ort_pipe_fp32.model_dir.scheduler_config).alphas_cumprod()
    sigmas = schedule_sigmas("Align Your Steps", 3, abar, xl=False)
    assert len(sigmas) == 4 and sigmas[0] == pytest.approx(14.615) and sigmas[-1] == 0
    direct = ort_pipe_fp32("a cat", "", **SIZE, seed=5, **{**WEBUI, "scheduler": "dpmpp_2m"}, sigmas=sigmas)
    np.testing.assert_allclose(pixels(answer["images"][0]), direct.array[0], atol=0.5 / 255)
    default = ort_pipe_fp32("a cat", "", **SIZE, seed=5, **{**WEBUI, "scheduler": "dpmpp_2m"})
    assert np.abs(direct.latents - default.latents).max() > 0.1  # the schedule does change the run
    with Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))) as image:
        recorded = json.loads(image.info["sdengine"])  # what the served run ran
    assert recorded["sigmas"] == list(sigmas) and recorded["scheduler"] == "dpmpp_2m"
    hires = {**body, "enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 4, "denoising_strength": 0.5}
    status, answer = call(server, "/sdapi/v1/txt2img", hires)
    assert status == 200, answer
    with Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))) as image:
        recorded = json.loads(image.info["sdengine"])  # each pass the schedule for its steps
    assert recorded["sigmas"] == list(sigmas) and recorded["hires_steps"] == 4
    assert recorded["hires_sigmas"] == list(schedule_sigmas("Align Your Steps", 4, abar, xl=False))


@pytest.mark.parametrize(
    ("sampler", "schedule", "steps", "ran"),
    [("Euler", "KL Optimal", 3, 3), ("Euler a", "DDIM", 6, 7)],  # DDIM: timesteps 997, 831, ..., 1
)
def test_schedules_that_end_above_0_or_change_the_step_count_over_http(
    server, ort_pipe_fp32, sampler, schedule, steps, ran
):
    """KL Optimal's run ends at the smallest training sigma (Euler's can), DDIM's takes as many steps as its
    stride gives: both as the web UI runs them, the pipeline's run of those sigmas."""
    body = {
        "prompt": "a cat",
        **SIZE,
        "steps": steps,
        "seed": 6,
        "sampler_name": sampler,
        "scheduler": schedule,
    }
    status, answer = call(server, "/sdapi/v1/txt2img", body)
    assert status == 200, answer
    assert f"Schedule type: {schedule}" in json.loads(answer["info"])["infotexts"][0]
    name = scheduler_name(sampler, None)
    abar = load_scheduler(name, ort_pipe_fp32.model_dir.scheduler_config).alphas_cumprod()
    sigmas = schedule_sigmas(schedule, steps, abar, xl=False)
    assert len(sigmas) == ran + 1 and (sigmas[-1] > 0) == (schedule == "KL Optimal")
    direct = ort_pipe_fp32("a cat", "", **SIZE, seed=6, **{**WEBUI, "scheduler": name}, sigmas=sigmas)
    np.testing.assert_allclose(pixels(answer["images"][0]), direct.array[0], atol=0.5 / 255)
    with Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))) as image:
        recorded = json.loads(image.info["sdengine"])
    assert recorded["sigmas"] == list(sigmas) and recorded["steps"] == ran


def test_settings_map_the_web_uis_fields():
    body = {
        "prompt": "a [cat:dog:0.5]",
        "steps": 20,
        "cfg_scale": 5,
        "seed": 7,
        "subseed": 9,
        "subseed_strength": 0.3,
        "batch_size": 2,
        "n_iter": 3,
        "enable_hr": True,
        "hr_scale": 1.5,
        "hr_upscaler": "Latent",
        "denoising_strength": 0.6,
        "override_settings": {"CLIP_stop_at_last_layers": 2},
        "restore_faces": False,  # asks for nothing: accepted
        "save_images": True,  # the web UI's bookkeeping
        "eta": 1.0,  # what the default sampler ignores
        "some_new_field": 1,
    }
    settings, n_iter, ignored, _, _ = generation_settings(body, img2img=False)
    assert n_iter == 3 and ignored == ["some_new_field"]
    assert settings == {
        "prompt": "a [cat:dog:0.5]",
        "negative_prompt": "",
        "steps": 20,
        "guidance": 5.0,
        "width": 512,
        "height": 512,
        "batch": 2,
        "scheduler": "euler",
        "prompt_weights": "a1111",
        "long_prompts": True,
        "seed": 7,
        "variation_seed": 9,
        "variation_strength": 0.3,
        "clip_skip": 1,
        "hires_scale": 1.5,
        "hires_upscale": "latent",
        "hires_steps": None,
        "hires_strength": 0.6,
    }
    assert generation_settings({"seed": -1}, img2img=False)[0]["seed"] is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"restore_faces": True}, "not supported: restore_faces"),
        ({"restore_faces": True, "styles": ["x"]}, "not supported: restore_faces, styles"),
        ({"sampler_name": "DPM adaptive"}, "sampler 'DPM adaptive' is not supported"),
        ({"scheduler": "Karras Exponential"}, "scheduler 'Karras Exponential' is not supported"),
        ({"sampler_name": "Euler a", "scheduler": "Exponential"}, "'Euler a' has no Exponential scheduler"),
        ({"sampler_name": "Euler Karras", "scheduler": "Exponential"}, "has no Exponential scheduler"),
        ({"sampler_name": "DDIM", "eta": 0.5}, "eta 0.5 is not supported"),
        ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler 'R-ESRGAN 4x\\+' is not supported"),
        ({"steps": "many"}, "steps must be a whole number"),
        ({"n_iter": 0}, "n_iter must be at least 1"),
        ({"override_settings": {"sd_vae": "x"}}, "only CLIP_stop_at_last_layers"),
        ({"override_settings": {"randn_source": "GPU"}}, "only \"CPU\" .* not 'GPU'"),
        ([], "must be a JSON object"),
    ],
)
def test_bad_fields_are_named(body, message):
    with pytest.raises(InvalidArgumentError, match=message):
        generation_settings(body, img2img=False)


def test_randn_source_cpu_is_torch_s_noise():
    settings, *_ = generation_settings({"override_settings": {"randn_source": "CPU"}}, img2img=False)
    assert settings["noise_source"] == "torch-cpu"
    assert "noise_source" not in generation_settings({}, img2img=False)[0]


def test_txt2img_answers_what_a_direct_call_makes(server, ort_pipe_fp32):
    status, answer = call(server, "/sdapi/v1/txt2img", {"prompt": "a (red:1.2) cat", **SIZE, "seed": 11})
    assert status == 200 and len(answer["images"]) == 1
    direct = ort_pipe_fp32(
        "a (red:1.2) cat",
        "",
        **SIZE,
        seed=11,
        **WEBUI,
    )
    np.testing.assert_allclose(pixels(answer["images"][0]), direct.array[0], atol=0.5 / 255)
    info = json.loads(answer["info"])
    assert (info["seed"], info["all_seeds"], info["sampler_name"], info["width"]) == (11, [11], "Euler", 64)
    model = ort_pipe_fp32.model_dir.root.name
    assert info["infotexts"] == [
        "a (red:1.2) cat\nSteps: 3, Sampler: Euler, Schedule type: Automatic, CFG scale: 7.0, Seed: 11, "
        f"Size: 64x64, Model: {model}, Version: sdengine {__version__}"
    ]
    assert answer["parameters"]["prompt"] == "a (red:1.2) cat"


def test_batches_and_iterations_go_on_from_the_seed(server, ort_pipe_fp32):
    body = {"prompt": "a cat", **SIZE, "seed": 20, "batch_size": 2, "n_iter": 2, "sampler_name": "Euler a"}
    status, answer = call(server, "/sdapi/v1/txt2img", body)
    info = json.loads(answer["info"])
    assert status == 200 and info["all_seeds"] == [20, 21, 22, 23]
    assert [text.split("Seed: ")[1].split(",")[0] for text in info["infotexts"]] == ["20", "21", "22", "23"]
    alone = ort_pipe_fp32("a cat", **SIZE, seed=23, **{**WEBUI, "scheduler": "euler_a"})
    np.testing.assert_allclose(pixels(answer["images"][3]), alone.array[0], atol=0.5 / 255)


def test_hires_and_img2img(server, ort_pipe_fp32):
    body = {"prompt": "a cat", **SIZE, "seed": 4, "enable_hr": True, "hr_scale": 2, "denoising_strength": 0.5}
    status, answer = call(server, "/sdapi/v1/txt2img", body)
    assert status == 200 and pixels(answer["images"][0]).shape == (128, 128, 3)
    written = json.loads(answer["info"])["infotexts"][0]
    assert ", Size: 64x64, " in written and ", Denoising strength: 0.5, " in written
    assert ", Hires upscale: 2.0, Hires steps: 3, Hires upscaler: Latent, " in written
    source = pixels(answer["images"][0])
    body = {"prompt": "a dog", **SIZE, "seed": 5, "init_images": [png(source)], "denoising_strength": 0.6}
    status, answer = call(server, "/sdapi/v1/img2img", body)
    assert status == 200 and "init_images" not in answer["parameters"]
    direct = ort_pipe_fp32(
        "a dog",
        "",
        **SIZE,
        seed=5,
        image=source,
        strength=0.6,
        **WEBUI,
    )
    np.testing.assert_allclose(pixels(answer["images"][0]), direct.array[0], atol=0.5 / 255)


@pytest.mark.parametrize("mode", [1, 2])
def test_img2img_resize_modes(server, ort_pipe_fp32, mode):
    source = np.random.default_rng(mode).random((40, 96, 3)).astype(np.float32)  # wide: crop or fill it
    body = {"prompt": "a dog", **SIZE, "seed": 6, "init_images": [png(source)], "resize_mode": mode}
    status, answer = call(server, "/sdapi/v1/img2img", body)
    assert status == 200, answer
    image = Image.open(io.BytesIO(base64.b64decode(png(source))))
    resized = (cover_resize if mode == 1 else fill_resize)(image, 64, 64)
    direct = ort_pipe_fp32(
        "a dog",
        **SIZE,
        seed=6,
        image=resized,
        strength=0.75,
        **WEBUI,
    )
    np.testing.assert_allclose(pixels(answer["images"][0]), direct.array[0], atol=0.5 / 255)
    stretched = ort_pipe_fp32(
        "a dog",
        **SIZE,
        seed=6,
        image=image,
        strength=0.75,
        **WEBUI,
    )
    assert np.abs(stretched.array[0] - direct.array[0]).max() > 0.02  # the mode made a difference
    status, answer = call(server, "/sdapi/v1/img2img", {**body, "resize_mode": 3})
    assert status == 422 and "resize_mode 3 is not supported" in answer["detail"]


def test_composable_prompts_answer_what_a_direct_call_makes(server, ort_pipe_fp32):
    body = {"prompt": "a cat AND a (red:1.2) hat :0.6", **SIZE, "seed": 2}
    status, answer = call(server, "/sdapi/v1/txt2img", body)
    assert status == 200, answer
    direct = ort_pipe_fp32(
        body["prompt"],
        "",
        **SIZE,
        seed=2,
        **WEBUI,
    )
    assert direct.request.copies == 3
    np.testing.assert_allclose(pixels(answer["images"][0]), direct.array[0], atol=0.5 / 255)


def test_options_hold_for_later_requests_and_png_info_reads_answers_back(ort_pipe_fp32):
    served = serve_in_thread(ort_pipe_fp32)  # a server of its own: options outlive the request
    url = f"http://127.0.0.1:{served.server_address[1]}"
    try:
        name = ort_pipe_fp32.model_dir.root.name
        assert call(
            url, "/sdapi/v1/options", {"sd_model_checkpoint": name, "CLIP_stop_at_last_layers": 2}
        ) == (
            200,
            None,
        )
        assert call(url, "/sdapi/v1/options")[1] == {
            "sd_model_checkpoint": name,
            **OPTION_DEFAULTS,
            "CLIP_stop_at_last_layers": 2,
        }
        status, answer = call(url, "/sdapi/v1/txt2img", {"prompt": "a cat", **SIZE, "seed": 3})
        skipped = ort_pipe_fp32("a cat", "", **SIZE, seed=3, clip_skip=1, **WEBUI)
        np.testing.assert_allclose(pixels(answer["images"][0]), skipped.array[0], atol=0.5 / 255)
        body = {"prompt": "a cat", **SIZE, "seed": 3, "override_settings": {"CLIP_stop_at_last_layers": 1}}
        _, overridden = call(url, "/sdapi/v1/txt2img", body)  # a request's own override wins
        plain = ort_pipe_fp32("a cat", "", **SIZE, seed=3, **WEBUI)
        np.testing.assert_allclose(pixels(overridden["images"][0]), plain.array[0], atol=0.5 / 255)
        for refused, message in [
            ({"sd_vae": "x", "CLIP_stop_at_last_layers": 3}, "options not supported: sd_vae"),
            ({"sd_model_checkpoint": "another"}, f"this server serves {name!r} only"),
            ({"randn_source": "GPU"}, "randn_source"),
        ]:
            status, error = call(url, "/sdapi/v1/options", refused)
            assert status == 422 and message in error["detail"]
        assert call(url, "/sdapi/v1/options")[1]["CLIP_stop_at_last_layers"] == 2  # refused: nothing changed
        status, read = call(url, "/sdapi/v1/png-info", {"image": answer["images"][0]})
        assert status == 200 and read["info"] == json.loads(answer["info"])["infotexts"][0]
        assert (
            read["parameters"]["Seed"],
            read["parameters"]["Clip skip"],
            read["parameters"]["Prompt"],
        ) == (
            "3",
            "2",
            "a cat",
        )
        assert json.loads(read["items"]["sdengine"])["seed"] == 3
        status, error = call(url, "/sdapi/v1/png-info", {"image": "nope"})
        assert status == 422 and "image: not a base64 image" in error["detail"]
    finally:
        served.shutdown()


def test_errors_are_one_json_line_and_the_server_goes_on(server):
    status, answer = call(server, "/sdapi/v1/txt2img", raw=b"{not json")
    assert (status, answer["error"]) == (400, "BadJSON")
    status, answer = call(server, "/sdapi/v1/txt2img", {"prompt": "a cat", **SIZE, "width": 60})
    assert (status, answer["error"]) == (422, "InvalidArgumentError") and "width must be" in answer["detail"]
    status, answer = call(server, "/sdapi/v1/img2img", {"prompt": "a cat", **SIZE, "init_images": ["nope"]})
    assert status == 422 and "init_images: not a base64 image" in answer["detail"]
    assert call(server, "/sdapi/v1/interrogate", {})[0] == 404
    status, samplers = call(server, "/sdapi/v1/samplers")
    assert (
        status == 200
        and {"name": "DPM++ 2M Karras", "aliases": ["dpmpp_2m_karras"], "options": {}} in samplers
    )
    status, schedules = call(server, "/sdapi/v1/schedulers")
    labels = ["Automatic", "Karras", "Exponential", "Beta", "Align Your Steps", "SGM Uniform", "Uniform"]
    more = ["Normal", "Simple", "Polyexponential", "DDIM", "KL Optimal"]
    assert status == 200 and [s["label"] for s in schedules] == [*labels, *more]
    assert call(server, "/sdapi/v1/txt2img", {"prompt": "a cat", **SIZE})[0] == 200  # still serving


def test_cli_serves_until_stopped(onnx_fp32):
    import subprocess
    import sys

    command = [
        sys.executable,
        "-m",
        "sdengine.cli",
        "serve",
        str(onnx_fp32),
        "--device",
        "cpu",
        "--port",
        "0",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [process.stdout.readline() for _ in range(2)]
        assert lines[0].startswith("backend: ort on cpu")
        url = lines[1].split(" on ")[-1].strip()
        assert url.startswith("http://127.0.0.1:")
        status, answer = call(url, "/sdapi/v1/txt2img", {"prompt": "a cat", **SIZE})
        assert status == 200 and len(answer["images"]) == 1
        port = url.rsplit(":", 1)[1]
        busy = subprocess.run([*command[:-1], port], capture_output=True, text=True, timeout=120)
        assert busy.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in busy.stderr
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_progress_and_interrupt(server):
    """A long generation shows its steps on /progress; /interrupt ends it between two steps, and its answer
    holds the image of the latents so far; the next request runs whole."""
    import threading
    import time

    answers = {}
    body = {"prompt": "a cat", **SIZE, "steps": 400, "n_iter": 3}
    worker = threading.Thread(target=lambda: answers.update(long=call(server, "/sdapi/v1/txt2img", body)))
    worker.start()
    deadline = time.monotonic() + 60
    while True:
        status, progress = call(server, "/sdapi/v1/progress")
        assert status == 200 and time.monotonic() < deadline
        state = progress["state"]
        if state["sampling_steps"] == 400 and state["sampling_step"] >= 2:  # this request's run, under way
            break
        time.sleep(0.02)
    assert state["job_count"] == 3 and state["job_no"] == 0
    assert 0 < progress["progress"] < 1 / 3
    assert call(server, "/sdapi/v1/interrupt", {}) == (200, {})
    worker.join(timeout=60)
    status, answer = answers["long"]
    info = json.loads(answer["info"])
    assert status == 200 and info["interrupted"] and len(answer["images"]) == 1  # later batches not run
    status, answer = call(server, "/sdapi/v1/txt2img", {"prompt": "a cat", **SIZE})
    assert status == 200 and not json.loads(answer["info"])["interrupted"]
    assert call(server, "/sdapi/v1/progress")[1]["state"]["sampling_step"] == 3  # the last run's, whole


def test_skip_ends_the_batch_running_and_the_next_one_starts(server):
    import threading
    import time

    answers = {}
    body = {"prompt": "a cat", **SIZE, "steps": 400, "n_iter": 2, "seed": 5}
    worker = threading.Thread(target=lambda: answers.update(long=call(server, "/sdapi/v1/txt2img", body)))
    worker.start()
    deadline = time.monotonic() + 60
    while True:  # this request's first batch, under way
        state = call(server, "/sdapi/v1/progress")[1]["state"]
        if state["sampling_steps"] == 400 and state["sampling_step"] >= 2 and state["job_no"] == 0:
            break
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert call(server, "/sdapi/v1/skip", {}) == (200, {})
    first_batch_steps = state["sampling_step"]
    while (state := call(server, "/sdapi/v1/progress")[1]["state"])["job_no"] != 1:  # the second batch runs
        first_batch_steps = max(first_batch_steps, state["sampling_step"])
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert first_batch_steps < 100  # the first batch ended at the skip, far short of its 400 steps
    assert call(server, "/sdapi/v1/interrupt", {}) == (200, {})
    worker.join(timeout=60)
    status, answer = answers["long"]
    assert status == 200 and json.loads(answer["info"])["all_seeds"] == [5, 6]  # both batches answered


def test_inpainting_lays_the_repainted_box_over_the_original(server, ort_pipe_fp32):
    rng = np.random.default_rng(3)
    original = rng.random((80, 96, 3)).astype(np.float32)
    marked = np.zeros((80, 96), np.float32)
    marked[30:50, 40:60] = 1
    body = {
        "prompt": "a hat",
        **SIZE,
        "seed": 8,
        "init_images": [png(original)],
        "mask": png(marked[..., None].repeat(3, -1)),
    }
    body.update(inpaint_full_res_padding=6, denoising_strength=0.9)
    status, answer = call(server, "/sdapi/v1/img2img", body)
    assert status == 200, answer
    answered = pixels(answer["images"][0])
    assert answered.shape == original.shape  # "Only masked": back in the original, at its size
    settings, _, _, inpainting, _ = generation_settings(body, img2img=True)
    direct = ort_pipe_fp32(
        "a hat", **{k: v for k, v in settings.items() if k not in ("prompt", "negative_prompt")}
    )
    np.testing.assert_allclose(answered, inpainting.placement.paste(direct.array)[0], atol=0.5 / 255)
    kept = np.asarray(inpainting.settings.mask) == 0
    original_levels = np.asarray(Image.open(io.BytesIO(base64.b64decode(png(original)))), np.float32) / 255
    np.testing.assert_allclose(answered[kept], original_levels[kept], atol=0.5 / 255)  # untouched
    assert np.abs(answered[35:45, 45:55] - original_levels[35:45, 45:55]).mean() > 0.05  # repainted
    info = json.loads(answer["info"])
    assert info["infotexts"][0].startswith("a hat\nSteps: 3, Sampler: Euler, ")
    assert (
        ", Denoising strength: 0.9, Mask blur: 4, Masked content: fill, Inpaint area: Only masked, "
        in (info["infotexts"][0])
    )
    assert info["extra_generation_params"]["Inpaint area"] == "Only masked"
    assert info["extra_generation_params"]["Masked content"] == "fill"
    assert "mask" not in answer["parameters"] and "init_images" not in answer["parameters"]
    with Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))) as image:
        recorded = json.loads(image.info["sdengine"])
    assert recorded["inpaint_box"] == list(inpainting.placement.box) and recorded["mask"] == "supplied"


def test_whole_picture_inpainting_answers_at_the_size_asked(server):
    rng = np.random.default_rng(4)
    original = rng.random((80, 96, 3)).astype(np.float32)
    marked = np.zeros((80, 96, 3), np.float32)
    marked[20:60, 20:70] = 1
    body = {"prompt": "a hat", **SIZE, "seed": 9, "init_images": [png(original)], "mask": png(marked)}
    body.update(inpaint_full_res=False, inpainting_fill=1, mask_blur=0)
    status, answer = call(server, "/sdapi/v1/img2img", body)
    assert status == 200 and pixels(answer["images"][0]).shape == (64, 64, 3)
    resized = Image.open(io.BytesIO(base64.b64decode(png(original)))).resize(
        (64, 64), Image.Resampling.LANCZOS
    )
    mask = np.asarray(
        Image.fromarray((marked[..., 0] * 255).astype(np.uint8)).resize((64, 64), Image.Resampling.LANCZOS)
    )
    kept = mask == 0
    np.testing.assert_allclose(
        pixels(answer["images"][0])[kept], np.asarray(resized, np.float32)[kept] / 255, atol=0.5 / 255
    )
    assert json.loads(answer["info"])["extra_generation_params"]["Inpaint area"] == "Whole picture"


@pytest.mark.parametrize(
    ("path", "extra", "message"),
    [
        ("/sdapi/v1/img2img", {"inpainting_fill": 4}, "or 3 (latent nothing), got 4"),
        ("/sdapi/v1/img2img", {"initial_noise_multiplier": 0.5}, "not supported: initial_noise_multiplier"),
        ("/sdapi/v1/img2img", {"two_images": True}, "takes one init image"),
        ("/sdapi/v1/img2img", {"small_mask": True}, "with inpaint_full_res they must be the same size"),
        ("/sdapi/v1/img2img", {"mask": "not an image"}, "mask: not a base64 image"),
        ("/sdapi/v1/txt2img", {}, "inpainting is img2img's"),
    ],
)
def test_inpainting_refusals_name_the_field(server, path, extra, message):
    image, mask = np.full((64, 64, 3), 0.5, np.float32), np.zeros((64, 64, 3), np.float32)
    mask[10:20, 10:20] = 1
    body = {"prompt": "a hat", **SIZE, "init_images": [png(image)], "mask": png(mask)}
    if extra.pop("two_images", False):
        body["init_images"] *= 2
    if extra.pop("small_mask", False):
        body["mask"] = png(mask[:32, :32])
    status, answer = call(server, path, {**body, **extra})
    assert status == 422 and answer["error"] == "InvalidArgumentError", answer
    assert message in answer["detail"]


PAG_SCRIPT = "PerturbedAttentionGuidance Integrated"


@pytest.mark.parametrize(
    ("scripts", "layers", "expected"),
    [
        (None, (), 0.0),
        ({PAG_SCRIPT: {"args": [False, 3.0]}}, (), 0.0),  # off: no layers needed
        ({PAG_SCRIPT: {"args": [True, 3.0]}}, ("mid",), 3.0),
        ({PAG_SCRIPT.lower(): {"args": [True, 2, 0, 0.0, 1]}}, ("mid",), 2.0),  # the later args, neutral
        ({PAG_SCRIPT: {"args": [True, 3.0]}}, (), "the model served perturbs none"),
        ({PAG_SCRIPT: {"args": [True, 3.0]}}, ("mid", "down_blocks.1"), "perturbs mid, down_blocks.1"),
        ({PAG_SCRIPT: {"args": [True, 3.0, 10, 0, 1]}}, ("mid",), "attenuation, start and end"),
        ({PAG_SCRIPT: {"args": [True]}}, ("mid",), "\\[enabled, scale\\]"),
        ({PAG_SCRIPT: {"args": ["yes", 3.0]}}, ("mid",), "\\[enabled, scale\\]"),
        ({PAG_SCRIPT: {"args": [True, "3"]}}, ("mid",), "must be numbers"),
        (
            {PAG_SCRIPT: {"args": [True, 3.0]}, "Kohya HRFix Integrated": {"args": []}},
            ("mid",),
            "not supported",
        ),
    ],
)
def test_forges_pag_script_reads_into_the_pag_scale(scripts, layers, expected):
    body = {} if scripts is None else {"alwayson_scripts": scripts}
    if isinstance(expected, str):
        with pytest.raises(InvalidArgumentError, match=expected):
            generation_settings(body, img2img=False, pag_layers=layers)
        return
    read = generation_settings(body, img2img=False, pag_layers=layers)
    assert read.settings.get("pag_scale", 0.0) == expected
    fields = {"PerturbedAttentionGuidance_enabled": True, "PerturbedAttentionGuidance_scale": expected}
    assert read.script_fields == (fields if expected else {})


def test_forges_pag_over_http_is_the_pipelines_pag(tiny_checkpoint, tmp_path, ort_pipe_fp32, server):
    from export.onnx_export import export_checkpoint
    from sdengine.pipeline import Pipeline

    export_checkpoint(tiny_checkpoint, tmp_path / "pag", pag_layers=["mid"])
    pipe = Pipeline.load(tmp_path / "pag", backend="ort", device="cpu")
    served = serve_in_thread(pipe)
    url = f"http://127.0.0.1:{served.server_address[1]}"
    size = {**SIZE, "width": 128, "height": 128}  # the middle block sees 2x2 tokens (one at 64x64: no change)
    try:
        body = {"prompt": "a cat", **size, "seed": 6, "alwayson_scripts": {PAG_SCRIPT: {"args": [True, 3.0]}}}
        status, answer = call(url, "/sdapi/v1/txt2img", body)
        assert status == 200, answer
        direct = pipe("a cat", "", **size, seed=6, **WEBUI, pag_scale=3.0)
        np.testing.assert_allclose(pixels(answer["images"][0]), direct.array[0], atol=0.5 / 255)
        plain = pipe("a cat", "", **size, seed=6, **WEBUI)
        assert np.abs(direct.latents - plain.latents).max() > 0.1  # PAG does change the run
        info = json.loads(answer["info"])
        assert "PerturbedAttentionGuidance_scale: 3.0" in info["infotexts"][0]
        assert info["extra_generation_params"]["PerturbedAttentionGuidance_enabled"] is True
        with Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))) as image:
            assert json.loads(image.info["sdengine"])["pag_scale"] == 3.0
    finally:
        served.shutdown()
    status, answer = call(server, "/sdapi/v1/txt2img", body)  # a model without PAG's layers
    assert status == 422 and "export it with --pag-layers mid" in answer["detail"]
