"""ControlNet: traced into the exported UNet, checked against diffusers' ControlNet pipelines (text to image,
image to image, inpainting, several ControlNets) fed the same draws; on the host loop, the bound ONNX Runtime
loop and the simulated TensorRT runtime; and its errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from fake_tensorrt import ENV, write_plan
from PIL import Image
from test_img2img import picture
from test_inpaint import inpaint_checkpoint, rectangle  # noqa: F401 (inpaint_checkpoint: a fixture)

from sdengine.cli import main
from sdengine.errors import InvalidArgumentError, ModelDirectoryError, UnsupportedConfigError
from sdengine.images import psnr, read_png_parameters
from sdengine.manifest import Manifest
from sdengine.pipeline import Pipeline

PROMPT = "a house by a lake"
SIZE = dict(height=64, width=96)


def control(seed: int = 0, height: int = 64, width: int = 96) -> np.ndarray:
    """A control image (H, W, 3) in [0, 1] with edges, as an edge map has."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.float32)
    for _ in range(6):
        y, x = rng.integers(0, height), rng.integers(0, width)
        image[y, :] = 1.0
        image[:, x] = rng.random(3)
    return image


@pytest.fixture(scope="module")
def controlnet_dirs(tiny_checkpoint, tmp_path_factory):
    from export.controlnet import write_random_controlnet

    root = tmp_path_factory.mktemp("controlnets")
    return [write_random_controlnet(tiny_checkpoint, root / f"cn{seed}", seed=seed) for seed in (0, 1)]


@pytest.fixture(scope="module")
def control_onnx(tiny_checkpoint, controlnet_dirs, tmp_path_factory):
    from export.onnx_export import export_checkpoint

    out = tmp_path_factory.mktemp("onnx") / "controlled"
    export_checkpoint(tiny_checkpoint, out, controlnets=controlnet_dirs[:1])
    return out


@pytest.fixture(scope="module")
def pipes(tiny_checkpoint, controlnet_dirs, control_onnx):
    """(ONNX Runtime on the CPU, diffusers) with the first ControlNet."""
    ours = Pipeline.load(control_onnx, backend="ort", device="cpu")
    return ours, Pipeline.load(tiny_checkpoint, backend="torch", controlnets=controlnet_dirs[:1])


def test_the_export_lists_its_controlnets_and_its_unet_takes_their_inputs(control_onnx, controlnet_dirs):
    listed = json.loads((control_onnx / "controlnet" / "config.json").read_text())["controlnets"]
    assert [entry["dir"] for entry in listed] == [str(controlnet_dirs[0].resolve())]
    assert listed[0]["config"]["_class_name"] == "ControlNetModel"
    manifest = Manifest.read(control_onnx)
    assert [c["dir"] for c in manifest.controlnets] == [listed[0]["dir"]]
    assert manifest.components["unet"].verification["passed"]
    unet = onnx.load(str(control_onnx / "unet" / "model.onnx"), load_external_data=False)
    shapes = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in unet.graph.input
    }
    assert shapes["controlnet_cond"] == ["batch", 3, "height", "width"]
    assert shapes["conditioning_scale"] == [1]


def test_the_unet_layers_keep_their_names_beside_the_controlnet(control_onnx, onnx_fp32):
    """LoRA finds the UNet's layers by name: the ControlNet traced beside them takes none of those names."""

    def layer_weights(root):
        model = onnx.load(str(root / "unet" / "model.onnx"), load_external_data=False)
        return {t.name for t in model.graph.initializer if t.name.endswith((".weight", ".weight.T"))}

    plain, controlled = layer_weights(onnx_fp32), layer_weights(control_onnx)
    assert len(plain) > 50 and plain <= controlled
    assert all(name.startswith("controlnets.0.") for name in controlled - plain)


@pytest.mark.parametrize("scheduler", ["pndm", "euler_a", "dpmpp_2m"])
def test_text_to_image_matches_diffusers(pipes, scheduler):
    settings = dict(steps=4, seed=3, scheduler=scheduler, control_image=control(), control_scale=0.8, **SIZE)
    ours, ref = (pipe(PROMPT, "blurry", **settings) for pipe in pipes)
    assert psnr(ours.array, ref.array) >= 100
    scale = float(np.abs(ref.latents).max())  # float32 rounding, relative to the latents' size
    np.testing.assert_allclose(ours.latents, ref.latents, rtol=0, atol=1e-5 * scale)


def test_controlnets_running_on_part_of_the_schedule_match_diffusers(pipes):
    """control_start/control_end: the step model gives each call its weights, 0 outside the share."""
    settings = dict(steps=6, seed=11, control_image=control(7), scheduler="dpmpp_2m", **SIZE)
    whole = pipes[0](PROMPT, **settings)
    for start, end in ((0.0, 0.5), (0.34, 1.0), (0.2, 0.7)):
        ours, ref = (pipe(PROMPT, control_start=start, control_end=end, **settings) for pipe in pipes)
        assert psnr(ours.array, ref.array) >= 100, (start, end)
        assert psnr(ours.array, whole.array) < 60, (start, end)


def test_control_schedule_is_diffusers_controlnet_keep():
    from sdengine.controlnet import control_schedule

    calls, starts, ends, scales = 7, (0.0, 0.3), (0.6, 1.0), (0.5, 2.0)
    table = control_schedule(scales, starts, ends, calls)
    for i in range(calls):  # diffusers' StableDiffusionControlNetPipeline.__call__, written out
        keep = [1.0 - float(i / calls < s or (i + 1) / calls > e) for s, e in zip(starts, ends, strict=True)]
        np.testing.assert_array_equal(table[i], np.float32(keep) * np.float32(scales))


def test_the_control_image_changes_the_image_and_scale_zero_is_the_plain_unet(pipes, ort_pipe_fp32):
    settings = dict(steps=4, seed=4, **SIZE)
    plain = ort_pipe_fp32(PROMPT, **settings)
    zero = pipes[0](PROMPT, control_image=control(), control_scale=0.0, **settings)
    full = pipes[0](PROMPT, control_image=control(), **settings)
    other = pipes[0](PROMPT, control_image=control(seed=9), **settings)
    np.testing.assert_allclose(zero.latents, plain.latents, rtol=0, atol=1e-4)
    assert psnr(full.array, plain.array) < 40 and psnr(full.array, other.array) < 45


def test_image_to_image_and_inpainting_match_diffusers(pipes):
    settings = dict(steps=5, seed=5, image=picture(), control_image=control(1), scheduler="euler_a")
    for extra in (dict(strength=0.6), dict(mask=rectangle())):
        ours, ref = (pipe(PROMPT, **settings, **extra) for pipe in pipes)
        assert psnr(ours.array, ref.array) >= 100, extra


@pytest.mark.parametrize("upscale", ["latent", "image"])
def test_the_hires_fix_gives_the_second_pass_its_control_image_resized(pipes, upscale):
    settings = dict(steps=6, seed=5, control_image=control(1), control_end=0.8, scheduler="euler")
    settings.update(hires_scale=2, hires_upscale=upscale, hires_strength=0.7)
    ours, ref = (pipe(PROMPT, **settings) for pipe in pipes)
    assert ours.array.shape == (1, 128, 192, 3)
    # "image": the first pass's images are rounded to 8 bits before they are resized (see test_hires)
    assert psnr(ours.array, ref.array) >= (90 if upscale == "image" else 100)
    other = pipes[0](PROMPT, **{**settings, "control_image": control(2)})
    assert psnr(ours.array, other.array) < 60  # the control image matters in both passes


def test_an_inpainting_unet_gives_its_controlnet_the_latents_alone(
    inpaint_checkpoint,  # noqa: F811
    controlnet_dirs,
    tmp_path,
):
    """A 9-channel inpainting UNet with a (4-channel) ControlNet, as diffusers' ControlNet inpainting pipeline
    runs them: the ControlNet reads the latents without the mask channels."""
    from export.onnx_export import export_checkpoint

    components = ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    export_checkpoint(
        inpaint_checkpoint, tmp_path / "x", controlnets=controlnet_dirs[:1], components=components
    )
    ours = Pipeline.load(tmp_path / "x", backend="ort", device="cpu")
    ref = Pipeline.load(inpaint_checkpoint, backend="torch", controlnets=controlnet_dirs[:1])
    settings = dict(
        steps=4, seed=12, image=picture(), mask=rectangle(), control_image=control(8), strength=0.9
    )
    assert psnr(ours(PROMPT, **settings).array, ref(PROMPT, **settings).array) >= 100


def test_a_lora_loaded_at_run_time_updates_the_unet_beside_its_controlnet(
    tiny_checkpoint, controlnet_dirs, control_onnx, tmp_path
):
    from export.random_lora import write_random_lora

    lora = write_random_lora(control_onnx, tmp_path / "lora.safetensors", seed=3)
    ours = Pipeline.load(control_onnx, backend="ort", device="cpu")
    ref = Pipeline.load(tiny_checkpoint, backend="torch", controlnets=controlnet_dirs[:1])
    settings = dict(steps=4, seed=13, control_image=control(9), **SIZE)
    before = ours(PROMPT, **settings)
    for pipe in (ours, ref):
        pipe.load_lora(lora, 0.8)
    after = ours(PROMPT, **settings)
    assert psnr(after.array, ref(PROMPT, **settings).array) >= 100
    assert psnr(after.array, before.array) < 45
    from export.onnx_export import export_checkpoint  # fused at export instead, as TensorRT needs it

    components = ["text_encoder", "unet", "vae_decoder"]
    fused = tmp_path / "fused"
    export_checkpoint(
        tiny_checkpoint, fused, components=components, controlnets=controlnet_dirs[:1], loras=[(lora, 0.8)]
    )
    at_export = Pipeline.load(fused, backend="ort", device="cpu")(PROMPT, **settings)
    np.testing.assert_allclose(at_export.latents, after.latents, rtol=0, atol=1e-4)


def test_two_controlnets_add_up_as_diffusers_multi_controlnet(tiny_checkpoint, controlnet_dirs, tmp_path):
    from export.onnx_export import export_checkpoint

    components = ["text_encoder", "unet", "vae_decoder"]
    export_checkpoint(tiny_checkpoint, tmp_path / "multi", controlnets=controlnet_dirs, components=components)
    ours = Pipeline.load(tmp_path / "multi", backend="ort", device="cpu")
    ref = Pipeline.load(tiny_checkpoint, backend="torch", controlnets=controlnet_dirs)
    assert ours.controlnets == ref.controlnets == 2
    settings = dict(
        steps=4, seed=6, control_image=[control(2), control(3)], control_scale=[0.6, -0.4], **SIZE
    )
    a, b = ours(PROMPT, **settings), ref(PROMPT, **settings)
    assert psnr(a.array, b.array) >= 100
    swapped = ours(PROMPT, **{**settings, "control_image": [control(3), control(2)]})
    assert psnr(swapped.array, a.array) < 45  # each ControlNet reads its own image
    with pytest.raises(InvalidArgumentError, match="give a list of 2 control images"):
        ours.request(PROMPT, control_image=control(2))
    with pytest.raises(InvalidArgumentError, match="3 values of control_scale for 2 control images"):
        ours.request(PROMPT, control_image=[control(2), control(3)], control_scale=[1, 1, 1])


def test_batches_share_one_control_image_or_take_one_each(pipes):
    one = pipes[0]([PROMPT, "a boat"], steps=3, seed=7, control_image=control(4), **SIZE)
    each = pipes[0](
        [PROMPT, "a boat"], steps=3, seed=7, control_image=np.stack([control(4), control(5)]), **SIZE
    )
    ref = pipes[1](
        [PROMPT, "a boat"], steps=3, seed=7, control_image=np.stack([control(4), control(5)]), **SIZE
    )
    np.testing.assert_allclose(one.latents[0], each.latents[0], rtol=0, atol=1e-5)
    assert psnr(one.array[1], each.array[1]) < 45
    assert psnr(each.array, ref.array) >= 100


def test_the_control_image_sets_the_default_size(pipes):
    request = pipes[0].request(PROMPT, control_image=control(height=72, width=45), image=picture())
    assert (request.height, request.width) == (72, 40)
    assert request.parameters()["control_scale"] == [1.0]


def test_control_images_and_models_must_agree(
    pipes, ort_pipe_fp32, onnx_fp32, tiny_checkpoint, controlnet_dirs
):
    ours = pipes[0]
    with pytest.raises(InvalidArgumentError, match="conditioned by 1 ControlNet"):
        ours.request(PROMPT)
    with pytest.raises(InvalidArgumentError, match="needs a ControlNet"):
        ort_pipe_fp32.request(PROMPT, control_image=control())
    with pytest.raises(InvalidArgumentError, match="apply to ControlNet only"):
        ort_pipe_fp32.request(PROMPT, control_scale=0.5)
    with pytest.raises(InvalidArgumentError, match="apply to ControlNet only"):
        ort_pipe_fp32.request(PROMPT, control_end=0.5)
    with pytest.raises(InvalidArgumentError, match="finite number"):
        ours.request(PROMPT, control_image=control(), control_scale=float("nan"))
    for start, end in ((0.5, 0.5), (-0.1, 1.0), (0.0, 1.2)):
        with pytest.raises(InvalidArgumentError, match="start before it ends"):
            ours.request(PROMPT, control_image=control(), control_start=start, control_end=end)
    with pytest.raises(InvalidArgumentError, match="control images have shape"):
        ours.request(PROMPT, control_image=np.stack([control()] * 3), batch=2, **SIZE)
    with pytest.raises(InvalidArgumentError, match="ControlNets are traced into an export's UNet"):
        Pipeline.load(onnx_fp32, backend="ort", device="cpu", controlnets=controlnet_dirs[:1])


def test_export_refuses_controlnets_that_do_not_fit(tiny_checkpoint, controlnet_dirs, tmp_path):
    from export.onnx_export import export_checkpoint

    with pytest.raises(ModelDirectoryError, match="is not a ControlNet"):
        export_checkpoint(tiny_checkpoint, tmp_path / "a", controlnets=[tiny_checkpoint / "unet"])
    other = tmp_path / "other"
    shutil.copytree(controlnet_dirs[0], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "block_out_channels": [64, 128, 256, 256]}))
    with pytest.raises(UnsupportedConfigError, match="block_out_channels"):
        export_checkpoint(tiny_checkpoint, tmp_path / "b", controlnets=[other])
    with pytest.raises(InvalidArgumentError, match="export the unet component too"):
        export_checkpoint(
            tiny_checkpoint, tmp_path / "c", controlnets=controlnet_dirs, components=["vae_decoder"]
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_an_export_without_controlnets_drops_an_older_list(tiny_checkpoint, controlnet_dirs, tmp_path):
    from export.onnx_export import export_checkpoint

    out = tmp_path / "again"
    export_checkpoint(
        tiny_checkpoint, out, controlnets=controlnet_dirs[:1], components=["unet"], verify=False
    )
    assert (out / "controlnet" / "config.json").is_file()
    export_checkpoint(tiny_checkpoint, out, components=["unet"], verify=False)
    assert not (out / "controlnet" / "config.json").exists()


def test_bound_loop_matches_the_host_loop(pipes):
    """The device loop (here on the CPU provider) binds the ControlNet's inputs once and refills them."""
    from sdengine.backends.ort_cuda import OrtCudaBackend

    host = pipes[0]
    bound = Pipeline(host.model_dir, OrtCudaBackend(host.model_dir, device="cpu"), host.tokenizer)
    for seed in (8, 9):  # the second run refills the same buffers with another control image
        settings = dict(
            steps=4, seed=seed, control_image=control(seed), control_scale=0.5 + seed / 10, **SIZE
        )
        settings["control_end"] = 0.5 if seed == 9 else 1.0  # weights from the step model: 0 after call 2
        settings["control_mode"] = "guess" if seed == 9 else "balanced"  # each row's weights: refilled
        np.testing.assert_allclose(
            bound(PROMPT, **settings).latents, host(PROMPT, **settings).latents, atol=1e-4
        )
    assert len(bound.backend._denoisers) == 1


def test_simulated_tensorrt_binds_the_controlnet_inputs(simulated, control_onnx, pipes, tmp_path):
    from export.trt_build import build_engines
    from sdengine.backends.trt import TrtBackend

    manifest = build_engines(control_onnx, tmp_path / "engines", batch=1, env=ENV, builder=write_plan, **SIZE)
    assert manifest.engines["unet"].profile["controlnet_cond"] == [[2, 3, 64, 96]] * 3
    backend = TrtBackend.load(tmp_path / "engines")
    pipe = Pipeline(backend.model_dir, backend, pipes[0].tokenizer)
    settings = dict(steps=4, seed=10, control_image=control(6), control_scale=0.7, control_start=0.25, **SIZE)
    np.testing.assert_allclose(pipe(PROMPT, **settings).array, pipes[0](PROMPT, **settings).array, atol=1e-4)
    assert backend.graphs_refused is None


def test_control_mode_weights_are_diffusers_and_the_extensions():
    import torch

    from sdengine.controlnet import control_mode_weights

    modes = ("guess", "prompt", "control", "balanced")
    w = control_mode_weights(modes, 13, batch=2, copies=2, negative_side=True)  # rows: negative, positive
    assert w.shape == (4, 4, 13)
    np.testing.assert_allclose(
        w[2:, 0], np.broadcast_to(torch.logspace(-1, 0, 13).numpy(), (2, 13)), rtol=1e-6
    )
    np.testing.assert_allclose(w[:, 1], np.broadcast_to(0.825 ** (12 - np.arange(13.0)), (4, 13)), rtol=1e-6)
    assert not w[:2, 0].any() and not w[:2, 2].any()  # guess and "ControlNet is more important": no negative
    assert (w[2:, 2] == w[2:, 1]).all() and (w[:, 3] == 1).all()
    xl = control_mode_weights(("prompt", "guess"), 10, batch=1, copies=1, negative_side=False)
    np.testing.assert_allclose(xl[0, 0], 0.825 ** (12 - np.arange(10.0)), rtol=1e-6)  # the first 10 of 13
    np.testing.assert_allclose(
        xl[0, 1], torch.logspace(-1, 0, 10).numpy(), rtol=1e-6
    )  # every row: no negative


def test_the_export_weighs_each_residual_of_each_row(control_onnx, controlnet_dirs):
    from diffusers import ControlNetModel

    from sdengine.controlnet import residual_count

    model = ControlNetModel.from_pretrained(controlnet_dirs[0])
    config = json.loads((controlnet_dirs[0] / "config.json").read_text())
    assert residual_count(config) == len(model.controlnet_down_blocks) + 1 == 13
    assert json.loads((control_onnx / "controlnet" / "config.json").read_text())["residuals"] == 13
    unet = onnx.load(str(control_onnx / "unet" / "model.onnx"), load_external_data=False)
    weights = next(i for i in unet.graph.input if i.name == "control_weights")
    assert [d.dim_param or d.dim_value for d in weights.type.tensor_type.shape.dim] == ["batch", 1, 13]


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_guess_mode_matches_diffusers(pipes, guidance):
    """diffusers' guess_mode: the ControlNet's residuals scaled from 0.1 to 1 block by block, and with
    classifier-free guidance none on the negative side."""
    settings = dict(steps=4, seed=3, scheduler="euler", guidance=guidance, control_image=control(), **SIZE)
    guessed = {**settings, "control_scale": 0.8, "control_mode": "guess"}
    ours, ref = (pipe(PROMPT, "blurry", **guessed) for pipe in pipes)
    assert psnr(ours.array, ref.array) >= 100
    assert ours.request.parameters(0)["control_mode"] == ["guess"]
    balanced = pipes[0](PROMPT, "blurry", **{**guessed, "control_mode": "balanced"})
    assert psnr(ours.array, balanced.array) < 80


def test_the_web_uis_control_modes(pipes, control_onnx, ort_pipe_fp32, tmp_path):
    """The extension's "My prompt is more important" and "ControlNet is more important" weigh the residuals
    alike and differ on the negative side alone: the same image without one (guidance 1)."""
    ours = pipes[0]
    settings = dict(steps=4, seed=3, scheduler="euler", control_image=control(), **SIZE)
    runs = {
        (mode, g): ours(PROMPT, "blurry", **settings, guidance=g, control_mode=mode).array
        for mode in ("balanced", "prompt", "control")
        for g in (7.5, 1.0)
    }
    np.testing.assert_array_equal(runs["prompt", 1.0], runs["control", 1.0])
    assert psnr(runs["prompt", 7.5], runs["control", 7.5]) < 80
    assert psnr(runs["prompt", 7.5], runs["balanced", 7.5]) < 80
    with pytest.raises(UnsupportedConfigError, match="all in guess mode"):
        pipes[1](PROMPT, **settings, control_mode="prompt")
    with pytest.raises(InvalidArgumentError, match="control_mode must be one of"):
        ours(PROMPT, **settings, control_mode="strong")
    with pytest.raises(InvalidArgumentError, match="2 values of control_mode for 1 control images"):
        ours(PROMPT, **settings, control_mode=["guess", "prompt"])
    with pytest.raises(InvalidArgumentError, match="applies to ControlNet only"):
        ort_pipe_fp32(PROMPT, steps=2, control_mode="guess", **SIZE)
    older = shutil.copytree(control_onnx, tmp_path / "older")  # an export from before: no residual count
    listed = json.loads((older / "controlnet" / "config.json").read_text())
    del listed["residuals"]
    (older / "controlnet" / "config.json").write_text(json.dumps(listed))
    with pytest.raises(UnsupportedConfigError, match="exported before control modes: export it again"):
        Pipeline.load(older, backend="ort", device="cpu")(PROMPT, **settings, control_mode="guess")


def test_cli_controlnet(tiny_checkpoint, tmp_path, capsys):
    cn, onnx_dir, out = tmp_path / "cn", tmp_path / "onnx", tmp_path / "out.png"
    assert main(["make-controlnet", str(tiny_checkpoint), str(cn), "--seed", "4"]) == 0
    args = ["export", str(tiny_checkpoint), "--output", str(onnx_dir), "--controlnet", str(cn), "--no-verify"]
    assert main([*args, "--components", "text_encoder,unet,vae_decoder"]) == 0
    edges = tmp_path / "edges.png"
    Image.fromarray((control(height=48, width=80) * 255).astype(np.uint8)).save(edges)
    generate = ["generate", str(onnx_dir), PROMPT, "--steps", "2", "--device", "cpu", "--output", str(out)]
    assert (
        main(
            [*generate, "--control-image", str(edges), "--control-scale", "0.5", "--control-end", "0.8"]
            + ["--control-mode", "guess"]
        )
        == 0
    )
    params = read_png_parameters(out)
    assert params["control_mode"] == ["guess"]
    assert (params["height"], params["width"], params["control_scale"]) == (48, 80, [0.5])
    assert (params["control_start"], params["control_end"]) == ([0.0], [0.8])
    assert params["control_images"] == ["edges.png"]
    capsys.readouterr()
    assert main(["info", str(onnx_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["controlnets"], info["architecture"]["controlnets"]) == (["cn"], 1)
    assert info["control_modes"].startswith("balanced, guess")
    assert main(["info", str(cn), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "controlnet" and info["in_channels"] == 4
    assert main(generate) == 1
    err = capsys.readouterr().err.strip()
    assert "1 ControlNet(s): give --control-image that many times, not 0" in err and "\n" not in err
    assert (
        main(["export", str(tiny_checkpoint), "--output", str(tmp_path / "x"), "--controlnet", str(out)]) == 1
    )
    assert "ControlNet directory" in capsys.readouterr().err


def test_bench_runs_the_baseline_with_the_exports_controlnets(
    tiny_checkpoint, control_onnx, tmp_path, capsys
):
    from benchmarks.flops import count_flops

    out = tmp_path / "r.json"
    args = ["bench", str(control_onnx), "--runs", "1", "--warmup", "0", "--steps", "2", "--device", "cpu"]
    assert main([*args, "--height", "64", "--width", "96", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["backends"]["ort"]["psnr_vs_torch_db"] >= 100  # the same control image, the same ControlNet
    plain_unet = count_flops(tiny_checkpoint, "unet", 2, 64, 96)
    assert report["flops_per_call"]["unet"] > 1.2 * plain_unet  # the ControlNet's FLOPs counted


def test_composable_prompts_give_every_part_the_control_image(pipes):
    settings = dict(steps=4, seed=4, control_image=control(), prompt_weights="a1111", **SIZE)
    doubled = pipes[0](f"{PROMPT} AND {PROMPT}", guidance=3.0, **settings)
    np.testing.assert_allclose(doubled.latents, pipes[0](PROMPT, guidance=6.0, **settings).latents, atol=1e-4)
