"""FreeU (sdengine/freeu.py, export/freeu.py): its scales traced into the UNet as an input, against diffusers'
``enable_freeu`` with the same draws."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fake_tensorrt import engine_pipeline
from test_img2img import picture
from test_pag import mask

from sdengine.errors import InvalidArgumentError, ModelDirectoryError
from sdengine.freeu import check_freeu, freeu_input, parse_freeu
from sdengine.images import psnr
from sdengine.pipeline import Pipeline

PROMPT, NEGATIVE = "a lantern on a table", "blurry"
SETTINGS = dict(steps=6, seed=4, height=64, width=64)
SD15 = (0.9, 0.2, 1.5, 1.6)  # diffusers' example for SD 1.5


@pytest.fixture(scope="module")
def onnx_freeu(tiny_checkpoint, tmp_path_factory):
    from export.onnx_export import export_checkpoint

    out = tmp_path_factory.mktemp("onnx") / "freeu"
    export_checkpoint(tiny_checkpoint, out, freeu=True)
    return out


@pytest.fixture(scope="module")
def freeu_pipe(onnx_freeu):
    return Pipeline.load(onnx_freeu, backend="ort", device="cpu")


@pytest.fixture(scope="module")
def torch_pipe(tiny_checkpoint):
    return Pipeline.load(tiny_checkpoint, backend="torch")


@pytest.mark.parametrize(
    ("height", "width"), [(1, 1), (1, 6), (2, 3), (5, 2), (8, 8), (9, 13), (16, 12), (64, 64), (7, 96)]
)
@pytest.mark.parametrize("scale", [0.2, 0.9, 1.0, 1.6])
def test_the_filter_is_diffusers_fourier_filter(height, width, scale):
    """Matrix products give the FFT's result at every size: sides of 1 and 2 (where frequency -1 is 0's or
    1's), odd sides, sides that are not powers of 2."""
    from diffusers.utils.torch_utils import fourier_filter as theirs

    from export.freeu import fourier_filter

    x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(height * 100 + width))
    torch.testing.assert_close(fourier_filter(x, torch.tensor(scale)), theirs(x, 1, scale), atol=2e-6, rtol=0)
    half = x.half()  # diffusers computes in float32 and gives float16 back; so does this
    assert fourier_filter(half, torch.tensor(scale)).dtype == torch.float16
    torch.testing.assert_close(fourier_filter(half, torch.tensor(scale)), theirs(half, 1, scale))


@pytest.mark.parametrize("channels", [5, 8])
def test_the_backbone_scale_is_diffusers_on_the_first_half(channels):
    from export.freeu import scale_first_half

    x = torch.randn(2, channels, 3, 4)
    expected = x.clone()
    expected[:, : channels // 2] *= 1.4
    torch.testing.assert_close(scale_first_half(x, torch.tensor(1.4)), expected, atol=0, rtol=0)


@pytest.mark.parametrize(
    "settings",
    [
        dict(scheduler="euler"),
        dict(scheduler="ddim", freeu=(1.3, 0.7, 0.8, 1.2)),
        dict(scheduler="euler_a", batch=2, height=64, width=96),  # a batch; sides not powers of 2
        dict(scheduler="dpmpp_2m", guidance=1.0, height=40, width=56),  # no guidance; odd deep sides
        dict(scheduler="pndm", image=picture(64, 64), strength=0.6),
        dict(scheduler="euler", image=picture(64, 64), mask=mask()),
        dict(scheduler="euler", hires_scale=2.0),
    ],
    ids=["euler", "ddim-other-scales", "euler_a-batch", "no-cfg", "img2img", "inpaint", "hires"],
)
def test_freeu_matches_diffusers_enable_freeu(freeu_pipe, torch_pipe, settings):
    settings = {**SETTINGS, "freeu": SD15, **settings}
    ours, ref = freeu_pipe(PROMPT, NEGATIVE, **settings), torch_pipe(PROMPT, NEGATIVE, **settings)
    assert psnr(ours.array, ref.array) >= 100
    plain = freeu_pipe(PROMPT, NEGATIVE, **{**settings, "freeu": None})
    assert psnr(ours.array, plain.array) < 60  # FreeU does change the images
    assert ours.request.parameters()["freeu"] == list(settings["freeu"])


def test_without_scales_it_is_the_plain_export_exactly(freeu_pipe, ort_pipe_fp32):
    ours = freeu_pipe(PROMPT, NEGATIVE, scheduler="euler", **SETTINGS)
    plain = ort_pipe_fp32(PROMPT, NEGATIVE, scheduler="euler", **SETTINGS)
    np.testing.assert_array_equal(ours.latents, plain.latents)
    off = freeu_pipe(PROMPT, NEGATIVE, scheduler="euler", freeu=(1, 1, 1, 1), **SETTINGS)
    np.testing.assert_array_equal(off.latents, plain.latents)
    assert "freeu" not in ours.request.parameters()


def test_scales_are_checked():
    assert check_freeu(None) is None
    assert check_freeu([0.9, 0.2, 1, 2]) == (0.9, 0.2, 1.0, 2.0)
    assert check_freeu({"b2": 1.6, "b1": 1.5, "s2": 0.2, "s1": 0.9}) == SD15
    assert parse_freeu(" 0.9, 0.2,1.5,1.6") == SD15
    assert freeu_input(None).tolist() == [1, 1, 1, 1] and freeu_input(SD15).dtype == np.float32
    for bad in ((1, 2, 3), (1, 2, 3, float("nan")), (1, 2, 3, True), (1, 2, 3, "4"), "1234", {"s1": 1}):
        with pytest.raises(InvalidArgumentError, match="freeu"):
            check_freeu(bad)
    for bad in ("0.9,0.2,1.5", "0.9,0.2,1.5,x", "", "0.9,0.2,1.5,inf"):
        with pytest.raises(InvalidArgumentError, match="freeu"):
            parse_freeu(bad)


def test_refusals_are_one_line(freeu_pipe, ort_pipe_fp32, torch_pipe, tiny_checkpoint, tmp_path):
    from export.onnx_export import export_checkpoint

    with pytest.raises(InvalidArgumentError, match="export --freeu"):
        ort_pipe_fp32(PROMPT, freeu=SD15, **SETTINGS)
    with pytest.raises(InvalidArgumentError, match="four scales"):
        freeu_pipe(PROMPT, freeu=(1, 2), **SETTINGS)
    with pytest.raises(InvalidArgumentError, match="unet component"):
        export_checkpoint(tiny_checkpoint, tmp_path / "vae", freeu=True, components=["vae_decoder"])
    assert not (tmp_path / "vae").exists()


def test_the_export_records_it_and_a_plain_export_over_it_removes_the_record(
    onnx_freeu, tiny_checkpoint, tmp_path
):
    import shutil

    from export.onnx_export import export_checkpoint
    from sdengine.info import describe
    from sdengine.model_dir import open_onnx_dir

    record = json.loads((onnx_freeu / "freeu" / "config.json").read_text())
    assert record == {"scales": ["s1", "s2", "b1", "b2"]} and open_onnx_dir(onnx_freeu).arch.freeu
    assert describe(onnx_freeu)["freeu"] == "takes FreeU's scales (--freeu)"
    copy = tmp_path / "copy"
    shutil.copytree(onnx_freeu, copy)
    (copy / "freeu" / "config.json").write_text('{"scales": ["b1"]}')
    with pytest.raises(ModelDirectoryError, match="freeu/config.json is unreadable"):
        open_onnx_dir(copy)
    export_checkpoint(tiny_checkpoint, copy, components=["unet"])
    assert not (copy / "freeu" / "config.json").exists() and not open_onnx_dir(copy).arch.freeu


def test_the_bound_loop_applies_it_as_the_host_loop(freeu_pipe):
    from sdengine.backends.ort_cuda import OrtCudaBackend

    model_dir = freeu_pipe.model_dir
    bound = Pipeline(model_dir, OrtCudaBackend(model_dir, device="cpu"), freeu_pipe.tokenizer)
    for freeu in (SD15, None):
        settings = {**SETTINGS, "scheduler": "euler", "freeu": freeu}
        np.testing.assert_allclose(
            bound(PROMPT, NEGATIVE, **settings).latents,
            freeu_pipe(PROMPT, NEGATIVE, **settings).latents,
            atol=1e-4,
        )


def test_the_tensorrt_path_takes_the_scales_in_its_captured_steps(
    simulated,
    onnx_freeu,
    freeu_pipe,
    tmp_path,
):
    """On the simulated TensorRT and CUDA runtime (tests/fake_tensorrt.py): the scales are a constant
    input of the captured steps, so one set of graphs runs with FreeU and without."""

    engines = tmp_path / "engines"
    pipe = engine_pipeline(onnx_freeu, engines, freeu_pipe.tokenizer, height=64, width=64)
    backend = pipe.backend
    for freeu in (SD15, None, (1.3, 0.7, 0.8, 1.2)):
        settings = {**SETTINGS, "scheduler": "euler", "freeu": freeu}
        ours, ref = pipe(PROMPT, NEGATIVE, **settings), freeu_pipe(PROMPT, NEGATIVE, **settings)
        scale = float(np.abs(ref.latents).max())
        np.testing.assert_allclose(ours.latents, ref.latents, rtol=0, atol=1e-5 * scale)
    assert len(backend._graphs) == 1 and backend.graphs_refused is None


def test_generate_and_export_take_freeu_on_the_command_line(tiny_checkpoint, onnx_freeu, tmp_path, capsys):
    from PIL import Image

    from sdengine.cli import main

    out = tmp_path / "freeu.png"
    args = ["generate", str(onnx_freeu), PROMPT, "--steps", "2", "--height", "64", "--width", "64"]
    args += ["--seed", "1", "--device", "cpu", "--freeu", "0.9,0.2,1.5,1.6"]
    assert main([*args, "--output", str(out)]) == 0
    assert json.loads(Image.open(out).info["sdengine"])["freeu"] == list(SD15)
    capsys.readouterr()
    missing = ["generate", str(tmp_path / "no-such-model"), PROMPT, "--freeu", "0.9,0.2"]
    assert main(missing) != 0  # the scales are read before anything loads
    err = capsys.readouterr().err.strip()
    assert "--freeu takes four numbers" in err and len(err.splitlines()) == 1
    exported = tmp_path / "onnx"
    export = ["export", str(tiny_checkpoint), "--output", str(exported), "--components", "unet"]
    assert main([*export, "--freeu"]) == 0
    assert json.loads((exported / "freeu" / "config.json").read_text())["scales"] == ["s1", "s2", "b1", "b2"]


@pytest.mark.parametrize("kind", ["sdxl", "controlnet"])
def test_with_sdxl_or_a_controlnet_it_matches_diffusers(tiny_checkpoint, tmp_path, kind):
    """SDXL's deepest up blocks are cross-attention ones (diffusers applies FreeU there too); a ControlNet's
    residuals are in the skip connections that FreeU filters."""
    from export.checkpoint import write_random_checkpoint
    from export.onnx_export import export_checkpoint

    checkpoint, extra, inputs = tiny_checkpoint, {}, {}
    if kind == "sdxl":
        checkpoint = write_random_checkpoint(tmp_path / "tiny-xl", "tiny-xl", seed=0)
    else:
        from export.controlnet import write_random_controlnet

        extra = {"controlnets": [write_random_controlnet(tiny_checkpoint, tmp_path / "cn", seed=0)]}
        control = np.random.default_rng(5).random((64, 64, 3)).astype(np.float32)
        inputs = {"control_image": control, "control_scale": 0.8}
    export_checkpoint(checkpoint, tmp_path / "onnx", freeu=True, **extra)
    ours = Pipeline.load(tmp_path / "onnx", backend="ort", device="cpu")
    theirs = Pipeline.load(checkpoint, backend="torch", **extra)
    settings = {**SETTINGS, "scheduler": "euler", "freeu": SD15, **inputs}
    a, b = ours(PROMPT, NEGATIVE, **settings), theirs(PROMPT, NEGATIVE, **settings)
    assert psnr(a.array, b.array) >= 100
    assert psnr(a.array, ours(PROMPT, NEGATIVE, **{**settings, "freeu": None}).array) < 60


@pytest.mark.parametrize("branch", [0, 7, 9])
def test_with_deepcache_it_matches_diffusers_with_the_authors_helper(tiny_checkpoint, tmp_path, branch):
    """The helper caches inside diffusers' up block, so FreeU's scales apply to the cached feature on every
    call. Branch 0 cuts the tiny UNet's last up block, where FreeU is not (its shallow calls run the
    feature as they are); branch 7 cuts up block 1 (FreeU's second stage), branch 9 up block 0 (its first)."""
    from export.onnx_export import export_checkpoint

    export_checkpoint(tiny_checkpoint, tmp_path / "onnx", freeu=True, deepcache=branch)
    ours = Pipeline.load(tmp_path / "onnx", backend="ort", device="cpu")
    theirs = Pipeline.load(tiny_checkpoint, backend="torch", deepcache=branch)
    settings = {**SETTINGS, "steps": 8, "scheduler": "euler", "freeu": SD15, "deepcache_interval": 3}
    a, b = ours(PROMPT, NEGATIVE, **settings), theirs(PROMPT, NEGATIVE, **settings)
    assert psnr(a.array, b.array) >= 100
    assert psnr(a.array, ours(PROMPT, NEGATIVE, **{**settings, "freeu": None}).array) < 60
    assert psnr(a.array, ours(PROMPT, NEGATIVE, **{**settings, "deepcache_interval": 1}).array) < 70


def test_bench_runs_the_baseline_with_the_same_scales(onnx_freeu, ort_pipe_fp32, tmp_path, capsys):
    from test_bench import tiny_run

    from sdengine.cli import main

    out = tmp_path / "r.json"
    run = [*tiny_run(onnx_freeu, runs=1, warmup=0), "--freeu", "0.9,0.2,1.5,1.6"]
    assert main([*run, "--json", str(out)]) == 0
    assert "FreeU: s1 0.9, s2 0.2, b1 1.5, b2 1.6, on both backends" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["config"]["freeu"] == list(SD15) and report["backends"]["ort"]["psnr_vs_torch_db"] >= 100
    assert main(["bench", str(ort_pipe_fp32.model_dir.root), "--freeu", "0.9,0.2,1.5,1.6"]) == 1
    assert "sdengine export --freeu" in capsys.readouterr().err
    assert main(["bench", "tiny", "--freeu", "0.9,0.2,1.5,1.6"]) == 1
    assert "the presets have none" in capsys.readouterr().err
