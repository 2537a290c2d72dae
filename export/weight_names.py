"""Give the exported models' layer weights their PyTorch names, so LoRA can find them without torch.

TorchScript's ONNX exporter stores a Linear layer's weight transposed, as an anonymous ``onnx::MatMul_N``
initializer. After tracing, each weight of a Linear or Conv2d layer is found among the initializers by its
exact value (its own layout, or transposed) and renamed after the layer (:func:`sdengine.lora.weight_name`):
``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight.T``. The names are relative to the
diffusers or transformers component (transformers 4's ``text_model.`` prefix dropped), which is how LoRA
files name their layers. A value shared by two layers, or by two initializers, is ambiguous and left as is.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
from onnx import numpy_helper
from torch import nn

from sdengine.lora import canonical_module, weight_name


def _digest(array: np.ndarray) -> tuple[tuple[int, ...], str, str]:
    array = np.ascontiguousarray(array)
    return array.shape, str(array.dtype), hashlib.blake2b(array.tobytes(), digest_size=16).hexdigest()


def name_weights(model: onnx.ModelProto, module: nn.Module) -> int:
    """Rename, in place, the initializers of ``model`` that hold a Linear or Conv2d weight of ``module`` (a
    wrapper whose single child is the component), and drop the wrapper's prefix from those the exporter
    named itself (biases, norms, embeddings). Returns how many layer weights were named."""
    ((attribute, component),) = module.named_children()
    wanted: dict[tuple, list[str]] = {}
    for path, layer in component.named_modules():
        if isinstance(layer, nn.Linear | nn.Conv2d):
            weight = layer.weight.detach().float().numpy()
            wanted.setdefault(_digest(weight), []).append(weight_name(canonical_module(path), False))
            if weight.ndim == 2:
                wanted.setdefault(_digest(weight.T), []).append(weight_name(canonical_module(path), True))
    found: dict[str, list[onnx.TensorProto]] = {}
    for tensor in model.graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT and len(tensor.dims) in (2, 4):
            for name in wanted.get(_digest(numpy_helper.to_array(tensor)), []):
                found.setdefault(name, []).append(tensor)
    renames = {}
    for names in wanted.values():
        candidates = [(n, found[n]) for n in names if n in found]
        if len(candidates) == 1 and len(candidates[0][1]) == 1:
            renames[candidates[0][1][0].name] = candidates[0][0]
    named = len(renames)
    prefix = f"{attribute}."
    for tensor in model.graph.initializer:
        if tensor.name not in renames and tensor.name.startswith(prefix):
            renames[tensor.name] = canonical_module(tensor.name.removeprefix(prefix))
    _rename(model.graph, renames)
    return named


def _rename(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    for value in (*graph.initializer, *graph.input, *graph.value_info):
        value.name = renames.get(value.name, value.name)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _rename(attribute.g, renames)
