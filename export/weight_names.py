"""Give the exported models' layer weights their PyTorch names, so LoRA can find them without torch.

TorchScript's ONNX exporter stores a Linear layer's weight transposed, as an anonymous ``onnx::MatMul_N``
initializer. After tracing, each weight of a Linear or Conv2d layer is found among the initializers by its
exact value (its own layout, or transposed; a sampled fingerprint picks the candidates to compare) and
renamed after the layer (:func:`sdengine.lora.weight_name`):
``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight.T``. The names are relative to the
diffusers or transformers component (transformers 4's ``text_model.`` prefix dropped), which is how LoRA
files name their layers. A value shared by two layers, or by two initializers, is ambiguous and left as is.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import numpy_helper
from torch import nn

from export.wrappers import exported_component
from sdengine.lora import canonical_module, weight_name

#: Rows and columns of a weight sampled for its fingerprint: exact comparison then confirms a match.
SAMPLES = 16


def _fingerprint(weight: np.ndarray) -> tuple[tuple[int, ...], bytes]:
    """A weight's shape and a grid of its values (in PyTorch's layout): cheap to take from a transposed
    view, unlike a hash of all of it (an SD 1.5 UNet holds 3.4 GB of them)."""
    rows, cols = (
        np.unique(np.linspace(0, n - 1, min(n, SAMPLES)).astype(np.int64)) for n in weight.shape[:2]
    )
    return weight.shape, weight[np.ix_(rows, cols)].tobytes()


def name_weights(model: onnx.ModelProto, module: nn.Module, base_dir: str | os.PathLike = "") -> int:
    """Rename, in place, the initializers of ``model`` that hold a Linear or Conv2d weight of ``module`` (a
    wrapper of the component: :func:`export.wrappers.exported_component`; ControlNets' layers beside it keep
    their own names), and
    drop the wrapper's prefix from those the exporter named itself (biases, norms, embeddings). Returns how
    many layer weights were named. ``model`` may leave its weights in external-data files in ``base_dir``:
    each is read from there as it is compared, one at a time."""
    attribute, component = exported_component(module)
    layers: dict[tuple, list[tuple[str, np.ndarray]]] = {}
    for path, layer in component.named_modules():
        if isinstance(layer, nn.Linear | nn.Conv2d):
            weight = layer.weight.detach().float().numpy()
            layers.setdefault(_fingerprint(weight), []).append((canonical_module(path), weight))
    found: dict[str, list[tuple[onnx.TensorProto, bool]]] = {}
    for tensor in model.graph.initializer:
        if tensor.data_type != onnx.TensorProto.FLOAT or len(tensor.dims) not in (2, 4):
            continue
        array = numpy_helper.to_array(tensor, str(base_dir))
        for transposed, view in ((False, array), (True, array.T if array.ndim == 2 else None)):
            if view is None:
                continue
            for layer, weight in layers.get(_fingerprint(view), []):
                if np.array_equal(weight, view):
                    found.setdefault(layer, []).append((tensor, transposed))
    owners: dict[str, list[str]] = {}  # initializer -> the layers it matched
    for layer, matches in found.items():
        for tensor, _ in matches:
            owners.setdefault(tensor.name, []).append(layer)
    renames = {}
    for layer, matches in found.items():  # one initializer for one layer, or it is ambiguous
        if len(matches) == 1 and len(owners[matches[0][0].name]) == 1:
            tensor, transposed = matches[0]
            renames[tensor.name] = weight_name(layer, transposed)
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
