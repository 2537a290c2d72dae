"""Inpainting's masked content in latent space (the web UI's ``inpainting_fill`` 2 and 3): the masked part's
latents start from the seed's noise or from zeros before they are noised to the first step."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from test_server import png

from sdengine.errors import InvalidArgumentError, UnsupportedConfigError
from sdengine.images import psnr
from sdengine.server import generation_settings, serve_in_thread
from sdengine.timing import StageTimes

SETTINGS = dict(steps=4, seed=6, height=64, width=64, scheduler="euler")


def _inputs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    image = rng.random((1, 64, 64, 3)).astype(np.float32)
    mask = np.zeros((1, 64, 64), np.float32)
    mask[:, 16:48, 24:56] = 1
    return image, mask


def _start(pipe, content: str, strength: float = 0.7) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """The first latents of an inpainting run, its unit noise and the schedule's (image, noise) scales."""
    image, mask = _inputs()
    request = pipe.request(
        "a hat", image=image, mask=mask, strength=strength, masked_content=content, **SETTINGS
    )
    schedule = request.schedule(pipe.model_dir.scheduler_config)
    latents, _ = pipe.initial_latents(request, schedule, StageTimes())
    return latents, request.initial_latents(pipe.model_dir.arch), schedule.image_noise


def test_the_masked_part_starts_from_noise_or_zeros(ort_pipe_fp32) -> None:
    original, noise, (image_scale, noise_scale) = _start(ort_pipe_fp32, "original")
    inside = np.zeros(original.shape, bool)
    inside[:, :, 2:6, 3:7] = True  # the mask's latents (8-pixel blocks)
    for content, fill in (("latent noise", noise), ("latent nothing", np.zeros_like(noise))):
        latents, _, _ = _start(ort_pipe_fp32, content)
        np.testing.assert_array_equal(latents[~inside], original[~inside])  # outside: the image's, as before
        want = image_scale * fill + noise_scale * noise
        np.testing.assert_allclose(latents[inside], want[inside], rtol=1e-6, atol=1e-6)
        assert not np.allclose(latents[inside], original[inside])


def test_runs_differ_inside_the_mask_and_keep_the_rest(ort_pipe_fp32) -> None:
    image, mask = _inputs()
    runs = {
        content: ort_pipe_fp32(
            "a hat", image=image, mask=mask, strength=0.7, masked_content=content, **SETTINGS
        )
        for content in ("original", "latent noise", "latent nothing")
    }
    assert psnr(runs["latent noise"].array, runs["original"].array) < 40
    assert psnr(runs["latent nothing"].array, runs["latent noise"].array) < 40
    assert runs["latent noise"].request.parameters()["masked_content"] == "latent noise"
    assert "masked_content" not in runs["original"].request.parameters()


def test_at_full_strength_every_run_starts_from_noise(ort_pipe_fp32) -> None:
    original, *_ = _start(ort_pipe_fp32, "original", strength=1.0)
    for content in ("latent noise", "latent nothing"):
        np.testing.assert_array_equal(_start(ort_pipe_fp32, content, strength=1.0)[0], original)


def test_refusals(ort_pipe_fp32, tiny_checkpoint) -> None:
    from sdengine.pipeline import Pipeline

    image, mask = _inputs()
    with pytest.raises(InvalidArgumentError, match="masked_content must be one of original, latent noise"):
        ort_pipe_fp32.request("a hat", image=image, mask=mask, masked_content="fill", **SETTINGS)
    with pytest.raises(InvalidArgumentError, match="is inpainting's: give a mask too"):
        ort_pipe_fp32.request("a hat", image=image, masked_content="latent noise", **SETTINGS)
    torch_pipe = Pipeline.load(tiny_checkpoint, backend="torch")
    with pytest.raises(UnsupportedConfigError, match="runs on the ort and trt backends"):
        torch_pipe("a hat", image=image, mask=mask, strength=0.7, masked_content="latent noise", **SETTINGS)


@pytest.mark.parametrize(("fill", "content"), [(2, "latent noise"), (3, "latent nothing")])
def test_the_web_ui_s_latent_fills(ort_pipe_fp32, fill: int, content: str) -> None:
    """``inpainting_fill`` 2 and 3 are the pipeline's call with that masked content; the infotext names it."""
    import urllib.request

    image, mask = _inputs()
    body = {"prompt": "a hat", "width": 64, "height": 64, "steps": 3, "seed": 8, "denoising_strength": 0.7}
    body |= {"init_images": [png(image[0])], "mask": png(mask[0][..., None].repeat(3, -1))}
    body |= {"inpainting_fill": fill, "inpaint_full_res": False}
    settings, _, _, inpainting, _ = generation_settings(body, img2img=True)
    assert settings["masked_content"] == content
    served = serve_in_thread(ort_pipe_fp32)
    try:
        url = f"http://127.0.0.1:{served.server_address[1]}/sdapi/v1/img2img"
        request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as reply:
            answer = json.loads(reply.read())
    finally:
        served.shutdown()
    direct = ort_pipe_fp32(
        "a hat", **{k: v for k, v in settings.items() if k not in ("prompt", "negative_prompt")}
    )
    with Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))) as got:
        answered = np.asarray(got.convert("RGB"), np.float32) / 255
    np.testing.assert_allclose(answered, inpainting.placement.paste(direct.array)[0], atol=0.5 / 255)
    assert f"Masked content: {content}" in json.loads(answer["info"])["infotexts"][0]
