"""DeepCache (sdengine/deepcache.py, export/deepcache.py): the UNet cut in two at a branch, against the
authors' own ``DeepCacheSDHelper`` on diffusers' pipelines, with the same draws."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from fake_tensorrt import ENV, write_plan
from test_img2img import picture
from test_pag import mask

from sdengine.deepcache import CacheBranch, check_interval, whole_calls
from sdengine.errors import InvalidArgumentError, UnsupportedConfigError
from sdengine.images import psnr
from sdengine.pipeline import Pipeline

PROMPT, NEGATIVE = "a lantern on a table", "blurry"
SETTINGS = dict(steps=8, seed=4, height=64, width=64)


def nodes(root, component: str) -> int:
    """How many nodes an exported model's graph has."""
    return len(onnx.load(str(root / component / "model.onnx"), load_external_data=False).graph.node)


@pytest.fixture(scope="module")
def onnx_deepcache(tiny_checkpoint, tmp_path_factory):
    from export.onnx_export import export_checkpoint

    out = tmp_path_factory.mktemp("onnx") / "deepcache"
    export_checkpoint(tiny_checkpoint, out, deepcache=0)
    return out


@pytest.fixture(scope="module")
def deepcache_pipe(onnx_deepcache):
    return Pipeline.load(onnx_deepcache, backend="ort", device="cpu")


@pytest.fixture(scope="module")
def torch_pipe(tiny_checkpoint):
    return Pipeline.load(tiny_checkpoint, backend="torch", deepcache=0)


@pytest.mark.parametrize(
    "settings",
    [
        dict(scheduler="euler", deepcache_interval=3),
        dict(scheduler="ddim", deepcache_interval=2),
        dict(scheduler="heun", deepcache_interval=3),  # two calls a step, at one timestep
        dict(scheduler="euler_a", deepcache_interval=3, batch=2),  # stochastic, a batch
        dict(scheduler="dpmpp_2m", deepcache_interval=4, guidance=1.0),  # no classifier-free guidance
        dict(scheduler="pndm", deepcache_interval=2, image=picture(64, 64), strength=0.6),
        dict(scheduler="euler", deepcache_interval=3, image=picture(64, 64), mask=mask()),
        dict(scheduler="euler", deepcache_interval=3, hires_scale=2.0),  # each pass fills its own cache
        # runs that start at the second of two calls at one timestep, whose position the helper counts
        # from the first, left out
        dict(scheduler="heun", deepcache_interval=3, image=picture(64, 64), strength=0.7),
        dict(scheduler="pndm", deepcache_interval=2, image=picture(64, 64), strength=0.8),
        dict(scheduler="heun", deepcache_interval=2, hires_scale=1.5),
    ],
    ids=[
        "euler",
        "ddim",
        "heun",
        "euler_a-batch",
        "no-cfg",
        "img2img",
        "inpaint",
        "hires",
        "heun-img2img",
        "pndm-img2img",
        "heun-hires",
    ],
)
def test_deepcache_matches_the_authors_helper(deepcache_pipe, torch_pipe, settings):
    settings = {**SETTINGS, **settings}
    ours, ref = deepcache_pipe(PROMPT, NEGATIVE, **settings), torch_pipe(PROMPT, NEGATIVE, **settings)
    assert psnr(ours.array, ref.array) >= 100
    plain = deepcache_pipe(PROMPT, NEGATIVE, **{**settings, "deepcache_interval": 1})
    assert psnr(ours.array, plain.array) < 70  # the shallow calls do change the images
    assert ours.request.parameters()["deepcache_interval"] == settings["deepcache_interval"]


def test_interval_one_is_the_plain_export(deepcache_pipe, ort_pipe_fp32):
    ours = deepcache_pipe(PROMPT, NEGATIVE, scheduler="euler", **SETTINGS)
    plain = ort_pipe_fp32(PROMPT, NEGATIVE, scheduler="euler", **SETTINGS)
    assert psnr(ours.array, plain.array) >= 100
    assert "deepcache_interval" not in ours.request.parameters()


def test_a_deeper_branch_matches_the_helper_and_runs_more_of_the_unet(tiny_checkpoint, tmp_path):
    from export.onnx_export import export_checkpoint

    out = tmp_path / "branch5"
    export_checkpoint(tiny_checkpoint, out, deepcache=5, components=["text_encoder", "unet", "vae_decoder"])
    assert json.loads((out / "deepcache" / "config.json").read_text()) == {
        "branch": 5,
        "channels": 32,  # the second up block's, at half the latents' size
        "downscale": 2,
    }
    settings = dict(SETTINGS, scheduler="euler", deepcache_interval=3)
    ours = Pipeline.load(out, backend="ort", device="cpu")(PROMPT, NEGATIVE, **settings)
    ref = Pipeline.load(tiny_checkpoint, backend="torch", deepcache=5)(PROMPT, NEGATIVE, **settings)
    assert psnr(ours.array, ref.array) >= 100
    assert nodes(out, "unet_shallow") < 0.7 * nodes(out, "unet")  # branch 0 keeps a fifteenth of it: below


def test_the_whole_unet_is_the_plain_one_and_the_shallow_one_skips_the_deep_layers(onnx_deepcache, onnx_fp32):
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    inputs = {
        "sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
        "timestep": np.array(500.0, np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32),
    }
    session = lambda root, name: ort.InferenceSession(str(root / name / "model.onnx"))  # noqa: E731
    plain = session(onnx_fp32, "unet").run(None, inputs)[0]
    whole, feature = session(onnx_deepcache, "unet").run(None, inputs)
    np.testing.assert_allclose(whole, plain, rtol=0, atol=1e-5 * float(np.abs(plain).max()))
    assert feature.shape == (2, 16, 8, 8)
    shallow = session(onnx_deepcache, "unet_shallow")
    same = shallow.run(None, {**inputs, "deepcache_feature": feature})[0]
    np.testing.assert_allclose(same, plain, rtol=0, atol=1e-5 * float(np.abs(plain).max()))  # same step
    other = shallow.run(None, {**inputs, "deepcache_feature": feature * 0.5})[0]
    assert np.abs(other - plain).max() > 1e-3  # it reads the feature
    assert nodes(onnx_deepcache, "unet_shallow") < nodes(onnx_deepcache, "unet") / 5


def test_whole_calls_follow_the_helpers_rule():
    assert whole_calls(np.array([999.0, 800, 600, 400, 200, 0]), 3) == (
        True,
        False,
        False,
        True,
        False,
        False,
    )
    # Heun: both calls of a step at one timestep share its first call's position, as the helper finds it
    heun = np.array([999.0, 800, 800, 600, 600, 400, 400])
    assert whole_calls(heun, 3) == (True, False, False, True, True, False, False)
    assert whole_calls(heun, 1) == (True,) * 7
    # image to image from the second call at 800: the helper counts from the first (left out), so the next
    # step's calls are two positions on, not one
    assert whole_calls(heun[2:], 2, lead=(999.0, 800.0)) == (True,) * 5
    assert whole_calls(heun[2:], 2) == (True, False, False, False, False)  # counted from the run's start
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(InvalidArgumentError, match="deepcache_interval must be a whole number >= 1"):
            check_interval(bad)
    assert CacheBranch(7).block == 2 and CacheBranch(7).layer == 1
    with pytest.raises(InvalidArgumentError, match="a DeepCache branch is a whole number >= 0"):
        CacheBranch(-1)


def test_bad_deepcache_requests_are_refused(ort_pipe_fp32, deepcache_pipe, tiny_checkpoint, tmp_path):
    from export.onnx_export import export_checkpoint

    with pytest.raises(InvalidArgumentError, match="export the model with it .sdengine export --deepcache 0"):
        ort_pipe_fp32(PROMPT, deepcache_interval=3, **SETTINGS)
    with pytest.raises(InvalidArgumentError, match="deepcache_interval must be a whole number >= 1"):
        deepcache_pipe(PROMPT, deepcache_interval=0, **SETTINGS)
    with pytest.raises(
        InvalidArgumentError, match="branch 12 is not in this UNet; choose one of 0, 1, 2, 3,"
    ):
        export_checkpoint(tiny_checkpoint, tmp_path / "x", deepcache=12)
    with pytest.raises(InvalidArgumentError, match="unet_shallow is DeepCache's"):
        export_checkpoint(tiny_checkpoint, tmp_path / "x", components=["unet_shallow"])
    with pytest.raises(InvalidArgumentError, match="export the unet component too"):
        export_checkpoint(tiny_checkpoint, tmp_path / "x", deepcache=0, components=["vae_decoder"])
    with pytest.raises(InvalidArgumentError, match="only the torch backend takes it at load"):
        Pipeline.load(deepcache_pipe.model_dir.root, backend="ort", deepcache=0)
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_the_branch_that_caches_the_middle_block_is_refused_with_controlnets(tiny_checkpoint, tmp_path):
    from export.controlnet import write_random_controlnet
    from export.onnx_export import export_checkpoint

    controlnet = write_random_controlnet(tiny_checkpoint, tmp_path / "controlnet")
    with pytest.raises(UnsupportedConfigError, match="branch 11 caches the middle block's output"):
        export_checkpoint(tiny_checkpoint, tmp_path / "x", deepcache=11, controlnets=[controlnet])
    with pytest.raises(UnsupportedConfigError, match="branch 11 caches the middle block's output"):
        Pipeline.load(tiny_checkpoint, backend="torch", deepcache=11, controlnets=[controlnet])
    assert not (tmp_path / "x").exists()


def test_run_time_lora_reaches_the_shallow_unet(deepcache_pipe, onnx_deepcache, tiny_checkpoint, tmp_path):
    """A LoRA fused at run time updates both UNets: the images are those of an export with it fused."""
    from export.onnx_export import export_checkpoint
    from export.random_lora import write_random_lora

    lora = write_random_lora(onnx_deepcache, tmp_path / "lora.safetensors", strength=0.3)
    fused = tmp_path / "fused"
    export_checkpoint(tiny_checkpoint, fused, deepcache=0, loras=[(lora, 0.8)])
    settings = dict(SETTINGS, scheduler="euler", deepcache_interval=3)
    expected = Pipeline.load(fused, backend="ort", device="cpu")(PROMPT, **settings)
    pipe = Pipeline.load(onnx_deepcache, backend="ort", device="cpu")
    before = pipe(PROMPT, **settings)
    pipe.load_lora(lora, 0.8)
    after = pipe(PROMPT, **settings)
    assert psnr(after.array, expected.array) >= 90
    assert psnr(before.array, expected.array) < 60


def test_the_bound_device_loop_runs_the_shallow_unet(deepcache_pipe, monkeypatch):
    """The ONNX Runtime CUDA backend's loop (on the CPU provider), with each step captured as a graph on a
    simulated CUDA runtime: four graphs, the shallow UNet's two launched between the whole one's."""
    from fake_cuda import install_fake_cuda, record_ort_steps_on_capture

    from sdengine.backends import ort_cuda
    from sdengine.backends.cuda_runtime import Stream

    record_ort_steps_on_capture(monkeypatch, install_fake_cuda(monkeypatch))
    model_dir = deepcache_pipe.model_dir
    backend = ort_cuda.OrtCudaBackend(model_dir, device="cpu", stream=Stream())
    bound = Pipeline(model_dir, backend, deepcache_pipe.tokenizer)
    for settings in (
        dict(scheduler="euler", deepcache_interval=3),
        dict(scheduler="heun", deepcache_interval=2),
    ):
        settings = {**SETTINGS, **settings}
        ours, ref = bound(PROMPT, NEGATIVE, **settings), deepcache_pipe(PROMPT, NEGATIVE, **settings)
        scale = float(np.abs(ref.latents).max())
        np.testing.assert_allclose(
            ours.latents, ref.latents, rtol=0, atol=1e-5 * scale, err_msg=str(settings)
        )
    assert backend.graphs_refused is None
    assert [len(d.graphs) for d in backend._denoisers.values()] == [4, 4]
    plain = bound(PROMPT, NEGATIVE, scheduler="euler", **SETTINGS)  # interval 1: the whole UNet's graphs
    expected = deepcache_pipe(PROMPT, NEGATIVE, scheduler="euler", **SETTINGS)
    np.testing.assert_allclose(plain.latents, expected.latents, rtol=0, atol=1e-4)
    assert sorted(len(d.graphs) for d in backend._denoisers.values()) == [2, 4, 4]


def test_simulated_tensorrt_runs_the_shallow_engine(simulated, onnx_deepcache, deepcache_pipe, tmp_path):
    from export.trt_build import build_engines
    from sdengine.backends.trt import TrtBackend

    engines = tmp_path / "engines"
    build_engines(onnx_deepcache, engines, batch=1, height=64, width=64, env=ENV, builder=write_plan)
    manifest = json.loads((engines / "sdengine_engines.json").read_text())
    assert "unet_shallow" in json.dumps(manifest)  # built by default, as a required component
    backend = TrtBackend.load(engines)
    pipe = Pipeline(backend.model_dir, backend, deepcache_pipe.tokenizer)
    settings = dict(SETTINGS, scheduler="euler", deepcache_interval=3)
    ours, expected = pipe(PROMPT, NEGATIVE, **settings), deepcache_pipe(PROMPT, NEGATIVE, **settings)
    np.testing.assert_allclose(ours.array, expected.array, atol=1e-4)
    assert backend.graphs_refused is None
    assert [len(steps.graphs) for steps in backend._graphs.values()] == [4]


def test_cli_exports_runs_and_describes_deepcache(
    onnx_deepcache, ort_pipe_fp32, tiny_checkpoint, tmp_path, capsys
):
    from PIL import Image

    from sdengine.cli import main
    from sdengine.info import describe

    out = tmp_path / "dc.png"
    args = ["generate", str(onnx_deepcache), PROMPT, "--steps", "4", "--height", "64", "--width", "64"]
    assert (
        main([*args, "--seed", "1", "--device", "cpu", "--deepcache-interval", "3", "--output", str(out)])
        == 0
    )
    assert json.loads(Image.open(out).info["sdengine"])["deepcache_interval"] == 3
    assert describe(onnx_deepcache)["deepcache"] == "branch 0 (--deepcache-interval)"
    assert describe(ort_pipe_fp32.model_dir.root)["deepcache"] == "none"
    capsys.readouterr()
    plain = ["generate", str(ort_pipe_fp32.model_dir.root), PROMPT, "--steps", "2", "--device", "cpu"]
    assert main([*plain, "--deepcache-interval", "3", "--output", str(tmp_path / "x.png")]) == 1
    assert "sdengine export --deepcache 0" in capsys.readouterr().err
    assert main(["export", str(tiny_checkpoint), "--output", str(tmp_path / "e"), "--deepcache", "40"]) == 1
    assert "DeepCache branch 40 is not in this UNet" in capsys.readouterr().err


def combo(tiny_checkpoint, root, kind: str):
    """(export directory, checkpoint, torch load options, request settings) of DeepCache with another
    feature, each from its own export."""
    from export.checkpoint import write_random_checkpoint
    from export.ip_adapter import write_random_ip_adapter
    from export.onnx_export import export_checkpoint

    components = ["text_encoder", "unet", "vae_decoder"]
    checkpoint, torch_options, settings, export_options = tiny_checkpoint, {}, {}, {}
    if kind == "pag":  # the perturbed layers lie in the skipped blocks: the shallow UNet reads no pag_rows
        layers = ["mid", "down_blocks.1"]
        export_options, torch_options, settings = (
            {"pag_layers": layers},
            {"pag_layers": layers},
            {"pag_scale": 3.0},
        )
    elif kind == "sdxl":
        checkpoint = write_random_checkpoint(root / "xl", "tiny-xl", seed=0)
        components = ["text_encoder", "text_encoder_2", "unet", "vae_decoder"]
    elif kind == "ip-adapter":  # the kept layer's cross-attention reads the image prompt
        adapter = write_random_ip_adapter(tiny_checkpoint, root / "ip", seed=0)
        export_options, torch_options = {"ip_adapter": adapter}, {"ip_adapter": adapter}
        components.append("image_encoder")
        settings = {"ip_adapter_image": picture(64, 64)[0], "ip_adapter_scale": 0.7}
    elif kind == "controlnet":  # it runs whole; of its residuals, the shallow UNet reads the first
        from test_controlnet import control

        from export.controlnet import write_random_controlnet

        controlnet = write_random_controlnet(tiny_checkpoint, root / "controlnet")
        export_options, torch_options = {"controlnets": [controlnet]}, {"controlnets": [controlnet]}
        settings = {"control_image": control(height=64, width=64), "control_scale": 0.8}
    elif kind == "lcm":  # the guidance embedding reaches the time embedding, which the shallow UNet runs
        checkpoint = write_random_checkpoint(root / "lcm", "tiny", seed=0, guidance_embedding=256)
        settings = {"scheduler": "lcm", "steps": 6, "guidance": 8.5}
    export_checkpoint(checkpoint, root / "onnx", components=components, deepcache=0, **export_options)
    return root / "onnx", checkpoint, torch_options, settings


@pytest.mark.parametrize("kind", ["pag", "sdxl", "ip-adapter", "controlnet", "lcm"])
def test_deepcache_with_other_features_matches_the_helper(tiny_checkpoint, tmp_path, kind):
    onnx_dir, checkpoint, torch_options, extra = combo(tiny_checkpoint, tmp_path, kind)
    settings = {**SETTINGS, "scheduler": "euler", "deepcache_interval": 3, **extra}
    ours = Pipeline.load(onnx_dir, backend="ort", device="cpu")
    ref = Pipeline.load(checkpoint, backend="torch", deepcache=0, **torch_options)
    result = ours(PROMPT, NEGATIVE, **settings)
    assert psnr(result.array, ref(PROMPT, NEGATIVE, **settings).array) >= 100
    plain = ours(PROMPT, NEGATIVE, **{**settings, "deepcache_interval": 1})
    assert psnr(result.array, plain.array) < 80
    if kind == "pag":  # declared again, unread: every backend binds the UNet's inputs alike
        shallow = onnx.load(str(onnx_dir / "unet_shallow" / "model.onnx"), load_external_data=False)
        assert [i.name for i in shallow.graph.input][-2:] == ["pag_rows", "deepcache_feature"]
