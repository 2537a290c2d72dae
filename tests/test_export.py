"""Export: each ONNX model matches its PyTorch module, at several shapes, in fp32 and fp16."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.checkpoint import checkpoint_hash
from export.onnx_export import _save, export_checkpoint
from export.wrappers import load_export_module, sample_inputs, text_vocab_size
from sdengine.errors import InvalidArgumentError, ModelDirectoryError
from sdengine.manifest import MANIFEST_NAME, Manifest, file_sha256
from sdengine.model_dir import open_checkpoint_dir
from sdengine.model_specs import COMPONENTS, UNET

# (batch, height, width): square and non-square, latent sizes that are and are not multiples of 8.
SHAPES = [(1, 64, 64), (2, 48, 80), (3, 72, 40)]


def rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual.astype(np.float64) - expected).max() / np.abs(expected).max())


def run_both(checkpoint, onnx_dir, name, batch, height, width):
    arch = open_checkpoint_dir(checkpoint).arch
    inputs = sample_inputs(
        arch,
        name,
        batch=batch,
        height=height,
        width=width,
        seed=batch,
        vocab_size=text_vocab_size(checkpoint),
    )
    module = load_export_module(checkpoint, name)
    with torch.no_grad():
        expected = module(*inputs.values())
    expected = expected if isinstance(expected, tuple) else (expected,)
    session = ort.InferenceSession(str(onnx_dir / name / "model.onnx"), providers=["CPUExecutionProvider"])
    actual = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    return actual, [e.numpy() for e in expected]


@pytest.mark.parametrize("name", COMPONENTS)
def test_fp32_components_match_pytorch(tiny_checkpoint, onnx_fp32, name):
    for batch, height, width in SHAPES:
        actual, expected = run_both(tiny_checkpoint, onnx_fp32, name, batch, height, width)
        for a, e in zip(actual, expected, strict=True):
            assert a.shape == e.shape
            assert rel_error(a, e) <= 1e-4, (name, batch, height, width)


@pytest.mark.parametrize("name", COMPONENTS)
def test_fp16_components_match_pytorch(tiny_checkpoint, onnx_fp16, name):
    for batch, height, width in SHAPES[:2]:
        actual, expected = run_both(tiny_checkpoint, onnx_fp16, name, batch, height, width)
        for a, e in zip(actual, expected, strict=True):
            assert a.dtype == np.float32  # fp16 models keep float32 inputs and outputs
            assert rel_error(a, e) <= 1e-2, (name, batch, height, width)


def test_fp16_models_hold_fp16_weights_and_fp32_normalisations(onnx_fp16):
    model = onnx.load(str(onnx_fp16 / "vae_decoder" / "model.onnx"))
    types = {i.data_type for i in model.graph.initializer if len(i.dims) >= 2}
    assert onnx.TensorProto.FLOAT16 in types
    norms = [n for n in model.graph.node if n.op_type == "InstanceNormalization"]
    assert norms
    producers = {out: node for node in model.graph.node for out in node.output}
    for norm in norms:  # every input of every normalisation is cast to float32 first
        casts = [producers.get(i) for i in norm.input]
        assert all(
            c is not None and c.op_type == "Cast" and c.attribute[0].i == onnx.TensorProto.FLOAT
            for c in casts
        ), norm.name


def test_fp16_unet_keeps_its_timestep_embedding_in_float32(onnx_fp16, onnx_fp32):
    """What the UNet computes from the timestep alone (the sinusoidal embedding, the layers that project it)
    stays float32, without a float16 round trip between two such nodes; the activations are float16. At a
    late timestep, where float16 arguments lose most, the UNet comes out closer to float32 than the same
    model converted without it."""
    from export.fp16 import convert_to_fp16

    def nodes(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
        return [n for n in model.graph.node if n.op_type == op_type]

    half = onnx.load(str(onnx_fp16 / "unet" / "model.onnx"))
    types = {v.name: v.type.tensor_type.elem_type for v in half.graph.value_info}
    for node in nodes(half, "Sin") + nodes(half, "Cos"):  # time_proj's
        assert types[node.input[0]] == types[node.output[0]] == onnx.TensorProto.FLOAT, node.name
    weights = {t.name: t.data_type for t in half.graph.initializer}
    assert weights["time_embedding.linear_1.weight"] == onnx.TensorProto.FLOAT
    assert weights["down_blocks.0.resnets.0.conv1.weight"] == onnx.TensorProto.FLOAT16
    producers = {out: node for node in half.graph.node for out in node.output}
    for cast in nodes(half, "Cast"):
        first = producers.get(cast.input[0])
        round_trip = first is not None and first.op_type == "Cast" and first.input[0] in types
        assert not (round_trip and types[first.input[0]] == cast.attribute[0].i == onnx.TensorProto.FLOAT)

    single = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_fp32 / "unet" / "model.onnx")))
    plain_half = onnx.ModelProto()
    plain_half.CopyFrom(single)  # (the converter converts the model it is given)
    plain_half = convert_to_fp16(plain_half)  # every node but the blocked ops in float16
    rng = np.random.default_rng(0)
    text = single.graph.input[2].type.tensor_type.shape.dim[2].dim_value
    feeds = {
        "sample": rng.standard_normal((2, 4, 16, 16)).astype(np.float32),
        "timestep": np.array(999, np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, text)).astype(np.float32),
    }

    def run(model: onnx.ModelProto) -> np.ndarray:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, feeds)[0]

    reference = run(single)
    assert rel_error(run(half), reference) < 0.7 * rel_error(run(plain_half), reference)


def test_layout_manifest_and_checker(tiny_checkpoint, onnx_fp32):
    manifest = Manifest.read(onnx_fp32)
    assert manifest is not None
    assert manifest.source_hash == checkpoint_hash(tiny_checkpoint)
    assert manifest.precision == "fp32" and manifest.opset >= 17
    assert {"torch", "diffusers", "onnx", "onnxruntime", "sdengine"} <= set(manifest.tool_versions)
    assert set(manifest.components) == set(COMPONENTS)
    for name, record in manifest.components.items():
        path = onnx_fp32 / record.path
        assert record.path == f"{name}/model.onnx"
        assert record.sha256 == file_sha256(path)
        onnx.checker.check_model(str(path))
        model = onnx.load(str(path), load_external_data=False)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
        assert [i.name for i in model.graph.input] == list(record.inputs)
        assert record.peak_rss_bytes > 0 and record.export_seconds > 0
    for side in (
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "vae_decoder/config.json",
        "text_encoder/config.json",
    ):
        assert (onnx_fp32 / side).is_file(), side
    assert json.loads((onnx_fp32 / MANIFEST_NAME).read_text())["format"] == 1


def test_unet_has_dynamic_batch_height_width(onnx_fp32):
    model = onnx.load(str(onnx_fp32 / UNET / "model.onnx"), load_external_data=False)
    sample = next(i for i in model.graph.input if i.name == "sample")
    dims = [d.dim_param or d.dim_value for d in sample.type.tensor_type.shape.dim]
    assert dims == ["batch", 4, "latent_height", "latent_width"]


def test_external_data_is_one_file(onnx_fp32, tmp_path):
    model = onnx.load(str(onnx_fp32 / UNET / "model.onnx"))
    target = tmp_path / "unet" / "model.onnx"
    location = _save(model, target, threshold=0)
    assert location == "model.onnx.data"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    onnx.checker.check_model(str(target))
    feed = {
        "sample": np.ones((1, 4, 8, 8), np.float32),
        "timestep": np.array(10.0, np.float32),
        "encoder_hidden_states": np.ones((1, 77, 32), np.float32),
    }
    runs = [
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feed)[0]
        for p in (onnx_fp32 / UNET / "model.onnx", target)
    ]
    np.testing.assert_array_equal(runs[0], runs[1])


def test_export_rejects_bad_arguments(tiny_checkpoint, tmp_path):
    with pytest.raises(InvalidArgumentError, match="precision"):
        export_checkpoint(tiny_checkpoint, tmp_path / "o", precision="int4")
    with pytest.raises(InvalidArgumentError, match="opset"):
        export_checkpoint(tiny_checkpoint, tmp_path / "o", opset=13)
    with pytest.raises(InvalidArgumentError, match="component"):
        export_checkpoint(tiny_checkpoint, tmp_path / "o", components=["unet", "text_decoder"])
    with pytest.raises(ModelDirectoryError, match="does not exist"):
        export_checkpoint(tmp_path / "nowhere", tmp_path / "o")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model_index.json").write_text("{}")
    with pytest.raises(ModelDirectoryError, match="incomplete"):
        export_checkpoint(tmp_path / "half", tmp_path / "o")


def test_weights_saved_as_a_variant_are_found(tiny_checkpoint, tmp_path):
    """A checkpoint downloaded with ``variant="fp16"`` holds only ``*.fp16.safetensors``."""
    import shutil

    from sdengine.model_dir import weights_variant
    from sdengine.pipeline import Pipeline

    variant = tmp_path / "variant"
    shutil.copytree(tiny_checkpoint, variant)
    for folder in ("text_encoder", "unet", "vae"):
        for weights in (variant / folder).glob("*.safetensors"):
            weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
        assert weights_variant(variant / folder) == "fp16"
    assert weights_variant(tiny_checkpoint / "unet") is None
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "diffusion_pytorch_model.safetensors.index.fp16.json").write_text("{}")
    assert weights_variant(sharded) == "fp16"
    for name in ("text_encoder", "unet", "vae_decoder"):
        ours = load_export_module(variant, name).state_dict()
        plain = load_export_module(tiny_checkpoint, name).state_dict()
        assert all(torch.equal(ours[k], plain[k]) for k in plain), name
    settings = dict(steps=2, seed=1, height=64, width=64)
    torch_pipe = Pipeline.load(variant, backend="torch", device="cpu")
    ref = Pipeline.load(tiny_checkpoint, backend="torch", device="cpu")
    np.testing.assert_array_equal(torch_pipe("a cat", **settings).array, ref("a cat", **settings).array)


@pytest.mark.parametrize("fixture", ["onnx_fp32", "onnx_fp16"])
def test_every_export_is_checked_against_pytorch(request, fixture):
    """Each model's outputs were compared with its PyTorch module's, at a size other than the traced one."""
    from export.verify import CHECK_SIZE, TOLERANCE

    manifest = Manifest.read(request.getfixturevalue(fixture))
    for name, record in manifest.components.items():
        check = record.verification
        assert check["passed"] and 0 < check["rel_error"] <= TOLERANCE[manifest.precision], name
        assert check["tolerance"] == TOLERANCE[manifest.precision] and check["batch"] == CHECK_SIZE[0]


def test_a_failed_check_keeps_the_export_and_says_which_model(tiny_checkpoint, tmp_path, monkeypatch):
    """fp16's real rounding error, held to a tolerance no fp16 model meets: the export is written, the
    manifest records every check, and the error names the first model that failed."""
    import export.verify
    from sdengine.errors import ExportVerificationError

    monkeypatch.setitem(export.verify.TOLERANCE, "fp16", 1e-9)
    out = tmp_path / "strict"
    with pytest.raises(ExportVerificationError) as info:
        export_checkpoint(tiny_checkpoint, out, precision="fp16", components=["vae_decoder", "text_encoder"])
    message = str(info.value)
    assert message.startswith("vae_decoder: the ONNX model's output differs from PyTorch's by ")
    assert "above the 1e-09 that fp16 allows" in message and "(and 1 more" in message and "\n" not in message
    manifest = Manifest.read(out)
    assert all(not r.verification["passed"] for r in manifest.components.values())
    assert (out / "vae_decoder" / "model.onnx").is_file()
    unchecked = export_checkpoint(
        tiny_checkpoint, tmp_path / "unchecked", components=["vae_decoder"], verify=False
    )
    assert unchecked.components["vae_decoder"].verification is None


def test_relative_error_refuses_non_finite_outputs():
    from export.verify import Verification, rel_error

    good = np.array([1.0, -2.0])
    assert rel_error(good + 1e-6, good) == pytest.approx(5e-7)
    assert rel_error(np.array([1.0, np.inf]), good) == float("inf")
    assert rel_error(np.array([1.0, np.nan]), good) == float("inf")
    failed = Verification(1, 128, 64, float("inf"), 1e-2)
    assert not failed.passed and "non-finite values at batch 1, 128x64" in failed.describe(
        "vae_decoder", "fp16"
    )


@pytest.mark.parametrize("target", ["portable", "cuda"])
def test_pytorchs_weights_are_freed_before_onnxs_are_loaded(tiny_checkpoint, tmp_path, monkeypatch, target):
    """The export never holds both copies of a model's weights (an SDXL UNet's are 10 GB each): the PyTorch
    module is gone, its check's outputs taken, before the ONNX model's weights are read."""
    import gc
    import weakref

    import export.onnx_export as onnx_export

    modules, alive = [], []
    load_module, load_weights = onnx_export.load_export_module, onnx.load_external_data_for_model

    def tracked_module(*args, **kwargs):
        module = load_module(*args, **kwargs)
        modules.append(weakref.ref(module))
        return module

    def tracked_weights(model, base_dir):
        gc.collect()
        alive.append(modules[-1]() is not None)
        return load_weights(model, base_dir)

    monkeypatch.setattr(onnx_export, "load_export_module", tracked_module)
    monkeypatch.setattr(onnx, "load_external_data_for_model", tracked_weights)
    manifest = export_checkpoint(
        tiny_checkpoint, tmp_path / "out", precision="fp16", components=[UNET], target=target
    )
    assert alive == [False] and manifest.components[UNET].verification["passed"]
