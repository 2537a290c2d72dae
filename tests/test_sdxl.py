"""SDXL: the tiny random checkpoint, its export, and the runtime against diffusers' SDXL pipelines."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from sdengine.errors import InvalidArgumentError, ModelDirectoryError, UnsupportedConfigError
from sdengine.images import psnr
from sdengine.model_dir import open_checkpoint_dir, open_onnx_dir
from sdengine.model_specs import TEXT_EMBEDS, TEXT_ENCODER_2, TIME_IDS, UNET
from sdengine.pipeline import Pipeline
from sdengine.xl_conditioning import SizeConditioning

PROMPT = "a photo of an astronaut riding a horse"
LONG = "a photo of an astronaut riding a horse on mars, " * 8  # over two windows of 75 tokens
SETTINGS = dict(steps=4, seed=3, height=64, width=96)


@pytest.fixture(scope="module")
def xl_checkpoint(tmp_path_factory):
    from export.checkpoint import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("xl") / "tiny-xl", "tiny-xl", seed=0)


@pytest.fixture(scope="module")
def xl_onnx(xl_checkpoint, tmp_path_factory):
    from export.onnx_export import export_checkpoint

    out = tmp_path_factory.mktemp("xl") / "onnx"
    export_checkpoint(xl_checkpoint, out)
    return out


@pytest.fixture(scope="module")
def xl_pipes(xl_onnx, xl_checkpoint):
    """(ONNX Runtime on the CPU, the torch baseline) on the tiny SDXL model."""
    return Pipeline.load(xl_onnx, backend="ort", device="cpu"), Pipeline.load(xl_checkpoint, backend="torch")


def test_the_tiny_checkpoint_is_sdxl(xl_checkpoint):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(xl_checkpoint)
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.tokenizer_2.pad_token == "!" and pipe.vae.config.scaling_factor == 0.13025
    model_dir = open_checkpoint_dir(xl_checkpoint)
    arch = model_dir.arch
    assert arch.xl and arch.text_hidden_size == 64 and arch.text_hidden_size_2 == 32
    assert (arch.pooled_size, arch.time_ids) == (32, 6)
    assert model_dir.zero_negative and model_dir.vae_force_upcast
    assert model_dir.scheduler_config["timestep_spacing"] == "leading"


def test_export_holds_both_text_encoders_and_keeps_the_vae_in_float32(xl_checkpoint, tmp_path):
    from export.onnx_export import export_checkpoint

    manifest = export_checkpoint(xl_checkpoint, tmp_path / "fp16", precision="fp16")
    assert set(manifest.components) == set(open_checkpoint_dir(xl_checkpoint).arch.components())
    assert all(r.verification["passed"] for r in manifest.components.values())

    def weight_types(component: str) -> set[int]:
        graph = onnx.load(str(tmp_path / "fp16" / component / "model.onnx")).graph
        return {t.data_type for t in graph.initializer if len(t.dims) > 1}

    assert weight_types(TEXT_ENCODER_2) == {onnx.TensorProto.FLOAT16}
    # the UNet's, but for the embeddings of the timestep and the size numbers and pooled text (export.fp16)
    unet = onnx.load(str(tmp_path / "fp16" / UNET / "model.onnx")).graph
    single = {t.name for t in unet.initializer if len(t.dims) > 1 and t.data_type == onnx.TensorProto.FLOAT}
    embeddings = ("time_embedding.", "add_embedding.", ".time_emb_proj.")
    assert single and all(any(part in name for part in embeddings) for name in single), sorted(single)
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in unet.initializer if len(t.dims) > 1)
    assert weight_types("vae_decoder") == weight_types("vae_encoder") == {onnx.TensorProto.FLOAT}  # upcast
    model_dir = open_onnx_dir(tmp_path / "fp16")
    assert model_dir.arch.xl and (model_dir.root / "tokenizer_2" / "vocab.json").is_file()


def test_text_encoder_2_is_only_exported_from_sdxl(tiny_checkpoint, tmp_path):
    from export.onnx_export import export_checkpoint

    with pytest.raises(InvalidArgumentError, match="text_encoder_2 is SDXL's second"):
        export_checkpoint(tiny_checkpoint, tmp_path / "out", components=[TEXT_ENCODER_2])


CASES = {
    "no negative prompt (zeros)": dict(),
    "negative prompt": dict(negative_prompt="blurry"),
    "empty negative prompt": dict(negative_prompt=""),
    "batch with clip_skip": dict(prompt=[PROMPT, "a red cat"], clip_skip=1),
    "no guidance": dict(guidance=1.0),
    "guidance rescale, dpmpp_2m": dict(guidance_rescale=0.7, scheduler="dpmpp_2m"),
    "euler_a": dict(scheduler="euler_a"),
    "hires fix": dict(hires_scale=1.5),
    "long prompts": dict(prompt=LONG, negative_prompt="blurry, " * 40, long_prompts=True),
    "A1111 weights with clip_skip": dict(
        prompt="a (red:1.4) cat, [blue] sky",
        negative_prompt="(ugly:1.2)",
        prompt_weights="a1111",
        clip_skip=1,
    ),
    "A1111 weights, long, BREAK": dict(
        prompt=LONG.replace("horse", "(horse:1.3)") + " BREAK a cat",
        prompt_weights="a1111",
        long_prompts=True,
    ),
    # edited prompts: the step model hands each call its set's text and pooled embeddings; diffusers gets
    # them through callback_on_step_end
    "prompt editing, no negative prompt": dict(prompt="a [cat:dog:0.5]", prompt_weights="a1111"),
    "prompt editing, Heun": dict(
        prompt="a [cat|dog], [red::3]",
        negative_prompt="[ugly:nice:2]",
        prompt_weights="a1111",
        scheduler="heun",
    ),
    # against compel itself, as diffusers' documentation runs it for SDXL
    "compel weights": dict(prompt="a (red cat)1.3, blue-- sky", prompt_weights="compel"),
    "compel weights, long": dict(
        prompt="a (red cat)1.3, blue sky, " * 10,
        negative_prompt="ugly--",
        prompt_weights="compel",
        long_prompts=True,
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_text_to_image_matches_diffusers(xl_pipes, case):
    """Against diffusers' StableDiffusionXLPipeline with the engine's draws: its own encode_prompt for plain
    prompts; for clip_skip (which it applies to the positive prompts alone), long prompts and the A1111
    syntax, the baseline's embeddings from transformers' tokenizers and the torch encoders; for compel's
    syntax, compel's."""
    ours, ref = xl_pipes
    settings = {**SETTINGS, **CASES[case]}
    prompt, negative = settings.pop("prompt", PROMPT), settings.pop("negative_prompt", None)
    a, b = ours(prompt, negative, **settings), ref(prompt, negative, **settings)
    assert a.array.shape == b.array.shape
    assert psnr(a.array, b.array) >= 100, case


def test_image_to_image_and_inpainting_match_diffusers(xl_pipes):
    ours, ref = xl_pipes
    image = np.random.default_rng(0).random((64, 96, 3)).astype(np.float32)
    mask = np.zeros((64, 96), np.float32)
    mask[16:48, 24:72] = 1.0
    for extra in (dict(image=image, strength=0.6), dict(image=image, mask=mask)):
        a, b = ours(PROMPT, **SETTINGS, **extra), ref(PROMPT, **SETTINGS, **extra)
        assert psnr(a.array, b.array) >= 100
        # guidance rescale: diffusers' SDXL image pipelines take it (SD 1.x's do not)
        rescaled = {**extra, "guidance_rescale": 0.7}
        c, d = ours(PROMPT, **SETTINGS, **rescaled), ref(PROMPT, **SETTINGS, **rescaled)
        assert psnr(c.array, d.array) >= 100 and psnr(c.array, a.array) < 70


def test_pytorch_s_cpu_noise_makes_diffusers_image(xl_pipes):
    """diffusers' SDXL pipeline drawing everything from its own CPU generators (sdengine.torch_noise)."""
    ours, ref = xl_pipes
    settings = {**SETTINGS, "noise_source": "torch-cpu", "scheduler": "euler_a", "batch": 2}
    assert psnr(ours(PROMPT, **settings).array, ref(PROMPT, **settings).array) >= 100
    image = np.random.default_rng(0).random((64, 96, 3)).astype(np.float32)  # image to image
    settings = {**settings, "image": image, "strength": 0.7}
    assert psnr(ours(PROMPT, **settings).array, ref(PROMPT, **settings).array) >= 100


def test_no_negative_prompt_reads_zeros_not_the_empty_prompt(xl_pipes):
    ours, _ = xl_pipes
    zeros, empty = ours(PROMPT, **SETTINGS), ours(PROMPT, "", **SETTINGS)
    assert psnr(zeros.array, empty.array) < 80


def test_the_unet_is_conditioned_on_the_size(xl_pipes):
    assert SizeConditioning().time_ids(64, 96).tolist() == [64, 96, 0, 0, 64, 96]
    ours, _ = xl_pipes
    square, wide = ours(PROMPT, **{**SETTINGS, "width": 64}), ours(PROMPT, **SETTINGS)
    assert square.array.shape[2] == 64 and wide.array.shape[2] == 96


def test_fp16_export_matches_the_fp32_one(xl_pipes, xl_checkpoint, tmp_path):
    from export.onnx_export import export_checkpoint

    export_checkpoint(xl_checkpoint, tmp_path / "fp16", precision="fp16")
    half = Pipeline.load(tmp_path / "fp16", backend="ort", device="cpu")
    a, b = half(PROMPT, **SETTINGS), xl_pipes[0](PROMPT, **SETTINGS)
    assert psnr(a.array, b.array) >= 40


def test_the_device_loop_matches_the_host_loop(xl_pipes):
    """The bound device-state loop (ORT CUDA's code on the CPU provider) binds SDXL's added inputs."""
    from sdengine.backends.ort_cuda import OrtCudaBackend

    ours, _ = xl_pipes
    bound = Pipeline(ours.model_dir, OrtCudaBackend(ours.model_dir, device="cpu"), ours.tokenizer)
    edited = {**SETTINGS, "prompt": "a [cat|dog]", "prompt_weights": "a1111"}
    for settings in (SETTINGS, {**SETTINGS, "scheduler": "euler_a", "seed": 4}, edited):
        settings = {"prompt": PROMPT, **settings}
        a, b = bound(**settings), ours(**settings)
        np.testing.assert_allclose(a.latents, b.latents, rtol=0, atol=1e-5 * float(np.abs(b.latents).max()))


def test_engine_profiles_double_both_text_encoders_and_the_added_inputs(xl_onnx):
    from sdengine.engine_keys import ProfileRequest, engine_profiles

    arch = open_onnx_dir(xl_onnx).arch
    request = ProfileRequest(batch=2, height=64, width=96)
    assert engine_profiles(arch, TEXT_ENCODER_2, request)["input_ids"][1] == (4, 77)
    unet = engine_profiles(arch, UNET, request)
    assert unet[TEXT_EMBEDS][1] == (4, 32) and unet[TIME_IDS][1] == (4, 6)
    assert unet["encoder_hidden_states"][1] == (4, 77, 64)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        (dict(clip_skip=3), "clip_skip must be in"),
    ],
)
def test_what_sdxl_does_not_run_is_refused(xl_pipes, settings, match):
    for pipe in xl_pipes:
        if getattr(pipe, "name", "") == "torch" and "clip_skip" in settings:
            continue  # torch's own error
        with pytest.raises((UnsupportedConfigError, InvalidArgumentError), match=match):
            pipe(**{"prompt": PROMPT, **SETTINGS, **settings})


def test_textual_inversion_matches_diffusers(xl_onnx, xl_checkpoint, tmp_path):
    """An SDXL embedding (clip_l and clip_g vectors, two of each) into each text encoder with its tokenizer,
    against diffusers loading each set as its documentation does; plain, weighted and edited prompts."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    vectors = {key: 0.5 * rng.standard_normal((2, 32)).astype(np.float32) for key in ("clip_l", "clip_g")}
    save_file(vectors, str(tmp_path / "xlstyle.safetensors"))
    ours = Pipeline.load(xl_onnx, backend="ort", device="cpu")
    ref = Pipeline.load(xl_checkpoint, backend="torch")
    before = ours("a photo of xlstyle", **SETTINGS)
    for pipe in (ours, ref):
        assert pipe.load_textual_inversion(tmp_path / "xlstyle.safetensors") == "xlstyle"
    for prompt, extra in (
        ("a photo of xlstyle", {}),
        ("a (photo)1.2 of xlstyle", {"prompt_weights": "compel"}),
        ("a [cat:(xlstyle:1.2):0.5]", {"prompt_weights": "a1111", "negative_prompt": "[xlstyle]"}),
    ):
        a, b = ours(prompt, **SETTINGS, **extra), ref(prompt, **SETTINGS, **extra)
        assert psnr(a.array, b.array) >= 100, prompt
    assert psnr(ours("a photo of xlstyle", **SETTINGS).array, before.array) < 60
    save_file({"emb_params": vectors["clip_l"]}, str(tmp_path / "sd.safetensors"))
    with pytest.raises(InvalidArgumentError, match="is not an SDXL embedding"):
        ours.load_textual_inversion(tmp_path / "sd.safetensors")
    save_file(
        {"clip_l": vectors["clip_l"], "clip_g": np.zeros((2, 8), np.float32)}, str(tmp_path / "w.safetensors")
    )
    with pytest.raises(InvalidArgumentError, match="made for another model"):
        ours.load_textual_inversion(tmp_path / "w.safetensors")


def test_an_sdxl_embedding_is_refused_by_a_model_with_one_text_encoder(ort_pipe_fp32, tmp_path):
    from safetensors.numpy import save_file

    zeros = np.zeros((1, 32), np.float32)
    save_file({"clip_l": zeros, "clip_g": zeros}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(InvalidArgumentError, match="is an SDXL embedding"):
        ort_pipe_fp32.load_textual_inversion(tmp_path / "xl.safetensors")


def sgm_name(layer: str) -> str:
    """A diffusers UNet layer name as kohya's SDXL LoRAs flatten it, after the original (SGM) UNet's blocks
    (the inverse of ``sdengine.lora.sgm_unet_name``, written out here by its own rules)."""
    renames = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1"}
    renames["conv_shortcut"] = "skip_connection"
    parts = layer.split(".")
    fixed = {"conv_in": "input_blocks.0.0", "conv_out": "out.2"}
    fixed |= {"time_embedding": "time_embed", "add_embedding": "label_emb.0"}
    if parts[0] in fixed:
        inner = {"linear_1": "0", "linear_2": "2"}
        return ".".join([fixed[parts[0]], *(inner.get(p, p) for p in parts[1:])]).replace(".", "_")
    if parts[0] == "mid_block":
        index = {("resnets", "0"): "0", ("attentions", "0"): "1", ("resnets", "1"): "2"}[parts[1], parts[2]]
        head, rest = f"middle_block.{index}", parts[3:]
    else:
        block, kind, k, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if parts[0] == "down_blocks":
            if kind == "downsamplers":
                head, rest = f"input_blocks.{3 * block + 3}.0", ["op"]
            else:
                head = f"input_blocks.{3 * block + k + 1}.{0 if kind == 'resnets' else 1}"
        elif kind == "upsamplers":
            head = f"output_blocks.{3 * block + 2}.2"
        else:
            head = f"output_blocks.{3 * block + k}.{0 if kind == 'resnets' else 1}"
    return ".".join([head, *(renames.get(p, p) for p in rest)]).replace(".", "_")


@pytest.fixture(scope="module")
def xl_loras(xl_onnx, tmp_path_factory):
    """The same random SDXL LoRA (attention layers of the UNet and both text encoders) in PEFT's layout and in
    kohya's, and a kohya one of every other UNet layer too (resnets, down- and upsamplers, the time and
    added-conditioning embeddings, conv_in and conv_out)."""
    from safetensors.numpy import load_file, save_file

    from export.random_lora import write_random_lora
    from sdengine.lora import named_weights

    folder = tmp_path_factory.mktemp("xl-loras")
    peft = write_random_lora(xl_onnx, folder / "peft.safetensors", seed=1, strength=0.3)
    kohya = {}
    prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    for key, tensor in load_file(str(peft)).items():
        component, _, rest = key.partition(".")
        layer, kind = rest.removesuffix(".weight").rsplit(".", 1)
        name = sgm_name(layer) if component == "unet" else layer.replace(".", "_")  # text_model_...
        down_up = {"lora_A": "lora_down", "lora_B": "lora_up"}[kind]
        kohya[f"{prefixes[component]}_{name}.{down_up}.weight"] = tensor
        kohya[f"{prefixes[component]}_{name}.alpha"] = np.array(
            tensor.shape[0 if kind == "lora_A" else 1], np.float32
        )
    save_file(kohya, str(folder / "kohya.safetensors"))
    model = onnx.load(str(xl_onnx / "unet" / "model.onnx"), load_external_data=False)
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    rng, every = np.random.default_rng(2), {}
    for layer, (name, transposed) in sorted(named_weights(model).items()):
        if "attentions" in layer:
            continue
        shape = dims[name][::-1] if transposed else dims[name]
        key = f"lora_unet_{sgm_name(layer)}"
        every[f"{key}.lora_down.weight"] = (rng.standard_normal((4, *shape[1:])) / 4).astype(np.float32)
        every[f"{key}.lora_up.weight"] = (
            0.1 * rng.standard_normal((shape[0], 4, *[1] * (len(shape) - 2)))
        ).astype(np.float32)
        every[f"{key}.alpha"] = np.array(4, np.float32)
    save_file(every, str(folder / "kohya_every_layer.safetensors"))
    return folder


@pytest.mark.parametrize("file", ["peft", "kohya", "kohya_every_layer"])
def test_lora_matches_diffusers(xl_onnx, xl_checkpoint, xl_loras, file):
    """Fused at run time into the UNet and both text encoders, against diffusers' load_lora_weights and
    fuse_lora; kohya's SGM-named UNet layers renamed as diffusers renames them."""
    plain = Pipeline.load(xl_onnx, backend="ort", device="cpu")(PROMPT, **SETTINGS)
    results = []
    for path, backend in ((xl_onnx, "ort"), (xl_checkpoint, "torch")):
        pipe = Pipeline.load(path, backend=backend, device="cpu")
        pipe.load_lora(xl_loras / f"{file}.safetensors", 0.8)
        results.append(pipe(PROMPT, **SETTINGS))
    assert psnr(results[0].array, results[1].array) >= 100
    assert psnr(results[0].array, plain.array) < 60  # the LoRA changes the image


def test_an_sdxl_lora_on_a_model_with_one_text_encoder_is_refused(ort_pipe_fp32, xl_loras):
    with pytest.raises(InvalidArgumentError, match="updates text_encoder_2, which this model does not have"):
        ort_pipe_fp32.load_lora(xl_loras / "peft.safetensors")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"addition_embed_type": "image"}, "'image' added conditioning is not supported"),
        ({"projection_class_embeddings_input_dim": 64}, "taking 4 size numbers"),  # neither base nor refiner
    ],
)
def test_other_added_conditioning_is_refused(xl_checkpoint, tmp_path, change, match):
    root = shutil.copytree(xl_checkpoint, tmp_path / "ckpt")
    config = json.loads((root / "unet" / "config.json").read_text())
    (root / "unet" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UnsupportedConfigError, match=match):
        open_checkpoint_dir(root)


def test_a_vae_with_normalised_latents_is_refused(xl_checkpoint, tmp_path):
    """Playground v2.5's VAE config: diffusers' SDXL pipeline shifts and scales its latents per channel,
    which sdengine does not; refused, not decoded as SDXL's."""
    root = shutil.copytree(xl_checkpoint, tmp_path / "ckpt")
    config = json.loads((root / "vae" / "config.json").read_text())
    stats = {"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}
    (root / "vae" / "config.json").write_text(json.dumps({**config, **stats}))
    with pytest.raises(UnsupportedConfigError, match="latents are normalised per channel"):
        open_checkpoint_dir(root)


def test_tensorrt_backend_runs_sdxl_in_captured_steps(simulated, xl_pipes, xl_onnx, tmp_path):
    """TensorRT's path with simulated engines (each runs its ONNX model; tests/fake_tensorrt.py): the second
    text encoder's engine is built and loaded, and the added inputs are bound into the captured steps."""
    from fake_tensorrt import ENV, write_plan

    from export.trt_build import build_engines
    from sdengine.backends.trt import TrtBackend

    engines = tmp_path / "engines"
    manifest = build_engines(xl_onnx, engines, batch=1, height=64, width=96, env=ENV, builder=write_plan)
    assert TEXT_ENCODER_2 in manifest.engines
    backend = TrtBackend.load(engines)
    ours = xl_pipes[0]
    pipe = Pipeline(backend.model_dir, backend, ours.tokenizer)
    edited = {**SETTINGS, "prompt": "a [cat:dog:0.5]", "prompt_weights": "a1111"}
    for settings in (SETTINGS, {**SETTINGS, "seed": 5}, {**SETTINGS, "clip_skip": 1}, edited):
        settings = {"prompt": PROMPT, **settings}
        a, b = pipe(**settings), ours(**settings)
        np.testing.assert_allclose(a.latents, b.latents, rtol=0, atol=1e-5 * float(np.abs(b.latents).max()))
    assert simulated.launches > 0 and backend.graphs_refused is None
    assert sorted(key.pooled for key in backend._graphs) == [0, 32]  # the edited run's step gives pooled


def test_info_describes_an_sdxl_export(xl_onnx):
    from sdengine.info import describe

    info = describe(xl_onnx)
    assert info["models"][TEXT_ENCODER_2] and info["architecture"]["pooled_size"] == 32
    assert info["clip_skip"] == "0 to 1" and info["lora_at_run_time"].startswith("yes")


def test_lora_fused_at_export_matches_the_run_time_fusion(xl_checkpoint, xl_onnx, xl_loras, tmp_path):
    from export.onnx_export import export_checkpoint

    kohya = xl_loras / "kohya.safetensors"
    parts = ["text_encoder", "text_encoder_2", "unet", "vae_decoder"]
    export_checkpoint(xl_checkpoint, tmp_path / "fused", components=parts, loras=[(kohya, 0.6)])
    runtime = Pipeline.load(xl_onnx, backend="ort", device="cpu")
    runtime.load_lora(kohya, 0.6)
    fused = Pipeline.load(tmp_path / "fused", backend="ort", device="cpu")
    assert psnr(fused(PROMPT, **SETTINGS).array, runtime(PROMPT, **SETTINGS).array) >= 100


@pytest.fixture(scope="module")
def xl_controlnets(xl_checkpoint, tmp_path_factory):
    """Two random SDXL ControlNets, and an export with both inside its UNet."""
    from export.controlnet import write_random_controlnet
    from export.onnx_export import export_checkpoint

    root = tmp_path_factory.mktemp("xl-controlnet")
    nets = [write_random_controlnet(xl_checkpoint, root / f"net{seed}", seed=seed) for seed in (0, 1)]
    parts = ["text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"]
    export_checkpoint(xl_checkpoint, root / "onnx", controlnets=nets, components=parts)
    return nets, root / "onnx"


def test_controlnets_match_diffusers(xl_checkpoint, xl_controlnets):
    """Two SDXL ControlNets (which read the added conditioning as the UNet does) traced into the UNet, against
    diffusers' SDXL ControlNet pipelines: text to image with per-ControlNet weights and ends, image to
    image."""
    nets, onnx_dir = xl_controlnets
    ours = Pipeline.load(onnx_dir, backend="ort", device="cpu")
    ref = Pipeline.load(xl_checkpoint, backend="torch", controlnets=nets)
    rng = np.random.default_rng(0)
    image = rng.random((64, 96, 3)).astype(np.float32)
    control = [rng.random((64, 96, 3)).astype(np.float32) for _ in nets]
    for extra in (
        dict(control_scale=[0.5, 1.2], control_end=[0.6, 1.0]),
        dict(image=image, strength=0.7),
        dict(control_scale=[0.5, 1.2], control_mode="guess"),  # diffusers' guess_mode: SDXL's 10 residuals
    ):
        settings = {**SETTINGS, "control_image": control, **extra}
        a, b = ours(PROMPT, **settings), ref(PROMPT, **settings)
        assert psnr(a.array, b.array) >= 100
    off = ours(PROMPT, **SETTINGS, control_image=control, control_scale=0.0)
    assert psnr(ours(PROMPT, **SETTINGS, control_image=control).array, off.array) < 60


def test_an_sd_controlnet_does_not_fit_sdxl(xl_checkpoint, tiny_checkpoint, tmp_path):
    from export.controlnet import check_controlnets, write_random_controlnet

    net = write_random_controlnet(tiny_checkpoint, tmp_path / "sd-net")
    with pytest.raises(UnsupportedConfigError, match="for another"):
        check_controlnets(xl_checkpoint, open_checkpoint_dir(xl_checkpoint).arch, [net])


def test_a_text_encoder_without_every_layer_is_one_line(xl_onnx, tmp_path):
    """An SDXL export whose second text encoder gives its last states alone (as another tool's might)."""
    root = shutil.copytree(xl_onnx, tmp_path / "onnx")
    model = onnx.load(str(root / TEXT_ENCODER_2 / "model.onnx"))
    kept = [o for o in model.graph.output if o.name != "hidden_states"]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    onnx.save(model, str(root / TEXT_ENCODER_2 / "model.onnx"))
    with pytest.raises(ModelDirectoryError, match="does not give hidden_states"):
        Pipeline.load(root, backend="ort", device="cpu")(PROMPT, **SETTINGS)


def test_size_conditioning_matches_diffusers(xl_pipes):
    """diffusers' original_size, crops_coords_top_left, target_size and their negative_ counterparts."""
    ours, ref = xl_pipes
    image = np.random.default_rng(0).random((64, 96, 3)).astype(np.float32)
    default = ours(PROMPT, **SETTINGS)
    for sizes in (
        dict(original_size=(512, 512), crop_top_left=(16, 8), target_size=(128, 96)),
        dict(negative_original_size=(256, 256)),
        # (diffusers' SDXL image-to-image pipeline reads the positive crop corner on the negative side too)
        dict(original_size=(1024, 1024), negative_target_size=(32, 32), image=image, strength=0.7),
    ):
        a, b = ours(PROMPT, **SETTINGS, **sizes), ref(PROMPT, **SETTINGS, **sizes)
        assert psnr(a.array, b.array) >= 100, sizes
        assert psnr(a.array, default.array) < 60  # the conditioning changed the image
    assert a.request.parameters()["size_conditioning"] == {
        "original_size": [1024, 1024],
        "negative_target_size": [32, 32],
    }


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        (dict(original_size=(0, 512)), "original_size must be two whole numbers >= 1"),
        (dict(crop_top_left=(-1, 0)), "crop_top_left must be two whole numbers >= 0"),
        (dict(target_size=(512,)), "target_size must be two whole numbers"),
    ],
)
def test_bad_size_conditioning_is_refused(xl_pipes, settings, match):
    with pytest.raises(InvalidArgumentError, match=match):
        xl_pipes[0].request(PROMPT, **settings)


def test_size_conditioning_needs_sdxl(ort_pipe_fp32):
    with pytest.raises(UnsupportedConfigError, match="original_size: SDXL's size conditioning"):
        ort_pipe_fp32.request(PROMPT, original_size=(512, 512))


def test_cli_takes_size_conditioning(xl_onnx, tmp_path, capsys):
    from sdengine.cli import main

    out = tmp_path / "xl.png"
    argv = [
        "generate",
        str(xl_onnx),
        PROMPT,
        "--steps",
        "2",
        "--original-size",
        "512,512",
        "--output",
        str(out),
    ]
    assert main(argv) == 0
    from PIL import Image

    parameters = json.loads(Image.open(out).info["sdengine"])
    assert parameters["size_conditioning"] == {"original_size": [512, 512]}
    with pytest.raises(SystemExit):
        main(["generate", str(xl_onnx), PROMPT, "--original-size", "512"])
    assert "expected two whole numbers A,B" in capsys.readouterr().err


@pytest.fixture(scope="module")
def refiner_pipes(tmp_path_factory):
    """(ONNX Runtime, torch) on a tiny random SDXL refiner: the second text encoder alone, and an aesthetic
    score among the UNet's size numbers."""
    from export.checkpoint import write_random_checkpoint
    from export.onnx_export import export_checkpoint

    root = tmp_path_factory.mktemp("refiner")
    checkpoint = write_random_checkpoint(root / "checkpoint", "tiny-xl-refiner", seed=0)
    export_checkpoint(checkpoint, root / "onnx")
    ours = Pipeline.load(root / "onnx", backend="ort", device="cpu")
    return ours, Pipeline.load(checkpoint, backend="torch")


def test_the_refiner_matches_diffusers(refiner_pipes, tmp_path):
    """Against diffusers' SDXL image-to-image and inpainting pipelines with requires_aesthetics_score (the
    refiner's), whose negative side reads the empty prompt (force_zeros_for_empty_prompt is off)."""
    from safetensors.numpy import save_file

    ours, ref = refiner_pipes
    assert ours.model_dir.arch.aesthetic and not ours.model_dir.arch.first_text_encoder
    assert not ours.model_dir.zero_negative
    rng = np.random.default_rng(0)
    image = rng.random((64, 96, 3)).astype(np.float32)
    mask = np.zeros((64, 96), np.float32)
    mask[16:48, 24:72] = 1.0
    save_file(
        {
            "clip_l": rng.standard_normal((1, 8)).astype(np.float32),
            "clip_g": rng.standard_normal((1, 32)).astype(np.float32),
        },
        str(tmp_path / "refstyle.safetensors"),
    )
    for pipe in (ours, ref):  # the refiner reads clip_g alone
        pipe.load_textual_inversion(tmp_path / "refstyle.safetensors")
    for prompt, extra in (
        (PROMPT, {}),
        (PROMPT, {"negative_prompt": "blurry", "original_size": (512, 512)}),
        ("a (red:1.3) [cat:dog:0.5], refstyle", {"prompt_weights": "a1111"}),
        ("a (red cat)1.3", {"prompt_weights": "compel", "mask": mask}),
    ):
        settings = {**SETTINGS, "image": image, "strength": 0.75, **extra}
        a, b = ours(prompt, **settings), ref(prompt, **settings)
        assert psnr(a.array, b.array) >= 100, (prompt, list(extra))


def test_the_refiner_refines_images_only(refiner_pipes):
    for pipe in refiner_pipes:
        with pytest.raises(UnsupportedConfigError, match="refiner refines images"):
            pipe.request(PROMPT, hires_scale=2.0)


@pytest.mark.parametrize("negative", [None, "blurry"])
def test_composable_prompts_give_every_part_its_pooled_embeddings_and_size_ids(xl_pipes, negative):
    """A part given twice pulls twice as hard, through SDXL's added conditioning as well (the negative side
    with sizes of its own)."""
    ours = xl_pipes[0]
    settings = dict(
        SETTINGS, negative_prompt=negative, prompt_weights="a1111", negative_original_size=(32, 48)
    )
    doubled = ours(f"{PROMPT} AND {PROMPT}", guidance=3.0, **settings)
    np.testing.assert_allclose(doubled.latents, ours(PROMPT, guidance=6.0, **settings).latents, atol=1e-4)
    assert psnr(ours(f"{PROMPT} AND a red barn", **settings).array, doubled.array) < 60
