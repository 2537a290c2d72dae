"""Live previews: the latents' approximate colours and the VAE's previews (``sdengine.latent_preview``), and
the web UI's ``current_image`` on ``/sdapi/v1/progress`` with its options (``sdengine.webui_previews``)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_server import call

from sdengine.cli import main
from sdengine.errors import InvalidArgumentError
from sdengine.latent_preview import SD_LATENT_RGB, SDXL_LATENT_RGB, approximate_images
from sdengine.server import serve_in_thread
from sdengine.webui_previews import LIVE_PREVIEW_OPTIONS, LivePreview, image_grid, live_preview

SIZE = {"width": 64, "height": 64}
WEBUI = {"guidance": 7.0, "scheduler": "euler", "prompt_weights": "a1111", "long_prompts": True}


def decoded(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def test_approximate_colours_are_the_linear_mix() -> None:
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, 3, 5)).astype(np.float32)
    for xl, mix in ((False, SD_LATENT_RGB), (True, SDXL_LATENT_RGB)):
        images = approximate_images(latents, xl)
        assert [image.size for image in images] == [(5, 3), (5, 3)]
        for b, image in enumerate(images):
            r, g, bl = (float(latents[b, :, 1, 2] @ mix[:, k]) for k in range(3))
            want = [min(255, max(0, round((v + 1) * 127.5))) for v in (r, g, bl)]
            assert list(image.getpixel((2, 1))) == want
    assert approximate_images(latents, False)[0].tobytes() != approximate_images(latents, True)[0].tobytes()
    with pytest.raises(InvalidArgumentError, match="4-channel latents"):
        approximate_images(latents[:, :3], False)


def test_live_preview_options() -> None:
    assert live_preview({}, taesd=None) == LivePreview(10, "approx", "png", True)
    assert live_preview(
        {"show_progress_type": "Full", "show_progress_every_n_steps": -1}, None
    ) == LivePreview(-1, "full", "png", True)
    assert live_preview({"show_progress_type": "TAESD"}, taesd="full").method == "full"
    assert live_preview({"show_progress_type": "TAESD"}, taesd="tiny").method == "tiny"
    assert live_preview({"live_previews_enable": False}, None) is None
    assert live_preview({"show_progress_every_n_steps": 0}, None) is None
    assert live_preview({"sd_vae": "ignored here: another function's"}, None) is not None
    for options, message in [
        ({"show_progress_type": "Approx NN"}, 'Approx NN" .* not available here'),
        ({"show_progress_type": "TAESD"}, "export the model with --preview-vae DIR"),
        ({"show_progress_type": "fast"}, "'fast' is not supported; use Approx cheap, Full"),
        ({"live_previews_image_format": "gif"}, "must be one of png, jpeg, webp"),
        ({"show_progress_every_n_steps": -2}, "whole number >= -1"),
        ({"show_progress_every_n_steps": 2.5}, "whole number >= -1"),
        ({"live_previews_enable": "yes"}, "must be true or false"),
    ]:
        with pytest.raises(InvalidArgumentError, match=message):
            live_preview(options, taesd=None)


def test_image_grid_lays_a_batch_out_as_the_web_ui_does() -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    images = [Image.new("RGB", (4, 2), c) for c in colours]
    assert image_grid(images[:1]).size == (4, 2)
    assert image_grid(images[:2]).size == (8, 2)  # one row: round(sqrt(2)) = 1
    grid = image_grid(images)  # two rows of two
    assert grid.size == (8, 4)
    assert [grid.getpixel(xy) for xy in ((0, 0), (4, 0), (0, 2), (4, 2))] == [*colours, (0, 0, 0)]


@pytest.fixture(scope="module")
def server(ort_pipe_fp32):
    served = serve_in_thread(ort_pipe_fp32)
    yield f"http://127.0.0.1:{served.server_address[1]}"
    served.shutdown()


def _looks(pipe, steps: int, every: int, **settings) -> dict[int, np.ndarray]:
    """The latents a run shows its preview after every ``every`` calls, by calls done."""
    seen: dict[int, np.ndarray] = {}
    pipe(
        "a cat",
        "",
        **SIZE,
        steps=steps,
        seed=3,
        **WEBUI,
        **settings,
        preview=lambda n, x: seen.update({n: x.copy()}),
        preview_every=every,
    )
    return seen


@pytest.mark.parametrize(
    ("options", "method"),
    [({}, "approx"), ({"show_progress_type": "Full", "show_progress_every_n_steps": 2}, "full")],
    ids=["approx-cheap", "full"],
)
def test_progress_shows_the_last_preview(server, ort_pipe_fp32, options: dict, method: str) -> None:
    """After a run, /progress still holds its last preview: the images of the latents after the last look
    before the end (call 10 of 12 by default, 4 of 6 every 2 steps), drawn by the asked method."""
    steps = 12 if not options else 6
    body = {
        "prompt": "a cat",
        **SIZE,
        "steps": steps,
        "seed": 3,
        "batch_size": 2,
        "override_settings": options,
    }
    status, _ = call(server, "/sdapi/v1/txt2img", body)
    assert status == 200
    status, progress = call(server, "/sdapi/v1/progress")
    looks = _looks(ort_pipe_fp32, steps, options.get("show_progress_every_n_steps", 10), batch=2)
    assert sorted(looks) == ([10] if not options else [2, 4])
    want = image_grid(ort_pipe_fp32.preview_images(looks[max(looks)], method))
    got = decoded(progress["current_image"])
    assert got.format == "PNG" and got.size == want.size == (
        (16 if method == "approx" else 128),
        SIZE["height"] // (8 if method == "approx" else 1),
    )
    assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want))
    assert call(server, "/sdapi/v1/progress?skip_current_image=true")[1]["current_image"] is None


def test_previews_after_each_batch_and_other_formats(server, ort_pipe_fp32) -> None:
    """-1: none during the steps, the finished batch's own images after it; jpeg; off: none."""
    body = {"prompt": "a cat", **SIZE, "steps": 3, "seed": 3}
    options = {"show_progress_every_n_steps": -1, "show_progress_type": "Full", "show_progress_grid": False}
    assert call(server, "/sdapi/v1/txt2img", {**body, "override_settings": options})[0] == 200
    image = decoded(call(server, "/sdapi/v1/progress")[1]["current_image"])
    want = ort_pipe_fp32("a cat", "", **SIZE, steps=3, seed=3, **WEBUI).images[0]
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(want))
    options = {"show_progress_every_n_steps": 1, "live_previews_image_format": "jpeg"}
    assert call(server, "/sdapi/v1/txt2img", {**body, "override_settings": options})[0] == 200
    assert decoded(call(server, "/sdapi/v1/progress")[1]["current_image"]).format == "JPEG"
    assert (
        call(server, "/sdapi/v1/txt2img", {**body, "override_settings": {"live_previews_enable": False}})[0]
        == 200
    )
    assert call(server, "/sdapi/v1/progress")[1]["current_image"] is None


def test_preview_options_are_set_and_refused_by_name(ort_pipe_fp32) -> None:
    served = serve_in_thread(ort_pipe_fp32)
    url = f"http://127.0.0.1:{served.server_address[1]}"
    try:
        assert (
            call(url, "/sdapi/v1/options")[1]["show_progress_type"]
            == LIVE_PREVIEW_OPTIONS["show_progress_type"]
        )
        assert call(url, "/sdapi/v1/options", {"show_progress_every_n_steps": 1}) == (200, None)
        status, error = call(url, "/sdapi/v1/options", {"show_progress_type": "Approx NN"})
        assert status == 422 and "Approx NN" in error["detail"]
        options = call(url, "/sdapi/v1/options")[1]
        assert options["show_progress_every_n_steps"] == 1 and options["show_progress_type"] == "Approx cheap"
        status, error = call(
            url,
            "/sdapi/v1/txt2img",
            {"prompt": "a cat", **SIZE, "steps": 2, "override_settings": {"show_progress_type": "TAESD"}},
        )
        assert status == 422 and "tiny VAE" in error["detail"]
    finally:
        served.shutdown()


def test_cli_approximate_previews(onnx_fp32: Path, tmp_path: Path) -> None:
    out = tmp_path / "cat.png"
    args = [
        "generate",
        str(onnx_fp32),
        "a cat",
        "--steps",
        "4",
        "--height",
        "64",
        "--width",
        "64",
        "--scheduler",
        "euler",
    ]
    assert main([*args, "--output", str(out), "--preview-every", "2", "--preview-method", "approx"]) == 0
    with Image.open(tmp_path / "cat-step2.png") as image:
        assert image.size == (8, 8)
    assert not (tmp_path / "cat-step4.png").exists()  # the last is the result
