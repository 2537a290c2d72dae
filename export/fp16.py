"""float32 -> float16 conversion of exported ONNX models, keeping the fragile parts in float32.

Built on ONNX Runtime's float16 converter (the one its transformer tools and Optimum use). Inputs and outputs
stay float32, so the runtime feeds an fp16 model exactly as an fp32 one; normalisations and softmax stay
float32, where fp16 sums of squares overflow on the VAE's large activations.

In the UNet, what is computed from its conditioning inputs (the timestep, SDXL's pooled text and size
numbers, a guidance embedding, ControlNet weights, FreeU's scales), with constants and shapes but no image
or text, stays float32 too: the timestep's sinusoidal embedding and the layers that project it into every
block. Those are vectors per image, so float32 costs next to nothing there; in float16 the embedding's
arguments (timestep times frequency, up to 999) keep a step of 0.5 radians, where diffusers computes that
embedding in float32 in its float16 pipelines. On SD 1.5's UNet this took the export check's error from
5.1e-3 to 1.1e-3 (``benchmarks/README.md``).
"""

from __future__ import annotations

from collections.abc import Collection

import onnx
from onnx import TensorProto
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
from onnxruntime.transformers.onnx_model import OnnxModel

#: Ops left in float32 in every component.
FP32_OPS = ("InstanceNormalization", "GroupNormalization", "LayerNormalization", "Softmax")


def convert_to_fp16(model: onnx.ModelProto, conditioning: Collection[str] = ()) -> onnx.ModelProto:
    """The fp16 version of ``model`` (shapes must already be inferred: large models can't be re-inferred).
    ``conditioning``: the names of inputs whose computations, with constants' and shapes', stay float32
    (:func:`conditioning_nodes`; none: every node but the blocked ops is converted)."""
    converted = convert_float_to_float16(
        model,
        keep_io_types=True,
        disable_shape_infer=True,
        op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP32_OPS],
        node_block_list=conditioning_nodes(model.graph, conditioning) if conditioning else None,
    )
    _drop_repeated_casts(converted.graph)
    _drop_round_trips(converted.graph)
    _drop_unread_casts(converted.graph)
    # The converter appends the casts it inserts around blocked ops at the end of the node list; ONNX requires
    # topological order.
    OnnxModel(converted).topological_sort()
    return converted


def conditioning_nodes(graph: onnx.GraphProto, conditioning: Collection[str]) -> list[str]:
    """The names of ``graph``'s nodes that read one of the graph inputs ``conditioning`` or such a node's
    output, and otherwise only constants, initializers and shapes (in the traced graph's topological order),
    and of the ``Constant`` nodes they read (the timestep embedding's frequencies: in float16 they would
    round its arguments as badly). Other nodes of constants and shapes alone are left as they are."""
    conditioned = {i.name for i in graph.input if i.name in conditioning}
    small = conditioned | {t.name for t in graph.initializer} | {""}  # "": an optional input left out
    constants = {out: node for node in graph.node if node.op_type == "Constant" for out in node.output}
    names = []
    for node in graph.node:
        if node.op_type == "Shape":  # its output is small; the node itself reads any tensor as it is
            small.update(node.output)
        elif all(name in small for name in node.input):
            small.update(node.output)
            if any(name in conditioned for name in node.input):
                conditioned.update(node.output)
                read = [constants[name].name for name in node.input if name in constants]
                names += [name for name in (*read, node.name) if name]
    return list(dict.fromkeys(names))


def _drop_round_trips(graph: onnx.GraphProto) -> None:
    """The converter casts each float32 node's inputs from float16 and its outputs back, as if the tensors
    between two such nodes were float16: a float32 tensor cast to float16 and straight back. Read it as it
    is instead (the float16 cast stays where float16 nodes read it). Not ONNX Runtime's
    ``remove_cascaded_cast_nodes``, which joins any two casts in a row, the traced graph's own included
    (where a float-to-integer-to-float pair rounds), and prunes through a copy of the whole model."""
    single = TensorProto.FLOAT
    float32 = {v.name for v in (*graph.value_info, *graph.input) if v.type.tensor_type.elem_type == single}
    float32 |= {t.name for t in graph.initializer if t.data_type == single}
    producers = {out: node for node in graph.node for out in node.output}
    outputs = {o.name for o in graph.output}
    renamed: dict[str, str] = {}
    dropped = []
    for node in graph.node:
        if node.op_type != "Cast" or _cast_to(node) != TensorProto.FLOAT or node.output[0] in outputs:
            continue
        first = producers.get(node.input[0])
        if first is None or first.op_type != "Cast" or _cast_to(first) != TensorProto.FLOAT16:
            continue
        if first.input[0] in float32:
            renamed[node.output[0]] = first.input[0]
            dropped.append(node)
    for node in dropped:
        graph.node.remove(node)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]


def _drop_unread_casts(graph: onnx.GraphProto) -> None:
    """The converter casts every float32 node's outputs to float16, read or not: drop the casts nothing
    reads (the float32 nodes' outputs that only float32 nodes read)."""
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    unread = [node for node in graph.node if node.op_type == "Cast" and node.output[0] not in read]
    for node in unread:
        graph.node.remove(node)


def _cast_to(node: onnx.NodeProto) -> int:
    return next(a.i for a in node.attribute if a.name == "to")


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
