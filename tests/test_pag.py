"""Perturbed-attention guidance (sdengine/pag.py, export/pag.py): the perturbable self-attention traced into
the UNet, and the guidance summed as two parts, against diffusers' own PAG pipelines with the same draws."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fake_tensorrt import engine_pipeline
from test_img2img import picture

from sdengine.errors import InvalidArgumentError
from sdengine.images import psnr
from sdengine.pag import pag_parts, perturbed_rows
from sdengine.pipeline import Pipeline

PROMPT, NEGATIVE = "a lantern on a table", "blurry"
SETTINGS = dict(steps=6, seed=4, height=64, width=64)
#: the middle block's self-attention, diffusers' default, sees one token at 64x64 in the tiny model (where the
#: identity is what attention gives anyway), so the tests perturb a down block's too
LAYERS = ("mid", "down_blocks.1")


@pytest.fixture(scope="module")
def onnx_pag(tiny_checkpoint, tmp_path_factory):
    from export.onnx_export import export_checkpoint

    out = tmp_path_factory.mktemp("onnx") / "pag"
    export_checkpoint(tiny_checkpoint, out, pag_layers=list(LAYERS))
    return out


@pytest.fixture(scope="module")
def pag_pipe(onnx_pag):
    return Pipeline.load(onnx_pag, backend="ort", device="cpu")


@pytest.fixture(scope="module")
def torch_pipe(tiny_checkpoint):
    return Pipeline.load(tiny_checkpoint, backend="torch", pag_layers=LAYERS)


def mask(height: int = 64, width: int = 64) -> np.ndarray:
    m = np.zeros((height, width), np.float32)
    m[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 1.0
    return m


@pytest.mark.parametrize(
    "settings",
    [
        dict(scheduler="euler", guidance=7.5, pag_scale=3.0),
        dict(scheduler="ddim", guidance=0.8, pag_scale=2.0),  # no classifier-free guidance (<= 1)
        dict(scheduler="euler", guidance=0.0, pag_scale=3.0, batch=2),  # guidance 0: turbo models' setting
        dict(scheduler="euler", guidance=1.0, pag_scale=3.0, pag_adaptive_scale=0.005),
        dict(scheduler="euler_a", guidance=5.0, pag_scale=1.5, batch=2),  # stochastic, a batch
        dict(scheduler="pndm", guidance=7.5, pag_scale=3.0, image=picture(64, 64), strength=0.6),
        dict(scheduler="euler", guidance=6.0, pag_scale=2.5, image=picture(64, 64), mask=mask()),
        dict(scheduler="euler", guidance=7.5, pag_scale=3.0, hires_scale=2.0),  # latents enlarged
        # the scale falls with the timestep, to 0 before the end: each call's weights from the step model
        dict(scheduler="euler", guidance=7.5, pag_scale=3.0, pag_adaptive_scale=0.005),
        dict(scheduler="heun", guidance=7.5, pag_scale=3.0, pag_adaptive_scale=0.004),  # two calls a step
    ],
    ids=[
        "euler",
        "no-cfg",
        "no-cfg-0-batch",
        "no-cfg-adaptive",
        "euler_a-batch",
        "img2img",
        "inpaint",
        "hires",
        "adaptive",
        "adaptive-heun",
    ],
)
def test_pag_matches_diffusers_pag_pipelines(pag_pipe, torch_pipe, settings):
    settings = {**SETTINGS, **settings}
    ours, ref = pag_pipe(PROMPT, NEGATIVE, **settings), torch_pipe(PROMPT, NEGATIVE, **settings)
    scale = float(np.abs(ref.latents).max())
    np.testing.assert_allclose(ours.latents, ref.latents, rtol=0, atol=1e-4 * scale)
    assert psnr(ours.array, ref.array) >= 100
    plain = torch_pipe(PROMPT, NEGATIVE, **{**settings, "pag_scale": 0.0, "pag_adaptive_scale": 0.0})
    assert psnr(ours.array, plain.array) < 60  # it does something
    assert ours.request.parameters(0)["pag_scale"] == settings["pag_scale"]
    # as diffusers: without classifier-free guidance the UNet runs the prompt and its perturbed copy alone
    assert ours.request.copies == (3 if settings["guidance"] > 1 else 2)
    if settings.get("pag_adaptive_scale"):  # not the constant scale's image (which diffusers' is not either)
        constant = pag_pipe(PROMPT, NEGATIVE, **{**settings, "pag_adaptive_scale": 0.0})
        assert psnr(ours.array, constant.array) < 90


def test_scale_zero_is_the_plain_models_image(pag_pipe, ort_pipe_fp32):
    settings = {**SETTINGS, "scheduler": "euler", "guidance": 7.5}
    np.testing.assert_allclose(
        pag_pipe(PROMPT, NEGATIVE, **settings).latents,
        ort_pipe_fp32(PROMPT, NEGATIVE, **settings).latents,
        rtol=0,
        atol=1e-6,
    )


def test_other_layers_match_diffusers_too(tiny_checkpoint, tmp_path):
    from export.onnx_export import export_checkpoint

    layers = ("up",)  # a regular expression: every up block's
    export_checkpoint(tiny_checkpoint, tmp_path / "pag", components=None, pag_layers=list(layers))
    ours = Pipeline.load(tmp_path / "pag", backend="ort", device="cpu")
    theirs = Pipeline.load(tiny_checkpoint, backend="torch", pag_layers=layers)
    settings = {**SETTINGS, "scheduler": "dpmpp_2m", "guidance": 7.5, "pag_scale": 3.0}
    assert psnr(ours(PROMPT, **settings).array, theirs(PROMPT, **settings).array) >= 100
    assert json.loads((tmp_path / "pag" / "pag" / "config.json").read_text()) == {"layers": list(layers)}


@pytest.mark.parametrize("guidance", [7.5, 0.8])
def test_the_bound_loop_guides_like_the_host_loop(pag_pipe, guidance):
    from sdengine.backends.ort_cuda import OrtCudaBackend

    model_dir = pag_pipe.model_dir
    bound = Pipeline(model_dir, OrtCudaBackend(model_dir, device="cpu"), pag_pipe.tokenizer)
    settings = {**SETTINGS, "scheduler": "euler", "guidance": guidance, "pag_scale": 3.0}
    np.testing.assert_allclose(
        bound(PROMPT, NEGATIVE, **settings).latents, pag_pipe(PROMPT, NEGATIVE, **settings).latents, atol=1e-4
    )


def test_the_parts_weights_are_pags_formula():
    # with guidance: uncond + g (cond - uncond) + s (cond - perturbed)
    (((_, w1), (_, w2)),) = pag_parts(("a",), 7.5, 3.0)
    g = 7.5
    assert (g * w1, g * w2) == pytest.approx((7.5 + 3.0, -3.0))
    # without (g <= 1): cond + s (cond - perturbed), the parts' plain sum (no negative side to pull from)
    for g in (0.5, 0.0):
        (((_, w1), (_, w2)),) = pag_parts(("a",), g, 2.0)
        assert (w1, w2) == pytest.approx((3.0, -2.0))
    np.testing.assert_array_equal(perturbed_rows(3, 2, True), [0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(perturbed_rows(2, 2, False), [0, 0, 0, 0])


def test_refusals_are_one_line(pag_pipe, ort_pipe_fp32, onnx_pag, tiny_checkpoint, tmp_path):
    from export.onnx_export import export_checkpoint

    cases = [
        (ort_pipe_fp32, dict(pag_scale=3.0), InvalidArgumentError, "export the model with it"),
        (pag_pipe, dict(pag_scale=-1.0), InvalidArgumentError, "pag_scale must be a finite number >= 0"),
        (pag_pipe, dict(pag_scale=float("nan")), InvalidArgumentError, "pag_scale must be"),
        (pag_pipe, dict(pag_adaptive_scale=0.01), InvalidArgumentError, "lowers a pag_scale: give one"),
        (
            pag_pipe,
            dict(pag_scale=3.0, pag_adaptive_scale=-1.0),
            InvalidArgumentError,
            "pag_adaptive_scale must",
        ),
        (pag_pipe, dict(pag_scale=3.0, guidance_rescale=0.5), InvalidArgumentError, "no guidance_rescale"),
        (
            pag_pipe,
            dict(pag_scale=3.0, prompt_weights="a1111", prompt="a cat AND a dog"),
            InvalidArgumentError,
            "no composable prompts",
        ),
    ]
    for pipe, settings, error, message in cases:
        prompt = settings.pop("prompt", PROMPT)
        with pytest.raises(error, match=message) as info:
            pipe(prompt, **{**SETTINGS, **settings})
        assert "\n" not in str(info.value)
    with pytest.raises(InvalidArgumentError, match="only the torch backend takes it at load"):
        Pipeline.load(onnx_pag, backend="ort", device="cpu", pag_layers=["mid"])
    with pytest.raises(InvalidArgumentError, match="Cannot find PAG layer"):
        Pipeline.load(tiny_checkpoint, backend="torch", pag_layers=["no_such_block"])
    unchecked = Pipeline.load(tiny_checkpoint, backend="torch")  # the default layers: at the first request
    unchecked.pag_layers = ("no_such_block",)
    with pytest.raises(InvalidArgumentError, match="Cannot find PAG layer"):
        unchecked(PROMPT, **{**SETTINGS, "pag_scale": 3.0})
    with pytest.raises(InvalidArgumentError, match="Cannot find PAG layer"):
        export_checkpoint(tiny_checkpoint, tmp_path / "x", components=["unet"], pag_layers=["no_such_block"])
    with pytest.raises(InvalidArgumentError, match="export the unet component too"):
        export_checkpoint(tiny_checkpoint, tmp_path / "z", components=["vae_decoder"], pag_layers=["mid"])


def test_its_weights_are_named_as_the_plain_exports_so_run_time_lora_finds_them(
    onnx_pag, onnx_fp32, tmp_path
):
    """The perturbable UNet's wrapper wraps the plain one's; its layers' weights are still named after the
    UNet's own layers (not ``unet.``-prefixed), which is what run-time LoRA looks them up by."""
    import onnx

    from export.random_lora import write_random_lora

    def names(export_dir):
        model = onnx.load(str(export_dir / "unet" / "model.onnx"), load_external_data=False)
        return {t.name for t in model.graph.initializer if t.name.endswith((".weight", ".weight.T"))}

    assert names(onnx_pag) == names(onnx_fp32) and "conv_in.weight" in names(onnx_pag)
    lora = write_random_lora(onnx_fp32, tmp_path / "lora.safetensors")
    plain = Pipeline.load(onnx_fp32, backend="ort", device="cpu").load_lora(lora, 0.5)
    assert Pipeline.load(onnx_pag, backend="ort", device="cpu").load_lora(lora, 0.5) == plain > 0


def test_generate_takes_pag_scale(onnx_pag, tmp_path):
    from PIL import Image

    from sdengine.cli import main

    out = tmp_path / "pag.png"
    args = ["generate", str(onnx_pag), PROMPT, "--steps", "2", "--height", "64", "--width", "64"]
    assert main([*args, "--seed", "1", "--device", "cpu", "--pag-scale", "3", "--output", str(out)]) == 0
    assert json.loads(Image.open(out).info["sdengine"])["pag_scale"] == 3.0
    from sdengine.info import describe

    assert describe(onnx_pag)["pag"] == "perturbed-attention guidance (--pag-scale) in mid, down_blocks.1"


def test_the_tensorrt_path_runs_pag_in_its_captured_steps(simulated, onnx_pag, pag_pipe, tmp_path):
    """On the simulated TensorRT and CUDA runtime (tests/fake_tensorrt.py): engines built with room
    for the perturbed copy (``--parts 2``) run PAG in the graph steps as the CPU does."""

    engines = tmp_path / "engines"
    pipe = engine_pipeline(onnx_pag, engines, pag_pipe.tokenizer, height=64, width=64, parts=2)
    backend = pipe.backend
    settings = {**SETTINGS, "scheduler": "euler"}
    for pag_scale, guidance in ((3.0, 7.5), (0.0, 7.5), (3.0, 1.0)):
        ours, ref = (
            pipe(PROMPT, **settings, pag_scale=pag_scale, guidance=guidance),
            pag_pipe(PROMPT, **settings, pag_scale=pag_scale, guidance=guidance),
        )
        scale = float(np.abs(ref.latents).max())
        np.testing.assert_allclose(ours.latents, ref.latents, rtol=0, atol=1e-5 * scale)
    copies = sorted(key.copies for key in backend._graphs)
    assert copies == [2, 2, 3] and backend.graphs_refused is None  # 2: guidance, and PAG without it


def test_sdxl_matches_diffusers_sdxl_pag_pipeline(tmp_path_factory):
    """SDXL's added conditioning reaches the perturbed copy as the others (a third copy of the pooled
    embeddings and size numbers), and no negative prompt reads zeros as diffusers' SDXL pipelines do."""
    from export.checkpoint import write_random_checkpoint
    from export.onnx_export import export_checkpoint

    root = tmp_path_factory.mktemp("xl-pag")
    checkpoint = write_random_checkpoint(root / "tiny-xl", "tiny-xl", seed=0)
    export_checkpoint(checkpoint, root / "onnx", components=None, pag_layers=list(LAYERS))
    ours = Pipeline.load(root / "onnx", backend="ort", device="cpu")
    theirs = Pipeline.load(checkpoint, backend="torch", pag_layers=LAYERS)
    settings = {**SETTINGS, "scheduler": "euler", "guidance": 6.0, "pag_scale": 3.0}
    for negative, guidance in ((None, 6.0), (NEGATIVE, 6.0), (NEGATIVE, 1.0)):  # 1.0: no negative side
        run = {**settings, "guidance": guidance}
        a, b = ours(PROMPT, negative, **run), theirs(PROMPT, negative, **run)
        assert psnr(a.array, b.array) >= 100, (negative, guidance)
    plain = ours(PROMPT, NEGATIVE, **{**settings, "pag_scale": 0.0})
    assert psnr(a.array, plain.array) < 60


@pytest.mark.parametrize("extra", ["controlnet", "ip_adapter"])
def test_with_a_controlnet_or_an_image_prompt_it_matches_diffusers(tiny_checkpoint, tmp_path, extra):
    """The ControlNet reads the perturbed copy with its control image, and the IP-Adapter's cross-attention
    its image prompt, as in diffusers' ControlNet PAG pipeline and its PAG pipelines' image prompts; only
    the UNet's self-attention is perturbed."""
    from export.onnx_export import export_checkpoint

    rng = np.random.default_rng(5)
    if extra == "controlnet":
        from export.controlnet import write_random_controlnet

        adapted = {"controlnets": [write_random_controlnet(tiny_checkpoint, tmp_path / "cn", seed=0)]}
        inputs = {"control_image": rng.random((64, 64, 3)).astype(np.float32), "control_scale": 0.8}
    else:
        from export.ip_adapter import write_random_ip_adapter

        adapted = {"ip_adapter": write_random_ip_adapter(tiny_checkpoint, tmp_path / "ip")}
        inputs = {"ip_adapter_image": rng.random((48, 80, 3)).astype(np.float32), "ip_adapter_scale": 0.6}
    export_checkpoint(tiny_checkpoint, tmp_path / "onnx", pag_layers=list(LAYERS), **adapted)
    ours = Pipeline.load(tmp_path / "onnx", backend="ort", device="cpu")
    theirs = Pipeline.load(tiny_checkpoint, backend="torch", pag_layers=LAYERS, **adapted)
    settings = {**SETTINGS, "scheduler": "euler", "guidance": 7.5, "pag_scale": 3.0, **inputs}
    a, b = ours(PROMPT, NEGATIVE, **settings), theirs(PROMPT, NEGATIVE, **settings)
    assert psnr(a.array, b.array) >= 100
    assert psnr(a.array, ours(PROMPT, NEGATIVE, **{**settings, "pag_scale": 0.0}).array) < 60
    unguided = {
        **settings,
        "guidance": 1.0,
    }  # the image prompt (or control image) on both copies, no negative
    assert psnr(ours(PROMPT, NEGATIVE, **unguided).array, theirs(PROMPT, NEGATIVE, **unguided).array) >= 100
