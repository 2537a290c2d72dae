"""LoRA: files in diffusers', PEFT's and kohya's layouts, fused at run time and at export, against diffusers'
``load_lora_weights`` + ``fuse_lora`` (which needs peft, a dev dependency)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from fake_tensorrt import engine_pipeline
from safetensors.numpy import save_file

from sdengine.cli import main
from sdengine.errors import InvalidArgumentError, ModelDirectoryError, UnsupportedConfigError
from sdengine.images import psnr, read_png_parameters
from sdengine.info import describe
from sdengine.lora import METADATA_KEY, named_weights, parse_lora_arg, read_lora
from sdengine.pipeline import Pipeline

SETTINGS = dict(steps=4, seed=1, height=64, width=64)
PROMPT, NEGATIVE = "a photo of a cat", "blurry"


@pytest.fixture(scope="module")
def layer_shapes(tiny_checkpoint):
    """{component: {layer: weight shape}} for every Linear and Conv2d of the tiny checkpoint."""
    from diffusers import UNet2DConditionModel
    from torch import nn
    from transformers import CLIPTextModel

    shapes = {}
    for component, module in (
        ("unet", UNet2DConditionModel.from_pretrained(tiny_checkpoint / "unet")),
        ("text_encoder", CLIPTextModel.from_pretrained(tiny_checkpoint / "text_encoder")),
    ):
        shapes[component] = {
            path.removeprefix("text_model."): tuple(layer.weight.shape)
            for path, layer in module.named_modules()
            if isinstance(layer, nn.Linear | nn.Conv2d)
        }
    return shapes


def factors(shape, rank, rng):
    """Random (down, up) for a weight of ``shape``: a LoCon pair (kernel-sized down, 1x1 up) for a conv."""
    down = rng.standard_normal((rank, shape[1], *shape[2:])).astype(np.float32) / rank
    up = (0.1 * rng.standard_normal((shape[0], rank, *(1,) * (len(shape) - 2)))).astype(np.float32)
    return down, up


ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")


def attention_layers(shapes):
    return {name: shape for name, shape in shapes.items() if name.endswith(ATTENTION)}


@pytest.fixture(scope="module")
def loras(layer_shapes, tmp_path_factory):
    """One file per layout, each updating the UNet's and the text encoder's layers."""
    folder = tmp_path_factory.mktemp("loras")
    rng = np.random.default_rng(0)
    unet, text = layer_shapes["unet"], layer_shapes["text_encoder"]

    diffusers = {}  # diffusers' own layout; text encoder layers named as transformers 4 names them
    for name, shape in attention_layers(unet).items():
        down, up = factors(shape, 4, rng)
        diffusers[f"unet.{name}.lora.down.weight"], diffusers[f"unet.{name}.lora.up.weight"] = down, up
    for name, shape in attention_layers(text).items():
        down, up = factors(shape, 4, rng)
        key = f"text_encoder.text_model.{name}.lora_linear_layer"
        diffusers[f"{key}.down.weight"], diffusers[f"{key}.up.weight"] = down, up
    save_file(diffusers, str(folder / "diffusers.safetensors"))

    peft = {}  # PEFT's names, with alpha and per-layer ranks from the adapter metadata
    for component, shapes in (("unet", unet), ("text_encoder", text)):
        for name, shape in attention_layers(shapes).items():
            rank = 2 if name.endswith(("to_k", "k_proj")) else 4
            down, up = factors(shape, rank, rng)
            peft[f"{component}.{name}.lora_A.weight"], peft[f"{component}.{name}.lora_B.weight"] = down, up
    metadata = {
        "unet.r": 4,
        "unet.lora_alpha": 8,
        "unet.rank_pattern": {"to_k": 2},
        "unet.alpha_pattern": {"to_v": 2},
        "unet.target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
        "text_encoder.r": 4,
        "text_encoder.lora_alpha": 2,
        "text_encoder.rank_pattern": {"k_proj": 2},
        "text_encoder.target_modules": ["q_proj", "k_proj", "v_proj", "out_proj"],
    }
    save_file(peft, str(folder / "peft.safetensors"), metadata={METADATA_KEY: json.dumps(metadata)})

    # kohya-ss: flattened names, alphas, and LoCon on the resnets' 3x3 and the 1x1 projections. Its alphas
    # equal the rank: diffusers 0.42 (with peft 0.21) maps kohya's alphas for attention and text-encoder
    # layers to names no layer has and drops them (peft warns), so only alpha == rank compares with it.
    # ``kohya_alpha`` is the same LoRA with alpha = rank / 2 and twice the up weights, which kohya's
    # ``scale = alpha / rank`` makes the same update.
    kohya, halved = {}, {}
    convs = {n: s for n, s in unet.items() if n.endswith(("conv1", "conv2", "proj_in", "proj_out"))}
    for prefix, shapes in (("lora_unet", {**attention_layers(unet), **convs}), ("lora_te", text)):
        for name, shape in shapes.items():
            name = name if prefix == "lora_unet" else f"text_model.{name}"
            key = f"{prefix}_{name.replace('.', '_')}"
            down, up = factors(shape, 4, rng)
            kohya[f"{key}.lora_down.weight"], kohya[f"{key}.lora_up.weight"] = down, up
            kohya[f"{key}.alpha"] = np.array(4, np.float32)
            halved[f"{key}.lora_down.weight"], halved[f"{key}.lora_up.weight"] = down, 2 * up
            halved[f"{key}.alpha"] = np.array(2, np.float32)
    save_file(kohya, str(folder / "kohya.safetensors"))
    save_file(halved, str(folder / "kohya_alpha.safetensors"))
    return folder


def ours(onnx_dir, **kwargs):
    return Pipeline.load(onnx_dir, backend="ort", device="cpu", **kwargs)


@pytest.fixture(scope="module")
def without_lora(onnx_fp32):
    return ours(onnx_fp32)(PROMPT, NEGATIVE, **SETTINGS).array


@pytest.mark.parametrize("layout", ["diffusers", "peft", "kohya"])
def test_lora_matches_diffusers(onnx_fp32, tiny_checkpoint, loras, without_lora, layout):
    pipe, ref = ours(onnx_fp32), Pipeline.load(tiny_checkpoint, backend="torch")
    layers = {p.load_lora(loras / f"{layout}.safetensors", 0.7) for p in (pipe, ref)}
    assert len(layers) == 1
    a, b = (p(PROMPT, NEGATIVE, **SETTINGS).array for p in (pipe, ref))
    assert psnr(a, b) >= 60
    assert psnr(a, without_lora) < 45  # the LoRA did something


def test_kohya_alpha_scales_by_alpha_over_rank(onnx_fp32, loras):
    a, b = ours(onnx_fp32), ours(onnx_fp32)
    a.load_lora(loras / "kohya.safetensors", 0.7)
    b.load_lora(loras / "kohya_alpha.safetensors", 0.7)
    np.testing.assert_allclose(
        a(PROMPT, NEGATIVE, **SETTINGS).array, b(PROMPT, NEGATIVE, **SETTINGS).array, atol=1e-5
    )


def test_two_loras_then_unload(onnx_fp32, tiny_checkpoint, loras, without_lora):
    pipe, ref = ours(onnx_fp32), Pipeline.load(tiny_checkpoint, backend="torch")
    for p in (pipe, ref):
        p.load_lora(loras / "diffusers.safetensors", 0.5)
        p.load_lora(loras / "kohya.safetensors", -0.3)
    assert psnr(pipe(PROMPT, NEGATIVE, **SETTINGS).array, ref(PROMPT, NEGATIVE, **SETTINGS).array) >= 60
    pipe.unload_loras()
    np.testing.assert_array_equal(pipe(PROMPT, NEGATIVE, **SETTINGS).array, without_lora)


def test_scale_zero_changes_nothing(onnx_fp32, loras, without_lora):
    pipe = ours(onnx_fp32)
    pipe.load_lora(loras / "kohya.safetensors", 0.0)
    np.testing.assert_allclose(pipe(PROMPT, NEGATIVE, **SETTINGS).array, without_lora, atol=1e-6)


def test_with_textual_inversion(onnx_fp32, tiny_checkpoint, loras, tmp_path):
    """Both replace text-encoder weights (the token table, the attention layers): each keeps the other's."""
    toy = {"<toy>": np.random.default_rng(1).standard_normal(32).astype(np.float32)}
    save_file(toy, str(tmp_path / "toy.safetensors"))
    pipe, ref = ours(onnx_fp32), Pipeline.load(tiny_checkpoint, backend="torch")
    for p in (pipe, ref):
        p.load_lora(loras / "diffusers.safetensors", 0.8)
        p.load_textual_inversion(tmp_path / "toy.safetensors")
    a, b = (p("a photo of <toy>", NEGATIVE, **SETTINGS).array for p in (pipe, ref))
    assert psnr(a, b) >= 60


def test_bound_loop_and_optimized_cache_get_the_lora(onnx_fp32, loras, tmp_path, monkeypatch):
    from sdengine.backends.ort_cuda import OrtCudaBackend

    monkeypatch.setenv("SDENGINE_CACHE", str(tmp_path / "cache"))
    host = ours(onnx_fp32)
    bound = Pipeline(host.model_dir, OrtCudaBackend(host.model_dir, device="cpu"), host.tokenizer)
    cached = ours(onnx_fp32, optimized_cache=True)
    for p in (host, bound, cached):
        p.load_lora(loras / "kohya.safetensors", 0.6)
    expected = host(PROMPT, NEGATIVE, **SETTINGS).array
    np.testing.assert_allclose(bound(PROMPT, NEGATIVE, **SETTINGS).array, expected, atol=1e-5)
    np.testing.assert_allclose(cached(PROMPT, NEGATIVE, **SETTINGS).array, expected, atol=1e-5)


def test_export_names_every_layer_weight(onnx_fp32, onnx_fp16, layer_shapes):
    for onnx_dir in (onnx_fp32, onnx_fp16):
        for component, shapes in layer_shapes.items():
            model = onnx.load(str(onnx_dir / component / "model.onnx"), load_external_data=False)
            named = named_weights(model)
            assert set(shapes) <= set(named), set(shapes) - set(named)
            for (
                layer,
                shape,
            ) in shapes.items():  # MatMul reads a Linear weight transposed, Gemm and Conv don't
                assert not named[layer][1] or len(shape) == 2


def test_runtime_lora_matches_export_fused(tiny_checkpoint, onnx_fp32, onnx_fp16, loras, tmp_path):
    from export.onnx_export import export_checkpoint

    kohya = loras / "kohya.safetensors"
    for precision, onnx_dir, floor in (("fp32", onnx_fp32, 100), ("fp16", onnx_fp16, 50)):
        fused_dir = tmp_path / precision
        manifest = export_checkpoint(
            tiny_checkpoint,
            fused_dir,
            precision=precision,
            components=("text_encoder", "unet"),
            loras=[(kohya, 0.6)],
        )
        assert manifest.loras[0]["scale"] == 0.6 and manifest.loras[0]["file"].endswith("kohya.safetensors")
        for name in ("vae_decoder", "vae_encoder"):
            shutil.copytree(onnx_dir / name, fused_dir / name, dirs_exist_ok=True)
        assert describe(fused_dir)["manifest"]["loras_fused"] == "kohya.safetensors at 0.6"
        runtime = ours(onnx_dir)
        runtime.load_lora(kohya, 0.6)
        a, b = (p(PROMPT, NEGATIVE, **SETTINGS).array for p in (runtime, ours(fused_dir)))
        assert psnr(a, b) >= floor


def test_weights_outside_the_model_file(onnx_fp32, loras, tmp_path, monkeypatch):
    """An export whose weights sit in an external-data file (as SD 1.5's fp32 UNet's do) is run from bytes
    with its data folder given; from another working directory too."""
    external = tmp_path / "external"
    shutil.copytree(onnx_fp32, external)
    for component in ("unet", "text_encoder"):
        path = external / component / "model.onnx"
        model = onnx.load(str(path))
        onnx.save_model(
            model, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0
        )
    monkeypatch.chdir(tmp_path)
    a, b = ours(onnx_fp32), ours(external)
    for p in (a, b):
        p.load_lora(loras / "peft.safetensors", 1.0)
    np.testing.assert_allclose(a(PROMPT, **SETTINGS).array, b(PROMPT, **SETTINGS).array, atol=1e-6)


def refused(tmp_path, name, tensors, metadata=None):
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_refusals_leave_the_pipeline_as_it_was(onnx_fp32, loras, layer_shapes, without_lora, tmp_path):
    pipe = ours(onnx_fp32)
    pipe.load_lora(loras / "diffusers.safetensors", 0.0)
    z = np.zeros((4, 32), np.float32)
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    cases = [
        (tmp_path / "missing.safetensors", InvalidArgumentError, "does not exist"),
        (refused(tmp_path, "loha", {"lora_unet_x.hada_w1_a": z}), UnsupportedConfigError, "LyCORIS LoHa"),
        (
            refused(tmp_path, "odd", {"model.diffusion.weight": z}),
            InvalidArgumentError,
            "is not a LoRA layer",
        ),
        (refused(tmp_path, "half", {f"{q}.lora.down.weight": z}), InvalidArgumentError, "lacks its up"),
        (
            refused(
                tmp_path, "other", {"unet.nowhere.lora.down.weight": z, "unet.nowhere.lora.up.weight": z.T}
            ),
            InvalidArgumentError,
            "names no layer of this unet",
        ),
        (
            refused(
                tmp_path,
                "wide",
                {f"{q}.lora.down.weight": np.zeros((4, 64), np.float32), f"{q}.lora.up.weight": z.T},
            ),
            InvalidArgumentError,
            "made for another model",
        ),
        (
            refused(
                tmp_path,
                "dora",
                {f"{q}.lora.down.weight": z, f"{q}.lora.up.weight": z.T},
                {METADATA_KEY: json.dumps({"unet.use_dora": True})},
            ),
            UnsupportedConfigError,
            "DoRA",
        ),
    ]
    te = "text_encoder.encoder.layers.0.self_attn.q_proj.lora_linear_layer"  # a good layer, then a bad one
    mixed = {f"{te}.down.weight": z, f"{te}.up.weight": z.T + 1, "unet.nowhere.lora.down.weight": z}
    mixed["unet.nowhere.lora.up.weight"] = z.T
    cases.append((refused(tmp_path, "mixed", mixed), InvalidArgumentError, "names no layer of this unet"))
    te2 = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"  # an SDXL LoRA's second text encoder
    sdxl = {f"{te2}.lora_down.weight": z, f"{te2}.lora_up.weight": z.T}
    cases.append(
        (refused(tmp_path, "sdxl", sdxl), InvalidArgumentError, "updates text_encoder_2, which this")
    )
    for path, error, message in cases:
        with pytest.raises(error, match=message):
            pipe.load_lora(path)
    np.testing.assert_allclose(pipe(PROMPT, NEGATIVE, **SETTINGS).array, without_lora, atol=1e-6)
    with pytest.raises(InvalidArgumentError, match="read as .safetensors only"):
        read_lora(__file__)


def test_exports_without_layer_names_are_told_to_export_again(onnx_fp32, loras, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(onnx_fp32, old)
    path = old / "unet" / "model.onnx"
    model = onnx.load(str(path))
    for i, tensor in enumerate(model.graph.initializer):  # the names an export had before layers were named
        if tensor.name.endswith((".weight", ".weight.T")):
            for node in model.graph.node:
                node.input[:] = [f"onnx::w{i}" if n == tensor.name else n for n in node.input]
            tensor.name = f"onnx::w{i}"
    onnx.save(model, str(path))
    with pytest.raises(ModelDirectoryError, match="export the checkpoint again"):
        ours(old).load_lora(loras / "diffusers.safetensors")
    assert describe(old)["lora_at_run_time"].startswith("no (its weights carry no layer names")
    assert describe(onnx_fp32)["lora_at_run_time"] == "yes (ONNX Runtime backends)"


def test_tensorrt_engines_refuse_lora_at_run_time(simulated, onnx_fp32, loras, tmp_path):
    engines = tmp_path / "engines"
    pipe = engine_pipeline(onnx_fp32, engines, batch=1, height=64, width=64)
    with pytest.raises(UnsupportedConfigError, match="sdengine export --lora"):
        pipe.load_lora(loras / "diffusers.safetensors")


def test_cli_lora(onnx_fp32, tiny_checkpoint, loras, tmp_path, capsys):
    args = ["generate", str(onnx_fp32), PROMPT, "--steps", "2", "--height", "64", "--width", "64"]
    out = tmp_path / "cat.png"
    assert (
        main([*args, "--lora", f"{loras / 'kohya.safetensors'}:0.5", "--device", "cpu", "--output", str(out)])
        == 0
    )
    assert f"layers from {loras / 'kohya.safetensors'} at scale 0.5" in capsys.readouterr().out
    assert read_png_parameters(out)["loras"] == [{"file": "kohya.safetensors", "scale": 0.5}]
    assert main([*args, "--lora", str(tmp_path / "none.safetensors:0.5"), "--device", "cpu"]) == 1
    assert "none.safetensors does not exist" in capsys.readouterr().err


def test_parse_lora_arg(tmp_path):
    assert parse_lora_arg("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora_arg("style.safetensors:0.4") == ("style.safetensors", 0.4)
    assert parse_lora_arg("C:/x/style.safetensors:-1") == ("C:/x/style.safetensors", -1.0)
    odd = tmp_path / "a:0.5"
    odd.write_bytes(b"")
    assert parse_lora_arg(str(odd)) == (str(odd), 1.0)  # a file of that name exists: taken whole


def test_a_model_that_fails_to_open_undoes_the_whole_lora(onnx_fp32, loras, without_lora, monkeypatch):
    """The text encoder takes the LoRA, then the UNet's session refuses it (as one over 2 GB would): both
    go back to what they ran before, and the pipeline goes on."""
    from sdengine.backends import ort as ort_backend

    def too_big(path, replaced):
        if "unet" in str(path):
            raise UnsupportedConfigError(f"{path}: with its replaced weights inside, too big")
        return real(path, replaced)

    real = ort_backend.model_with_initializers
    pipe = ours(onnx_fp32)
    monkeypatch.setattr(ort_backend, "model_with_initializers", too_big)
    with pytest.raises(UnsupportedConfigError, match="too big"):
        pipe.load_lora(loras / "diffusers.safetensors")
    np.testing.assert_array_equal(pipe(PROMPT, NEGATIVE, **SETTINGS).array, without_lora)


def test_name_weights_finds_each_layer_and_skips_twins(tmp_path):
    """Each Linear and Conv2d weight is named from its value, in whichever layout the exporter stored it;
    two layers with one value are ambiguous and keep their names."""
    import torch
    from torch import nn

    from export.weight_names import name_weights

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.proj = nn.Linear(8, 8)  # reads a 3-D input: MatMul, weight transposed
            self.head = nn.Linear(8, 5)
            self.twin_a, self.twin_b = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)
            self.twin_b.weight.data.copy_(self.twin_a.weight.data)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x).flatten(2).transpose(1, 2)
            return self.head(self.proj(h) + self.twin_a(h) + self.twin_b(h))

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.unet = Toy()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.unet(x)

    wrapper, path = Wrapper().eval(), tmp_path / "toy.onnx"
    x = torch.randn(1, 3, 6, 6)
    torch.onnx.export(wrapper, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"])
    model = onnx.load(str(path))
    assert name_weights(model, wrapper) == 3
    named = named_weights(model)
    assert named["conv"] == ("conv.weight", False) and named["proj"] == ("proj.weight.T", True)
    assert "head" in named and "twin_a" not in named and "twin_b" not in named
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], wrapper(x).detach().numpy(), atol=1e-5)
    # the weights left on disk (as an export over 2 GB keeps them) are read from there, one at a time
    onnx.save_model(
        onnx.load(str(path)),
        str(tmp_path / "ext.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=False,
        size_threshold=0,
    )
    on_disk = onnx.load(str(tmp_path / "ext.onnx"), load_external_data=False)
    assert name_weights(on_disk, wrapper, tmp_path) == 3 and named_weights(on_disk) == named


def test_info_describes_a_lora_file(loras, layer_shapes):
    info = describe(loras / "kohya.safetensors")
    convs = [n for n, s in layer_shapes["unet"].items() if len(s) == 4 and s[2:] != (1, 1)]
    assert info["kind"] == "lora" and info["unet"]["layout"] == "kohya-ss"
    assert info["unet"]["kernel_layers"] == len([n for n in convs if n.endswith(("conv1", "conv2"))]) > 0
    assert info["text_encoder"]["layers"] == len(layer_shapes["text_encoder"])
    assert info["unet"]["ranks"] == "4" and info["unet"]["alpha_over_rank"] == "1"
    peft = describe(loras / "peft.safetensors")["unet"]
    assert (
        peft["layout"] == "diffusers/PEFT"
        and peft["ranks"] == "2, 4"
        and peft["alpha_over_rank"] == "0.5, 2, 4"
    )


def test_export_refuses_a_foreign_lora_before_exporting_anything(tiny_checkpoint, tmp_path):
    from export.onnx_export import export_checkpoint

    z = np.zeros((4, 32), np.float32)
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    for name, tensors, message in (
        ("other", {"unet.nowhere.lora.down.weight": z, "unet.nowhere.lora.up.weight": z.T}, "names no layer"),
        (
            "wide",
            {f"{q}.lora.down.weight": np.zeros((4, 64), np.float32), f"{q}.lora.up.weight": z.T},
            "another",
        ),
    ):
        out = tmp_path / name
        with pytest.raises(InvalidArgumentError, match=message):
            export_checkpoint(tiny_checkpoint, out, loras=[(refused(tmp_path, name, tensors), 1.0)])
        assert not out.exists()
