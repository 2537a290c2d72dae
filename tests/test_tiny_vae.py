"""A tiny VAE (diffusers' ``AutoencoderTiny``, TAESD's architecture) in a checkpoint's place: exported with
``--vae``, its encoder giving the latents themselves, run by the PyTorch baseline with the same VAE."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image, ImageDraw

from export.tiny_vae import write_random_tiny_vae
from export.vae_override import checkpoint_with_vae
from sdengine.cli import main
from sdengine.errors import InvalidArgumentError, UnsupportedConfigError
from sdengine.images import psnr
from sdengine.manifest import Manifest
from sdengine.model_dir import open_onnx_dir
from sdengine.pipeline import Pipeline

SETTINGS = dict(steps=4, seed=4, height=64, width=64)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("cache")
        patch.setenv("SDENGINE_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_tiny_vae(tmp_path_factory.mktemp("vae") / "taesd", seed=3)


@pytest.fixture(scope="module")
def pipes(tiny_checkpoint: Path, tiny_vae: Path, cache: Path, tmp_path_factory: pytest.TempPathFactory):
    """(ONNX Runtime on an export with the tiny VAE, diffusers with the same VAE)."""
    from export.onnx_export import export_checkpoint

    out = tmp_path_factory.mktemp("onnx") / "taesd"
    manifest = export_checkpoint(tiny_checkpoint, out, vae=tiny_vae)
    assert all(record.verification["passed"] for record in manifest.components.values())
    ours = Pipeline.load(out, backend="ort", device="cpu")
    theirs = Pipeline.load(tiny_checkpoint, backend="torch", vae=tiny_vae)
    return ours, theirs


def _picture(size: int = 64) -> Image.Image:
    rng = np.random.default_rng(5)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _mask(size: int = 64) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 47, 47), fill=255)
    return mask


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"batch": 2},
        {"image": "picture", "strength": 0.6},
        {"image": "picture", "strength": 0.6, "batch": 2},
        {"image": "picture", "mask": "mask"},
    ],
    ids=["text", "text-batch2", "image", "image-batch2", "inpaint"],
)
def test_the_tiny_vae_draws_the_baseline_s_image(pipes, settings: dict) -> None:
    """Text to image decodes, image to image and inpainting encode through the tiny VAE, as diffusers'
    pipelines run it: its encoder's latents taken as they are, with no noise drawn for them (a draw would
    shift the whole run's noise and fail the comparison)."""
    given = {**settings}
    if "image" in given:
        given["image"] = _picture()
    if "mask" in given:
        given["mask"] = _mask()
    ours, theirs = (pipe("a red boat", "fog", **SETTINGS, **given) for pipe in pipes)
    assert psnr(ours.array, theirs.array) >= 100
    assert ours.array.std() > 0.05  # a picture, not a flat grey


def test_the_export_holds_the_tiny_vae(pipes, tiny_checkpoint: Path, ort_pipe_fp32) -> None:
    ours, _ = pipes
    model_dir = open_onnx_dir(ours.model_dir.root)
    assert model_dir.arch.tiny_vae and model_dir.vae_scaling_factor == 1.0
    encoder = onnx.load(str(model_dir.onnx_path("vae_encoder")), load_external_data=False).graph
    assert [o.name for o in encoder.output] == ["latent_sample"]
    assert (
        encoder.output[0].type.tensor_type.shape.dim[1].dim_value == 4
    )  # latents, not mean and log-variance
    own = ort_pipe_fp32("a red boat", "fog", **SETTINGS)
    tiny = ours("a red boat", "fog", **SETTINGS)
    assert psnr(own.array, tiny.array) < 30  # another decoder
    composed = Path(Manifest.read(ours.model_dir.root).source_checkpoint)
    assert json.loads((composed / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderTiny"]
    assert json.loads((tiny_checkpoint / "model_index.json").read_text())["vae"][1] == "AutoencoderKL"


def test_fp16_export_keeps_the_tiny_vae_in_float16(
    tiny_checkpoint: Path, tiny_vae: Path, cache, tmp_path
) -> None:
    """Its config says it needs no upcast, so an fp16 export runs it in float16."""
    from export.onnx_export import export_checkpoint

    export_checkpoint(
        tiny_checkpoint, tmp_path / "onnx", precision="fp16", components=["vae_decoder"], vae=tiny_vae
    )
    graph = onnx.load(str(tmp_path / "onnx" / "vae_decoder" / "model.onnx")).graph
    assert {t.data_type for t in graph.initializer if len(t.dims) > 1} == {onnx.TensorProto.FLOAT16}


def test_vae_tiling_is_refused(pipes, tiny_checkpoint: Path, tiny_vae: Path) -> None:
    ours, _ = pipes
    with pytest.raises(UnsupportedConfigError, match="VAE tiling is for the usual VAE"):
        Pipeline.load(ours.model_dir.root, backend="ort", device="cpu", vae_tiling=True)
    with pytest.raises(UnsupportedConfigError, match="VAE tiling is for the usual VAE"):
        Pipeline.load(tiny_checkpoint, backend="torch", vae=tiny_vae, vae_tiling=True)


def test_a_vae_of_another_class_is_refused(tiny_checkpoint: Path, tiny_vae: Path, cache, tmp_path) -> None:
    import shutil

    odd = shutil.copytree(tiny_vae, tmp_path / "odd")
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "_class_name": "ConsistencyDecoderVAE"}))
    from sdengine.errors import ModelDirectoryError

    with pytest.raises(ModelDirectoryError, match="holds no diffusers VAE"):
        checkpoint_with_vae(tiny_checkpoint, odd)
    folder = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt", symlinks=True)
    (folder / "vae" / "config.json").write_text(
        json.dumps({**config, "_class_name": "ConsistencyDecoderVAE"})
    )
    with pytest.raises(UnsupportedConfigError, match="a VAE of class ConsistencyDecoderVAE is not supported"):
        Pipeline.load(folder, backend="torch")


def test_cli_make_tiny_vae(tmp_path: Path, capsys) -> None:
    assert main(["make-tiny-vae", str(tmp_path / "vae"), "--seed", "1"]) == 0
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderTiny" and config["latent_channels"] == 4
    assert "tiny VAE" in capsys.readouterr().out
    assert main(["make-tiny-vae", str(tmp_path / "vae")]) == 1  # not an empty directory: nothing lost
    assert (
        capsys.readouterr().err.strip()
        == f"sdengine: error: {tmp_path / 'vae'} exists and is not an empty directory"
    )
    with pytest.raises(InvalidArgumentError, match="latent_channels must be >= 1"):
        write_random_tiny_vae(tmp_path / "other", latent_channels=0)


def test_the_server_previews_through_the_tiny_vae_as_taesd(pipes) -> None:
    """With a tiny VAE served, the web UI's "TAESD" live previews are its decoder's, at full size."""
    import base64
    import io
    import urllib.request

    from sdengine.server import serve_in_thread

    ours, _ = pipes
    served = serve_in_thread(ours)
    url = f"http://127.0.0.1:{served.server_address[1]}/sdapi/v1/"
    try:
        options = {"show_progress_type": "TAESD", "show_progress_every_n_steps": 2}
        body = {"prompt": "a cat", "width": 64, "height": 64, "steps": 4, "override_settings": options}
        request = urllib.request.Request(
            url + "txt2img", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as answer:
            assert answer.status == 200
        with urllib.request.urlopen(url + "progress", timeout=120) as answer:
            image = json.loads(answer.read())["current_image"]
        assert Image.open(io.BytesIO(base64.b64decode(image))).size == (64, 64)
    finally:
        served.shutdown()


@pytest.fixture(scope="module")
def previewed(tiny_checkpoint: Path, tiny_vae: Path, tmp_path_factory: pytest.TempPathFactory):
    """(ONNX Runtime on an export with the tiny VAE as its preview decoder, diffusers with the same)."""
    from export.onnx_export import export_checkpoint

    out = tmp_path_factory.mktemp("onnx") / "previewed"
    manifest = export_checkpoint(tiny_checkpoint, out, preview_vae=tiny_vae)
    assert manifest.components["preview_decoder"].verification["passed"]
    ours = Pipeline.load(out, backend="ort", device="cpu")
    theirs = Pipeline.load(tiny_checkpoint, backend="torch", preview_vae=tiny_vae)
    return ours, theirs


def test_tiny_previews_are_the_tiny_vae_s_images(previewed, pipes, ort_pipe_fp32) -> None:
    """The preview decoder draws what the tiny VAE decodes (diffusers', and an export whose VAE it is), at
    full size; the result is still the model's own VAE's."""
    ours, theirs = previewed
    seen: dict[int, np.ndarray] = {}
    settings = {**SETTINGS, "scheduler": "euler"}
    result = ours("a red boat", "fog", **settings, preview=lambda n, x: seen.update({n: x}), preview_every=2)
    assert sorted(seen) == [2]
    tiny = np.asarray(ours.preview_images(seen[2], "tiny")[0], np.float32) / 255
    assert tiny.shape == (64, 64, 3)
    assert psnr(tiny, np.asarray(theirs.preview_images(seen[2], "tiny")[0], np.float32) / 255) >= 100
    decoded = np.asarray(pipes[0].preview_images(seen[2], "full")[0], np.float32) / 255
    assert psnr(tiny, decoded) >= 100  # the export whose VAE is the tiny one decodes the same
    full = np.asarray(ours.preview_images(seen[2], "full")[0], np.float32) / 255
    assert psnr(tiny, full) < 30  # the model's own VAE is another
    assert np.array_equal(result.array, ort_pipe_fp32("a red boat", "fog", **settings).array)
    assert ours.tiny_previews and not ort_pipe_fp32.tiny_previews


def test_tiny_previews_need_a_preview_decoder(ort_pipe_fp32, onnx_fp32: Path, tmp_path: Path, capsys) -> None:
    latents = np.zeros((1, 4, 8, 8), np.float32)
    with pytest.raises(InvalidArgumentError, match="tiny previews need a preview decoder"):
        ort_pipe_fp32.preview_images(latents, "tiny")
    out = tmp_path / "cat.png"
    args = ["generate", str(onnx_fp32), "a cat", "--steps", "2", "--height", "64", "--width", "64"]
    assert main([*args, "--output", str(out), "--preview-every", "1", "--preview-method", "tiny"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdengine: error: tiny previews need a preview decoder") and "\n" not in err
    assert not out.exists()  # refused before the run


def test_cli_tiny_previews_and_info(previewed, tmp_path: Path, capsys) -> None:
    ours, _ = previewed
    out = tmp_path / "cat.png"
    args = ["generate", str(ours.model_dir.root), "a cat", "--steps", "4", "--height", "64", "--width", "64"]
    args += ["--scheduler", "euler", "--output", str(out), "--preview-every", "2", "--preview-method", "tiny"]
    assert main(args) == 0
    with Image.open(tmp_path / "cat-step2.png") as image:
        assert image.size == (64, 64)
    capsys.readouterr()
    assert main(["info", str(ours.model_dir.root)]) == 0
    assert "previews: full, approx, tiny (its preview decoder)" in capsys.readouterr().out


def test_the_server_s_taesd_previews_use_the_preview_decoder(previewed) -> None:
    """ "TAESD" live previews of an export with a preview decoder are its images, also after each batch."""
    import base64
    import io
    import urllib.request

    from sdengine.server import serve_in_thread, served_taesd

    ours, _ = previewed
    assert served_taesd(ours) == "tiny"
    served = serve_in_thread(ours)
    url = f"http://127.0.0.1:{served.server_address[1]}/sdapi/v1/"
    try:
        options = {"show_progress_type": "TAESD", "show_progress_every_n_steps": -1}
        body = {
            "prompt": "a cat",
            "width": 64,
            "height": 64,
            "steps": 3,
            "seed": 2,
            "override_settings": options,
        }
        request = urllib.request.Request(
            url + "txt2img", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as answer:
            assert answer.status == 200
        with urllib.request.urlopen(url + "progress", timeout=120) as answer:
            image = Image.open(io.BytesIO(base64.b64decode(json.loads(answer.read())["current_image"])))
    finally:
        served.shutdown()
    webui = {"guidance": 7.0, "scheduler": "euler", "prompt_weights": "a1111", "long_prompts": True}
    result = ours("a cat", "", width=64, height=64, steps=3, seed=2, **webui)
    want = ours.preview_images(result.latents, "tiny")[0]
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(want))
    assert not np.array_equal(np.asarray(want), np.asarray(result.images[0]))  # not the VAE's own image


def test_preview_vae_refusals(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    from export.onnx_export import export_checkpoint

    out = tmp_path / "onnx"
    assert (
        main(["export", str(tiny_checkpoint), "--output", str(out), "--preview-vae", str(tiny_checkpoint)])
        == 1
    )
    err = capsys.readouterr().err.strip()
    assert "a preview VAE is a tiny one, a diffusers AutoencoderTiny folder" in err and "\n" not in err
    assert not out.exists()
    with pytest.raises(
        InvalidArgumentError, match="preview_decoder is a tiny VAE's: export with --preview-vae"
    ):
        export_checkpoint(tiny_checkpoint, out, components=["preview_decoder"])


def test_sdxl_with_a_tiny_vae(tiny_vae: Path, cache, tmp_path: Path) -> None:
    """TAESDXL's place: an SDXL checkpoint with a tiny VAE, text and image to image, as diffusers' SDXL
    pipelines run it."""
    from export.checkpoint import write_random_checkpoint
    from export.onnx_export import export_checkpoint

    xl = write_random_checkpoint(tmp_path / "xl", "tiny-xl", seed=0)
    export_checkpoint(xl, tmp_path / "onnx", vae=tiny_vae)
    ours = Pipeline.load(tmp_path / "onnx", backend="ort", device="cpu")
    theirs = Pipeline.load(xl, backend="torch", vae=tiny_vae)
    for given in ({}, {"image": _picture(), "strength": 0.6}):
        mine, diffusers = (pipe("a red boat", "fog", **SETTINGS, **given) for pipe in (ours, theirs))
        assert psnr(mine.array, diffusers.array) >= 100


def test_decoder_tiny_makes_the_images_through_the_preview_decoder(previewed, pipes, ort_pipe_fp32) -> None:
    """``decoder="tiny"``: the images (and the hires fix's first-pass image) from the tiny VAE's decoder, as
    diffusers' AutoencoderTiny decodes them; the run's latents are the same."""
    ours, theirs = previewed
    settings = {**SETTINGS, "scheduler": "euler"}
    fast = ours("a red boat", "fog", **settings, decoder="tiny")
    plain = ours("a red boat", "fog", **settings)
    assert np.array_equal(fast.latents, plain.latents)
    assert np.array_equal(fast.array, ours.tiny_preview_images(fast.latents))
    assert psnr(fast.array, plain.array) < 30  # not the model's VAE
    assert psnr(fast.array, theirs("a red boat", "fog", **settings, decoder="tiny").array) >= 100
    assert fast.request.parameters()["decoder"] == "tiny"
    hires = {**settings, "hires_scale": 1.5, "hires_upscale": "image", "hires_steps": 2}
    mine, diffusers = (pipe("a red boat", "fog", **hires, decoder="tiny") for pipe in (ours, theirs))
    assert psnr(mine.array, diffusers.array) >= 100
    assert psnr(mine.array, ours("a red boat", "fog", **hires).array) < 30
    tiny_vae = pipes[0]  # an export whose VAE is the tiny one: its VAE is the tiny decoder
    np.testing.assert_array_equal(
        tiny_vae("a cat", **settings, decoder="tiny").array, tiny_vae("a cat", **settings).array
    )
    with pytest.raises(InvalidArgumentError, match="decoder tiny needs a tiny VAE's decoder"):
        ort_pipe_fp32.request("a cat", **settings, decoder="tiny")
    with pytest.raises(InvalidArgumentError, match="decoder must be one of vae, tiny"):
        ours.request("a cat", **settings, decoder="taesd")


def test_the_web_ui_s_taesd_decode_method(previewed, ort_pipe_fp32, tmp_path: Path, capsys) -> None:
    """``sd_vae_decode_method`` TAESD decodes through the preview decoder; refused where there is none."""
    import base64
    import io

    from test_server import call

    from sdengine.server import serve_in_thread

    ours, _ = previewed
    body = {"prompt": "a cat", "width": 64, "height": 64, "steps": 3, "seed": 2}
    served, plain = serve_in_thread(ours), serve_in_thread(ort_pipe_fp32)
    try:
        url = f"http://127.0.0.1:{served.server_address[1]}"
        status, answer = call(
            url, "/sdapi/v1/txt2img", {**body, "override_settings": {"sd_vae_decode_method": "TAESD"}}
        )
        assert status == 200
        plain_url = f"http://127.0.0.1:{plain.server_address[1]}"
        status, error = call(plain_url, "/sdapi/v1/options", {"sd_vae_decode_method": "TAESD"})
        assert status == 422 and "has no tiny VAE's decoder" in error["detail"]
        assert call(plain_url, "/sdapi/v1/options")[1]["sd_vae_decode_method"] == "Full"
        status, error = call(
            url, "/sdapi/v1/txt2img", {**body, "override_settings": {"sd_vae_decode_method": "x"}}
        )
        assert status == 422 and "must be Full or TAESD" in error["detail"]
    finally:
        served.shutdown()
        plain.shutdown()
    webui = {"guidance": 7.0, "scheduler": "euler", "prompt_weights": "a1111", "long_prompts": True}
    want = ours("a cat", "", width=64, height=64, steps=3, seed=2, decoder="tiny", **webui)
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))).convert("RGB"), np.float32)
    np.testing.assert_allclose(got / 255, want.array[0], atol=0.5 / 255)
    out = tmp_path / "cat.png"
    args = ["generate", str(ours.model_dir.root), "a cat", "--steps", "2", "--height", "64", "--width", "64"]
    assert main([*args, "--decoder", "tiny", "--seed", "2", "--output", str(out)]) == 0
    assert out.is_file()
