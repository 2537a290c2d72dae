"""IP-Adapter: a random adapter and image encoder, traced into the exported UNet, against diffusers'
``load_ip_adapter`` pipelines."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from PIL import Image
from test_controlnet import controlnet_dirs  # noqa: F401 (a fixture)

from sdengine.cli import main
from sdengine.errors import InvalidArgumentError, ModelDirectoryError, UnsupportedConfigError
from sdengine.images import psnr
from sdengine.model_specs import IMAGE_EMBEDS, IMAGE_ENCODER, IP_ADAPTER_SCALE, UNET
from sdengine.pipeline import Pipeline

PROMPT = "a photo of a cat"
SETTINGS = dict(steps=8, seed=3, height=64, width=64)
IMAGE = np.random.default_rng(0).random((48, 80, 3)).astype(np.float32)  # not square: resized and cropped


@pytest.fixture(scope="module")
def adapter(tiny_checkpoint, tmp_path_factory):
    from export.ip_adapter import write_random_ip_adapter

    return write_random_ip_adapter(tiny_checkpoint, tmp_path_factory.mktemp("ip") / "adapter")


@pytest.fixture(scope="module")
def ip_onnx(tiny_checkpoint, adapter, tmp_path_factory):
    from export.onnx_export import export_checkpoint

    out = tmp_path_factory.mktemp("ip") / "onnx"
    export_checkpoint(tiny_checkpoint, out, ip_adapter=adapter)
    return out


@pytest.fixture(scope="module")
def ip_pipes(ip_onnx, tiny_checkpoint, adapter):
    """(ONNX Runtime on the CPU, diffusers with load_ip_adapter)."""
    ours = Pipeline.load(ip_onnx, backend="ort", device="cpu")
    return ours, Pipeline.load(tiny_checkpoint, backend="torch", ip_adapter=adapter)


def test_the_export_holds_the_adapter_and_its_image_encoder(ip_onnx, ip_pipes, adapter):
    unet = onnx.load(str(ip_onnx / UNET / "model.onnx"), load_external_data=False)
    assert [i.name for i in unet.graph.input][-2:] == [IMAGE_EMBEDS, IP_ADAPTER_SCALE]
    assert (ip_onnx / IMAGE_ENCODER / "model.onnx").is_file()
    config = json.loads((ip_onnx / "ip_adapter" / "config.json").read_text())
    assert config["file"] == str(adapter.resolve()) and config["image_embeds"] == 32
    arch = ip_pipes[0].model_dir.arch
    assert arch.ip_adapter and (arch.ip_image_embeds, arch.ip_image_size) == (32, 32)
    from sdengine.info import describe

    assert describe(ip_onnx)["ip_adapter"] == "ip-adapter.safetensors: takes an image prompt"
    processors = ip_pipes[1].pipe.unet.attn_processors.values()
    assert sum(hasattr(p, "to_k_ip") for p in processors) == 16  # every cross-attention layer


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"ip_adapter_scale": 0.5, "batch": 2, "negative_prompt": "blurry"},
        {"guidance": 1.0},
        {"scheduler": "euler_a"},
        {"image": "random", "strength": 0.6},
        {"prompt_weights": "a1111", "prompt": "a [cat:dog:0.5]"},  # every call's text, the same image
    ],
    ids=lambda extra: "-".join(extra) or "plain",
)
def test_an_image_prompt_matches_diffusers(ip_pipes, extra):
    extra = dict(extra)
    prompt = extra.pop("prompt", PROMPT)
    if extra.get("image") == "random":
        extra["image"] = np.random.default_rng(1).random((64, 64, 3)).astype(np.float32)
    ours, ref = ip_pipes
    a = ours(prompt, **SETTINGS, ip_adapter_image=IMAGE, **extra)
    b = ref(prompt, **SETTINGS, ip_adapter_image=IMAGE, **extra)
    assert psnr(a.array, b.array) >= 100
    assert a.request.parameters()["ip_adapter_scale"] == extra.get("ip_adapter_scale", 1.0)


def test_the_image_prompt_steers_and_without_one_the_model_is_itself(ip_pipes, ort_pipe_fp32):
    ours, ref = ip_pipes
    without = ours(PROMPT, **SETTINGS)
    assert psnr(without.array, ort_pipe_fp32(PROMPT, **SETTINGS).array) >= 100  # scale 0: no adapter
    assert psnr(without.array, ref(PROMPT, **SETTINGS).array) >= 100
    steered = ours(PROMPT, **SETTINGS, ip_adapter_image=IMAGE)
    other = ours(PROMPT, **SETTINGS, ip_adapter_image=1 - IMAGE)
    assert psnr(steered.array, without.array) < 60 and psnr(steered.array, other.array) < 60
    zero = ours(PROMPT, **SETTINGS, ip_adapter_image=IMAGE, ip_adapter_scale=0.0)
    np.testing.assert_allclose(zero.array, without.array, atol=1e-5)


@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
def test_a_plus_adapter_reads_every_token_and_matches_diffusers(tiny_checkpoint, tmp_path, xl):
    """The Plus kind (a resampler over every token of the encoder's penultimate layer; the negative side the
    encoder's states of an all-zero input), as diffusers runs ``ip-adapter-plus_sd15``."""
    from export.checkpoint import write_random_checkpoint
    from export.ip_adapter import write_random_ip_adapter
    from export.onnx_export import export_checkpoint

    checkpoint = write_random_checkpoint(tmp_path / "xl", "tiny-xl", seed=0) if xl else tiny_checkpoint
    adapter = write_random_ip_adapter(checkpoint, tmp_path / "plus", kind="plus")
    export_checkpoint(checkpoint, tmp_path / "onnx", ip_adapter=adapter)
    ours = Pipeline.load(tmp_path / "onnx", backend="ort", device="cpu")
    assert ours.model_dir.arch.ip_embeds_shape == (17, 32)  # (32 / 8)^2 patches and the class token
    ref = Pipeline.load(checkpoint, backend="torch", ip_adapter=adapter)
    for extra in (
        {"ip_adapter_image": IMAGE},
        {"ip_adapter_image": IMAGE, "ip_adapter_scale": 0.6, "batch": 2},
        {},
    ):
        settings = {**SETTINGS, "width": 96 if xl else 64, **extra}
        assert psnr(ours(PROMPT, **settings).array, ref(PROMPT, **settings).array) >= 100


def test_an_sdxl_image_prompt_matches_diffusers(tmp_path):
    from export.checkpoint import write_random_checkpoint
    from export.ip_adapter import write_random_ip_adapter
    from export.onnx_export import export_checkpoint

    checkpoint = write_random_checkpoint(tmp_path / "xl", "tiny-xl", seed=0)
    adapter = write_random_ip_adapter(checkpoint, tmp_path / "adapter-xl")
    components = ["text_encoder", "text_encoder_2", "unet", "vae_decoder", IMAGE_ENCODER]
    export_checkpoint(checkpoint, tmp_path / "onnx", ip_adapter=adapter, components=components)
    ours = Pipeline.load(tmp_path / "onnx", backend="ort", device="cpu")
    ref = Pipeline.load(checkpoint, backend="torch", ip_adapter=adapter)
    for extra in ({}, {"ip_adapter_scale": 0.7, "negative_prompt": "blurry"}):
        settings = {**SETTINGS, "width": 96, "ip_adapter_image": IMAGE, **extra}
        assert psnr(ours(PROMPT, **settings).array, ref(PROMPT, **settings).array) >= 100


def test_the_device_loop_binds_the_image_prompt(ip_pipes):
    """ONNX Runtime's CUDA backend's bound loop (here on the CPU): the image prompt's inputs are constant
    inputs of the captured step, as they are of the host loop's UNet calls."""
    from sdengine.backends.ort_cuda import OrtCudaBackend

    ours, _ = ip_pipes
    bound = Pipeline(ours.model_dir, OrtCudaBackend(ours.model_dir, device="cpu"), ours.tokenizer)
    for extra in ({"ip_adapter_image": IMAGE}, {}):
        a, b = bound(PROMPT, **SETTINGS, **extra), ours(PROMPT, **SETTINGS, **extra)
        assert psnr(a.array, b.array) >= 100


def test_the_image_prompt_on_simulated_tensorrt(simulated, ip_pipes, ip_onnx, tmp_path):
    """TensorRT's path with simulated engines (tests/fake_tensorrt.py): the UNet's engine takes the image
    prompt's inputs; the image encoder runs on ONNX Runtime, as the safety checker does."""
    from fake_tensorrt import engine_pipeline

    ours = ip_pipes[0]
    pipe = engine_pipeline(ip_onnx, tmp_path / "engines", ours.tokenizer, batch=1, height=64, width=64)
    backend = pipe.backend
    assert pipe.ip_adapter
    for extra in ({"ip_adapter_image": IMAGE, "ip_adapter_scale": 0.8}, {}):
        a, b = pipe(PROMPT, **SETTINGS, **extra), ours(PROMPT, **SETTINGS, **extra)
        np.testing.assert_allclose(a.latents, b.latents, rtol=0, atol=1e-5 * float(np.abs(b.latents).max()))
    assert simulated.launches > 0 and backend.graphs_refused is None


def test_what_is_refused(ip_pipes, ort_pipe_fp32, onnx_fp32, tiny_checkpoint, adapter, tmp_path):
    from safetensors.numpy import save_file

    from export.ip_adapter import check_ip_adapter
    from export.onnx_export import export_checkpoint

    ours, _ = ip_pipes
    with pytest.raises(InvalidArgumentError, match="an image prompt needs an IP-Adapter"):
        ort_pipe_fp32.request(PROMPT, ip_adapter_image=IMAGE)
    with pytest.raises(InvalidArgumentError, match="ip_adapter_scale weighs an image prompt"):
        ours.request(PROMPT, ip_adapter_scale=0.5)
    with pytest.raises(InvalidArgumentError, match="must be one RGB image"):
        ours.request(PROMPT, ip_adapter_image=np.stack([IMAGE, IMAGE]))
    with pytest.raises(InvalidArgumentError, match="ip_adapter_scale must be a finite number"):
        ours.request(PROMPT, ip_adapter_image=IMAGE, ip_adapter_scale=float("nan"))
    with pytest.raises(InvalidArgumentError, match="only the torch backend takes it at load"):
        Pipeline.load(onnx_fp32, backend="ort", device="cpu", ip_adapter=adapter)
    with pytest.raises(InvalidArgumentError, match="export with --ip-adapter"):
        export_checkpoint(tiny_checkpoint, tmp_path / "x", components=[IMAGE_ENCODER])
    faceid = tmp_path / "faceid" / "ip-adapter-faceid.safetensors"
    faceid.parent.mkdir()
    projection = {f"image_proj.{k}": np.zeros((4, 4), np.float32) for k in ("proj.0.weight", "proj.2.weight")}
    save_file({**projection, "image_proj.norm.weight": np.zeros(4, np.float32)}, str(faceid))
    with pytest.raises(UnsupportedConfigError, match="FaceID's, which read a face model's embedding"):
        check_ip_adapter(tiny_checkpoint, faceid)
    lonely = tmp_path / "lonely" / "ip-adapter.safetensors"
    lonely.parent.mkdir()
    lonely.write_bytes(adapter.read_bytes())
    with pytest.raises(ModelDirectoryError, match="no image encoder beside it"):
        check_ip_adapter(tiny_checkpoint, lonely)
    with pytest.raises(ModelDirectoryError, match="does not exist"):
        check_ip_adapter(tiny_checkpoint, tmp_path / "nothing.safetensors")


def test_an_adapter_for_another_architecture_is_refused(adapter, tmp_path):
    from export.checkpoint import write_random_checkpoint
    from export.ip_adapter import check_ip_adapter

    xl = write_random_checkpoint(tmp_path / "xl", "tiny-xl", seed=0)
    with pytest.raises(UnsupportedConfigError, match="made for another Stable Diffusion architecture"):
        check_ip_adapter(xl, adapter)  # tiny's tokens are 32 wide, tiny-xl's cross attention 64


def test_cli_makes_exports_and_generates_with_an_image_prompt(tiny_checkpoint, tmp_path, capsys):
    adapter_dir, onnx_dir, out = tmp_path / "adapter", tmp_path / "onnx", tmp_path / "cat.png"
    assert main(["make-ip-adapter", str(tiny_checkpoint), str(adapter_dir)]) == 0
    adapter = adapter_dir / "ip-adapter.safetensors"
    assert (
        main(["export", str(tiny_checkpoint), "--output", str(onnx_dir), "--ip-adapter", str(adapter)]) == 0
    )
    assert "image_encoder" in capsys.readouterr().out
    Image.fromarray((IMAGE * 255).astype(np.uint8)).save(tmp_path / "style.png")
    args = ["generate", str(onnx_dir), PROMPT, "--steps", "2", "--height", "64", "--width", "64", "--device"]
    args += ["cpu", "--ip-adapter-image", str(tmp_path / "style.png"), "--ip-adapter-scale", "0.6"]
    assert main([*args, "--output", str(out)]) == 0
    parameters = json.loads(Image.open(out).info["sdengine"])
    assert parameters["ip_adapter_scale"] == 0.6 and parameters["ip_adapter_image"] == "style.png"


def test_bench_runs_the_image_prompt_on_both(ip_onnx, tmp_path):
    out = tmp_path / "r.json"
    args = ["bench", str(ip_onnx), "--device", "cpu", "--runs", "1", "--warmup", "0", "--steps", "2"]
    assert main([*args, "--height", "64", "--width", "64", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["ip_adapter"].endswith("ip-adapter.safetensors")
    assert report["backends"]["ort"]["psnr_vs_torch_db"] >= 100  # the same image prompt, the same adapter
    assert report["flops_per_call"] == {}


def test_info_describes_an_adapter_file(adapter, tiny_checkpoint, tmp_path):
    from export.ip_adapter import write_random_ip_adapter
    from sdengine.info import describe

    info = describe(adapter)
    assert (info["kind"], info["adapter_kind"], info["tokens_per_image"], info["token_width"]) == (
        "ip-adapter",
        "plain",
        4,
        32,
    )
    assert info["attention_layers"] == 16 and info["image_encoder"].endswith("image_encoder")
    plus = describe(write_random_ip_adapter(tiny_checkpoint, tmp_path / "plus", kind="plus"))
    assert (plus["adapter_kind"], plus["tokens_per_image"]) == ("plus", 16)


def test_an_image_prompt_with_a_controlnet_matches_diffusers(
    tiny_checkpoint,
    adapter,
    controlnet_dirs,  # noqa: F811 (the fixture)
    tmp_path,
):
    """A ControlNet and an IP-Adapter in one UNet: the ControlNet reads the text alone, the UNet the image
    prompt too, as in diffusers' ControlNet pipeline."""
    from export.onnx_export import export_checkpoint

    components = ["text_encoder", "unet", "vae_decoder", IMAGE_ENCODER]
    out = tmp_path / "onnx"
    export_checkpoint(
        tiny_checkpoint, out, ip_adapter=adapter, controlnets=controlnet_dirs[:1], components=components
    )
    ours = Pipeline.load(out, backend="ort", device="cpu")
    ref = Pipeline.load(tiny_checkpoint, backend="torch", ip_adapter=adapter, controlnets=controlnet_dirs[:1])
    control = np.random.default_rng(1).random((64, 64, 3)).astype(np.float32)
    settings = {**SETTINGS, "control_image": control, "ip_adapter_image": IMAGE}
    assert psnr(ours(PROMPT, **settings).array, ref(PROMPT, **settings).array) >= 100


def test_an_image_prompt_with_a_lora_matches_diffusers(ip_onnx, tiny_checkpoint, adapter, tmp_path):
    """A LoRA fused at run time into a UNet that holds an IP-Adapter (its own layers untouched)."""
    from export.random_lora import write_random_lora

    lora = write_random_lora(ip_onnx, tmp_path / "style.safetensors", seed=2)
    ours = Pipeline.load(ip_onnx, backend="ort", device="cpu")
    ref = Pipeline.load(tiny_checkpoint, backend="torch", ip_adapter=adapter)
    assert ours.load_lora(lora, 0.8) == ref.load_lora(lora, 0.8) > 0
    settings = {**SETTINGS, "ip_adapter_image": IMAGE}
    assert psnr(ours(PROMPT, **settings).array, ref(PROMPT, **settings).array) >= 100


def test_composable_prompts_give_every_part_the_image_prompt(ip_pipes):
    ours = ip_pipes[0]
    settings = dict(SETTINGS, ip_adapter_image=IMAGE, prompt_weights="a1111")
    doubled = ours(f"{PROMPT} AND {PROMPT}", guidance=3.0, **settings)
    np.testing.assert_allclose(doubled.latents, ours(PROMPT, guidance=6.0, **settings).latents, atol=1e-4)
