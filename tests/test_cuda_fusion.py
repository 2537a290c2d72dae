"""The UNet fused for ONNX Runtime's CUDA provider (``export --target cuda``): what can be checked on the CPU.

The CPU has none of the fused kernels, so these check the fusion's structure, the manifest and every refusal;
its numbers are checked on a GPU (tests/test_gpu.py, benchmarks/gpu_check.py).
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from sdengine.errors import BackendUnavailableError, InvalidArgumentError


def fused_export(checkpoint, out, **options):
    """``checkpoint`` exported to ``out`` with ``--target cuda`` and ``options``; the float32 UNet it fused
    is kept beside it, as ``unfused.onnx``."""
    import onnx

    import export.onnx_export
    from export.cuda_fusion import fuse_for_cuda

    def keeping_the_unfused(model_path):
        onnx.save(onnx.load(str(model_path)), str(out.parent / "unfused.onnx"))
        return fuse_for_cuda(model_path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export.onnx_export, "fuse_for_cuda", keeping_the_unfused)
        export.onnx_export.export_checkpoint(checkpoint, out, precision="fp16", target="cuda", **options)
    return out


@pytest.fixture(scope="module")
def fused_dir(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint exported with ``--target cuda``."""
    return fused_export(tiny_checkpoint, tmp_path_factory.mktemp("onnx") / "cuda-fp16")


#: the tiny UNet's self-attention layers that :func:`fused_pag_seamless_dir` perturbs (two transformers)
PAG_LAYERS, PERTURBED = ["down_blocks.1"], 2


@pytest.fixture(scope="module")
def fused_pag_seamless_dir(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint exported with ``--target cuda``, perturbable layers and seamless convolutions."""
    out = tmp_path_factory.mktemp("onnx") / "cuda-fp16-pag-seamless"
    return fused_export(tiny_checkpoint, out, pag_layers=PAG_LAYERS, seamless=True)


def test_the_unet_is_fused_into_onnx_runtimes_cuda_operators(fused_dir, tiny_checkpoint):
    import onnx

    manifest = json.loads((fused_dir / "sdengine_manifest.json").read_text())
    assert manifest["target"] == "cuda"
    unet = manifest["components"]["unet"]
    config = json.loads((tiny_checkpoint / "unet" / "config.json").read_text())
    blocks = config["layers_per_block"] * sum("CrossAttn" in b for b in config["down_block_types"])
    blocks += (config["layers_per_block"] + 1) * sum("CrossAttn" in b for b in config["up_block_types"])
    blocks += 1  # the mid block's transformer
    fused = unet["fused_operators"]
    assert fused["MultiHeadAttention"] == 2 * blocks  # self and cross attention of every transformer
    assert fused["GroupNorm"] + fused.get("SkipGroupNorm", 0) > 0 and fused["NhwcConv"] > 0
    assert unet["verification"]["passed"] and unet["verification"]["tolerance"] == 1e-4  # float32 trace
    model = onnx.load(str(fused_dir / "unet" / "model.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert "Softmax" not in ops  # no attention left spelled out
    # inputs and outputs float32, as the portable export's, so the runtime binds the same buffers
    assert {i.type.tensor_type.elem_type for i in [*model.graph.input, *model.graph.output]} == {1}
    assert manifest["components"]["text_encoder"]["fused_operators"] is None
    weights = {t.name: t.data_type for t in model.graph.initializer}  # the timestep's layers stay float32
    assert weights["time_embedding.linear_1.weight"] == onnx.TensorProto.FLOAT
    assert weights["down_blocks.0.resnets.0.time_emb_proj.weight"] == onnx.TensorProto.FLOAT


def test_the_fusion_given_weights_on_disk_gives_what_it_gives_from_memory(fused_dir, tmp_path, monkeypatch):
    """The fusion reads the UNet without its weights and loads them as it needs them (export/cuda_fusion.py,
    on memory). The tiny UNet's were inline; from an external-data file, given as a path relative to the
    working directory (which the fusion changes and restores), the graph and every weight come out the
    same."""
    import os

    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    from export.cuda_fusion import fuse_for_cuda

    external = tmp_path / "model.onnx"
    onnx.save(
        onnx.load(str(fused_dir.parent / "unfused.onnx")),
        str(external),
        save_as_external_data=True,
        location="weights",
        size_threshold=0,
    )
    on_disk = onnx.load(str(external), load_external_data=False).graph.initializer
    assert sum(uses_external_data(t) for t in on_disk) > 100
    monkeypatch.chdir(tmp_path.parent)  # a path relative to the working directory, as --output may give
    from_disk, counts = fuse_for_cuda(external.relative_to(tmp_path.parent))
    assert os.getcwd() == str(tmp_path.parent)
    assert not any(uses_external_data(t) for t in from_disk.graph.initializer)  # all loaded, none left behind
    exported = onnx.load(str(fused_dir / "unet" / "model.onnx"))
    assert (
        counts
        == json.loads((fused_dir / "sdengine_manifest.json").read_text())["components"]["unet"][
            "fused_operators"
        ]
    )
    assert list(from_disk.graph.node) == list(exported.graph.node)

    def weights(model):
        return [
            (t.name, t.data_type, list(t.dims), numpy_helper.to_array(t).tobytes())
            for t in model.graph.initializer
        ]

    assert weights(from_disk) == weights(exported)


def test_the_float16_steps_read_types_from_a_copy_without_weights(fused_dir, monkeypatch):
    """The converter's type inference and the removal of useless casts run on a copy of the fused UNet
    without its weights (each would copy the model, weights and all); with every weight over 64 bytes left
    out of that copy, the result is what the export wrote."""
    import onnx

    import export.cuda_fusion as cuda_fusion

    stripped, without = [], cuda_fusion._without_weights

    def thinner(model, keep_bytes=1 << 16):
        copy = without(model, keep_bytes=64)
        stripped.append(sum(not t.raw_data and not t.float_data for t in copy.graph.initializer))
        return copy

    monkeypatch.setattr(cuda_fusion, "_without_weights", thinner)
    model, _ = cuda_fusion.fuse_for_cuda(fused_dir.parent / "unfused.onnx")
    exported = onnx.load(str(fused_dir / "unet" / "model.onnx"))
    assert len(stripped) == 2 and min(stripped) > 100
    assert list(model.graph.node) == list(exported.graph.node)  # the same casts kept, the same types
    assert list(model.graph.initializer) == list(exported.graph.initializer)


#: the fusions whose kernels only the CUDA provider has
CUDA_ONLY_FUSIONS = (
    "enable_nhwc_conv",
    "enable_group_norm",
    "enable_skip_group_norm",
    "enable_bias_splitgelu",
    "enable_bias_add",
    "enable_packed_qkv",
    "enable_packed_kv",
)


def test_the_fused_attention_computes_what_the_trace_does_where_the_cpu_can_run_it(fused_dir):
    """The CPU has ONNX Runtime's Attention, MultiHeadAttention, SkipLayerNormalization and Gelu kernels,
    not the NHWC, GroupNorm or packed-attention ones. With the export's fusions less those, the optimizer's
    reading of the traced attention (heads, scale, which projection is q, k or v) is checked in numbers,
    against the unfused float32 UNet."""
    fused, softmax = check_cpu_fusions(fused_dir)
    assert softmax == 0  # no attention left spelled out


def check_cpu_fusions(export_dir, **feeds):
    """The export's fusions less the CUDA-only ones, applied to the float32 UNet it fused: every attention
    the export fused is fused here too, and the outputs match the unfused UNet's (given random inputs, and
    ``feeds``). Returns the outputs and the count of attention still spelled out (Softmax)."""
    import collections

    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnxruntime.transformers.optimizer import optimize_model

    from export.cuda_fusion import CONTRIB_DOMAIN, fusion_options

    options = fusion_options()
    for name in CUDA_ONLY_FUSIONS:
        setattr(options, name, False)
    unfused = str(export_dir.parent / "unfused.onnx")
    fused = optimize_model(unfused, model_type="unet", opt_level=0, optimization_options=options).model
    fused.opset_import.append(onnx.helper.make_opsetid(CONTRIB_DOMAIN, 1))
    ops = collections.Counter(n.op_type for n in fused.graph.node)
    manifest = json.loads((export_dir / "sdengine_manifest.json").read_text())
    attention = manifest["components"]["unet"]["fused_operators"]["MultiHeadAttention"]
    assert ops["Attention"] + ops["MultiHeadAttention"] == attention  # every attention, as in the export
    assert ops["SkipLayerNormalization"] > 0

    models = (unfused, fused.SerializeToString())
    sessions = [ort.InferenceSession(m, providers=["CPUExecutionProvider"]) for m in models]
    sizes = {"batch": 2, "latent_height": 8, "latent_width": 8, "sequence": 77}
    rng = np.random.default_rng(0)
    inputs = {
        i.name: rng.standard_normal([sizes.get(d, d) for d in i.shape]).astype(np.float32)
        for i in sessions[0].get_inputs()
    }
    inputs["timestep"] = np.full(inputs["timestep"].shape, 500, np.float32)
    inputs.update(feeds)
    expected, got = (session.run(None, inputs)[0] for session in sessions)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    return got, ops["Softmax"]


def test_perturbable_layers_and_seamless_convolutions_fuse(fused_pag_seamless_dir, fused_dir):
    """With ``--pag-layers`` and ``--seamless`` the UNet fuses as the plain one does, but for the perturbed
    self-attention, left spelled out: the row selection after it hides its pattern from the optimizer. Its
    rows still choose: the perturbed row differs, the other is the same as with no row perturbed."""
    import numpy as np

    manifest = json.loads((fused_pag_seamless_dir / "sdengine_manifest.json").read_text())
    assert manifest["seamless"] is True
    assert json.loads((fused_pag_seamless_dir / "pag" / "config.json").read_text())["layers"] == PAG_LAYERS
    fused = manifest["components"]["unet"]["fused_operators"]
    plain = json.loads((fused_dir / "sdengine_manifest.json").read_text())["components"]["unet"]
    assert fused == {
        **plain["fused_operators"],
        "MultiHeadAttention": plain["fused_operators"]["MultiHeadAttention"] - PERTURBED,
    }
    perturbed, softmax = check_cpu_fusions(fused_pag_seamless_dir, pag_rows=np.array([0, 1], np.float32))
    assert softmax == PERTURBED
    unperturbed, _ = check_cpu_fusions(fused_pag_seamless_dir, pag_rows=np.zeros(2, np.float32))
    np.testing.assert_array_equal(perturbed[0], unperturbed[0])
    assert np.abs(perturbed[1] - unperturbed[1]).max() > 1e-3 * np.abs(unperturbed[1]).max()


def test_info_says_what_runs_a_fused_export(fused_dir, onnx_fp32):
    from sdengine.info import describe

    assert describe(fused_dir)["manifest"]["target"].startswith("cuda: the UNet fused")
    assert describe(onnx_fp32)["manifest"]["target"] == "portable"


def test_the_cpu_and_tensorrt_refuse_a_fused_export(fused_dir):
    from export.trt_build import build_engines
    from sdengine.pipeline import Pipeline

    with pytest.raises(BackendUnavailableError, match="fused for ONNX Runtime's CUDA provider"):
        Pipeline.load(fused_dir, backend="ort", device="cpu")
    with pytest.raises(InvalidArgumentError, match="TensorRT cannot parse"):
        build_engines(fused_dir, fused_dir.parent / "engines", batch=1, height=64, width=64)


def test_the_cuda_provider_passes_the_check_as_a_name_or_with_its_options(fused_dir):
    """The CUDA backend lists its provider as a (name, options) pair: the fused export is its to run."""
    from sdengine.backends.ort import OrtBackend, provider_names

    assert provider_names([("CUDAExecutionProvider", {"device_id": "0"}), "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    with pytest.raises(Exception) as refused:  # here the CPU then fails to open the fused kernels
        OrtBackend(open_fused(fused_dir), providers=[("CUDAExecutionProvider", {"device_id": "0"})])
    assert "which alone runs it" not in str(refused.value)


def open_fused(path):
    from sdengine.model_dir import open_onnx_dir

    model_dir = open_onnx_dir(path)
    assert model_dir.cuda_fused
    return model_dir


def test_run_time_lora_is_refused_on_a_fused_unet(ort_pipe_fp32, onnx_fp32, tmp_path):
    from export.random_lora import write_random_lora

    lora = write_random_lora(onnx_fp32, tmp_path / "lora.safetensors")
    pipe = ort_pipe_fp32
    fused_view = dataclasses.replace(pipe.model_dir, cuda_fused=True)
    real = pipe.model_dir
    pipe.model_dir = fused_view
    try:
        with pytest.raises(InvalidArgumentError, match="fuse the LoRA at export"):
            pipe.load_lora(lora, 0.5)
    finally:
        pipe.model_dir = real
    assert pipe.loras == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": "cuda"}, "add --precision fp16"),
        ({"target": "tpu", "precision": "fp16"}, "unknown target"),
        ({"target": "cuda", "precision": "fp16", "components": ["vae_decoder"]}, "export the unet"),
    ],
)
def test_bad_targets_are_refused_before_any_work(tiny_checkpoint, tmp_path, kwargs, message):
    from export.onnx_export import export_checkpoint

    with pytest.raises(InvalidArgumentError, match=message):
        export_checkpoint(tiny_checkpoint, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_classic_attention_replaces_only_the_plain_processors():
    import torch
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    from export.cuda_fusion import classic_attention
    from export.pag import PerturbableSelfAttention

    class Custom(AttnProcessor2_0):
        pass

    plain, custom = Attention(8, heads=2, dim_head=4), Attention(8, heads=2, dim_head=4)
    custom.set_processor(Custom())
    perturbable = Attention(8, heads=2, dim_head=4)
    perturbable.set_processor(PerturbableSelfAttention(AttnProcessor2_0()))
    module = torch.nn.ModuleList([plain, custom, perturbable])
    assert classic_attention(module) == 2
    assert type(plain.processor) is AttnProcessor and type(custom.processor) is Custom
    assert type(perturbable.processor.base) is AttnProcessor  # the ordinary rows' attention, classic
