"""float32 -> float16 conversion of exported ONNX models, keeping the fragile parts in float32.

Built on ONNX Runtime's float16 converter (the one its transformer tools and Optimum use). Inputs and outputs
stay float32, so the runtime feeds an fp16 model exactly as an fp32 one; normalisations and softmax stay
float32, where fp16 sums of squares overflow on the VAE's large activations.
"""

from __future__ import annotations

import onnx
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
from onnxruntime.transformers.onnx_model import OnnxModel

#: Ops left in float32 in every component.
FP32_OPS = ("InstanceNormalization", "GroupNormalization", "LayerNormalization", "Softmax")


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The fp16 version of ``model`` (shapes must already be inferred: large models can't be re-inferred)."""
    converted = convert_float_to_float16(
        model,
        keep_io_types=True,
        disable_shape_infer=True,
        op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP32_OPS],
    )
    _drop_repeated_casts(converted.graph)
    # The converter appends the casts it inserts around blocked ops at the end of the node list; ONNX requires
    # topological order.
    OnnxModel(converted).topological_sort()
    return converted


def _drop_repeated_casts(graph: onnx.GraphProto) -> None:
    """The converter gives each blocked op a cast of its inputs named after the input, so two blocked ops
    reading one tensor (the text encoder's embeddings feed its first layer norm and, for clip_skip, the final
    one) get two identical casts with one output name, which ONNX forbids. Keep the first of each."""
    seen: dict[str, onnx.NodeProto] = {}
    repeated = []
    for node in graph.node:
        for output in node.output:
            first = seen.setdefault(output, node)
            if first is node:
                continue
            same = node.op_type == first.op_type == "Cast" and node.input == first.input
            if not same or node.attribute != first.attribute:
                raise ValueError(f"fp16 conversion: two different nodes write {output!r}")
            repeated.append(node)
    for node in repeated:
        graph.node.remove(node)
