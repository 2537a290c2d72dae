"""The UNet fused for ONNX Runtime's CUDA provider (``sdengine export --target cuda``).

The portable export spells attention out as MatMul, Softmax, MatMul: on a GPU that writes each attention
matrix to memory (at 512x512, 4096x4096 per head), and GroupNorm as a dozen small kernels. ONNX Runtime's
transformer optimizer (``onnxruntime.transformers``, model type ``unet``: the library its own Stable
Diffusion tooling uses) rewrites the graph into its CUDA contrib operators: MultiHeadAttention (flash or
memory-efficient attention, packed QKV and KV), GroupNorm and SkipGroupNorm in NHWC, NhwcConv, BiasSplitGelu,
SkipLayerNormalization, BiasAdd. Two of its habits shape this module:

- its attention matcher reads diffusers' classic attention processor (baddbmm, softmax, bmm), not torch's
  ``scaled_dot_product_attention``, so the UNet is traced with that processor (:func:`classic_attention`);
- its GroupNorm fusion reads float32 weights, so the trace is float32, fused, then converted to float16
  by ONNX Runtime's own converter, as its tooling does.

Perturbable self-attention (``export --pag-layers``, ``export.pag``) is not fused: the per-row choice
between its attention and the identity sits between the attention's output projection and the residual
sum, where the matcher expects nothing, so those few layers stay MatMul, Softmax, MatMul (the rest fuse as
in the plain UNet). Seamless convolutions (``export.seamless``: their wrapped padding is Slice and Concat
before a Conv without padding) fuse as plain ones do.

Memory: the optimizer copies the whole model for each of its symbolic shape inferences. Given the float32
SD 1.5 UNet (3.4 GB) with its weights, it peaked at 20 GB. So it is given the model without its weights:
it reads the few it rewrites from the external-data file on demand (through ``numpy_helper.to_array``,
relative to the working directory, hence :func:`_in_directory`), and the rest are loaded only for the
float16 conversion, which reads every weight. The two steps around the conversion that run that shape
inference again (the value types the converter needs, and the removal of casts it made useless:
``OnnxModel.convert_float_to_float16``'s steps, called one by one) run on a copy without the weights
(:func:`_without_weights`): they read types and shapes, never a weight's values. SD 1.5's fusion and
conversion peaked at 7.8 GB (12.4 GB with those two steps given the weights, 20 GB at first), below the
portable float16 export's 9.0. The fused graph and every weight came out byte for byte the same each time;
``tests/test_cuda_fusion.py`` checks the same on the tiny UNet (weights read from disk against weights in
memory; the two steps given no weight over 64 bytes).

The result runs only on ONNX Runtime's CUDA provider (the CPU has none of these kernels, TensorRT parses no
contrib operators): the manifest says ``target: cuda`` and the CPU backend, the TensorRT builder and run-time
LoRA (its layers' weights are packed) refuse it. The export's check against PyTorch (``export.verify``)
runs on the float32 trace before fusion; the fused model's numbers are checked on a GPU
(``benchmarks/gpu_check.py``), against diffusers in float16. What the CPU can check in numbers, it does
(``tests/test_cuda_fusion.py``): the same fusions less the CUDA-only ones (packing, NHWC, GroupNorm), whose
attention, layer norm and Gelu kernels the CPU has, against the unfused trace.
"""

from __future__ import annotations

import collections
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
from onnx.external_data_helper import load_external_data_for_model

from export.fp16 import conditioning_nodes
from sdengine.errors import ExportError
from sdengine.model_specs import CONDITIONING_INPUTS

if TYPE_CHECKING:
    from onnxruntime.transformers.fusion_options import FusionOptions

#: what the fused UNet must contain, or the fusion is refused (a model that lost these would be slower
#: than the portable one, never faster)
REQUIRED_FUSIONS = ("MultiHeadAttention", "GroupNorm")
CONTRIB_DOMAIN = "com.microsoft"


def classic_attention(module: object) -> int:
    """Give every plain attention layer of ``module`` diffusers' classic processor (what the fusion
    matches), a perturbable one (``export.pag``) for its ordinary rows; others (an IP-Adapter's) keep
    theirs. Returns how many were replaced."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from export.pag import PerturbableSelfAttention

    count = 0
    for layer in module.modules():
        processor = getattr(layer, "processor", None)
        if isinstance(processor, PerturbableSelfAttention) and type(processor.base) is AttnProcessor2_0:
            processor.base = AttnProcessor()
            count += 1
        elif type(processor) is AttnProcessor2_0:  # not a subclass: an adapter
            layer.set_processor(AttnProcessor())
            count += 1
    return count


def fuse_for_cuda(model_path: Path) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The float32 UNet at ``model_path`` fused for the CUDA provider and converted to float16 (its inputs
    and outputs kept float32); with the count of each fused operator. ExportError where it did not take."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.optimizer import optimize_model

    path = Path(model_path).resolve()  # (a relative one would not survive the change of directory)
    weights = str(path.parent)
    try:
        with _in_directory(weights):  # where the optimizer finds the weights it reads (module docstring)
            fused = optimize_model(
                onnx.load(str(path), load_external_data=False),
                model_type="unet",
                num_heads=0,  # read from the graph
                hidden_size=0,
                opt_level=0,  # the fusions only: ONNX Runtime's own graph optimisations run at session start
                use_gpu=True,
                optimization_options=fusion_options(),
            )
            _add_value_types(fused.model)
    except Exception as exc:  # noqa: BLE001 - the library's failure, named in one line
        raise ExportError(
            f"ONNX Runtime's CUDA fusion of the UNet failed: {type(exc).__name__}: {exc}"
        ) from exc
    load_external_data_for_model(fused.model, weights)  # the converter reads every weight
    # inputs and outputs stay float32, as the portable float16 export keeps them (the runtime binds those)
    # what the conditioning inputs alone make (the timestep's embedding) stays float32, as in the portable
    # export (export.fp16); the cascaded casts' removal below drops the float16 round trips between
    fused.initialize(
        convert_float_to_float16(
            fused.model,
            disable_shape_infer=True,
            keep_io_types=True,
            op_block_list=["RandomNormalLike"],
            node_block_list=conditioning_nodes(fused.model.graph, CONDITIONING_INPUTS),
        )
    )
    fused.remove_cascaded_cast_nodes()  # the rest of what OnnxModel.convert_float_to_float16 does
    _remove_useless_casts(fused.model)
    counts = collections.Counter(node.op_type for node in fused.model.graph.node)
    missing = [op for op in REQUIRED_FUSIONS if not counts[op]]
    if missing:
        raise ExportError(
            f"ONNX Runtime's CUDA fusion left the UNet without {', '.join(missing)}; "
            "export without --target cuda"
        )
    fused.topological_sort()  # what the library's own save does first: the converter appends its casts
    model = fused.model
    if not any(o.domain == CONTRIB_DOMAIN for o in model.opset_import):  # (its save adds this too)
        model.opset_import.append(onnx.helper.make_opsetid(CONTRIB_DOMAIN, 1))
    return model, {op: n for op, n in sorted(counts.items()) if op in FUSED_OPERATORS}


def _add_value_types(model: onnx.ModelProto) -> None:
    """Give ``model`` (without its weights, in their directory) the element type of every value the float16
    converter needs: ONNX Runtime's symbolic shape inference's types, shapes left out, for each value that has
    none, as ``OnnxModel.convert_float_to_float16`` adds them before it converts. Done here, before the
    weights are loaded, because that inference copies the whole model: with an SDXL UNet's 10 GB of weights
    loaded, the export did not fit in 23 GiB."""
    from onnxruntime.transformers.shape_infer_helper import SymbolicShapeInferenceHelper

    graph = _without_weights(model)
    inferred = SymbolicShapeInferenceHelper(graph).infer_shapes(
        graph, auto_merge=True, guess_output_rank=False
    )
    if inferred is None:
        raise ExportError("ONNX Runtime's symbolic shape inference gave no types for the fused UNet")
    known = {value.name for value in model.graph.value_info}
    for value in inferred.graph.value_info:
        typed = value.type.HasField("tensor_type") and value.type.tensor_type.elem_type
        if typed and value.name and value.name not in known:
            copy = onnx.ValueInfoProto()
            copy.CopyFrom(value)
            copy.type.tensor_type.ClearField("shape")
            model.graph.value_info.append(copy)
            known.add(value.name)


def _remove_useless_casts(model: onnx.ModelProto) -> None:
    """``OnnxModel.remove_useless_cast_nodes`` on ``model`` (casts to the type their input already has go),
    run on a copy without the weights: its shape inference copies the whole model it is given. It changes
    nodes only, so the copy's nodes become ``model``'s."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    view = OnnxModel(_without_weights(model))
    view.remove_useless_cast_nodes()
    del model.graph.node[:]
    model.graph.node.extend(view.model.graph.node)


def _without_weights(model: onnx.ModelProto, keep_bytes: int = 1 << 16) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers over ``keep_bytes`` hold their name, type and dims but no data:
    weights, which shape inference never reads (the small ones it may read, shapes and indices, are kept)."""
    copy = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import)
    graph = copy.graph
    for field in ("node", "input", "output", "value_info"):
        getattr(graph, field).extend(getattr(model.graph, field))
    for tensor in model.graph.initializer:
        if tensor.ByteSize() <= keep_bytes:
            graph.initializer.append(tensor)
        else:
            graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
    return copy


def fusion_options() -> FusionOptions:
    """The optimizer's UNet fusions, with q, k and v (and k and v) each packed into one projection."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("unet")
    options.enable_packed_qkv = options.enable_packed_kv = True
    return options


@contextlib.contextmanager
def _in_directory(path: str) -> Iterator[None]:
    """Work in ``path`` for the block (``contextlib.chdir`` from Python 3.11)."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


#: ONNX Runtime's contrib operators the fusion introduces (counted in the manifest)
FUSED_OPERATORS = frozenset(
    {
        "BiasAdd",
        "BiasSplitGelu",
        "GroupNorm",
        "MultiHeadAttention",
        "NhwcConv",
        "SkipGroupNorm",
        "SkipLayerNormalization",
    }
)
