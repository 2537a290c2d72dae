"""Other exporters' ways of writing the same models, made from sdengine's own export for the tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
from onnx import TensorProto, helper


def retype_input(path, name, new_type, shape, make_nodes):
    """Give model input ``name`` another dtype/shape, converting back inside the graph (as other exporters'
    models declare it: int64 ids, a (batch,) int64 timestep)."""
    model = onnx.load(str(path))
    graph = model.graph
    old = next(i for i in graph.input if i.name == name)
    inner = f"{name}_inner"
    for node in graph.node:
        node.input[:] = [inner if i == name else i for i in node.input]
    graph.input.remove(old)
    graph.input.insert(0, helper.make_tensor_value_info(name, new_type, shape))
    for node in reversed(make_nodes(name, inner)):
        graph.node.insert(0, node)
    onnx.save(model, str(path))


def with_fp16_unet_io(onnx_dir: Path, dest: Path) -> Path:
    """A copy of ``onnx_dir`` whose UNet takes and gives float16 (``sample``, ``encoder_hidden_states``, the
    noise), as exports that keep fp16 inputs and outputs declare it; it converts to float32 inside."""
    shutil.copytree(onnx_dir, dest)
    unet = dest / "unet" / "model.onnx"
    dims = {
        "sample": ["batch", 4, "latent_height", "latent_width"],
        "encoder_hidden_states": ["batch", 77, 32],
    }
    for name, shape in dims.items():
        to_float = lambda s, d: [helper.make_node("Cast", [s], [d], to=TensorProto.FLOAT)]  # noqa: E731
        retype_input(unet, name, TensorProto.FLOAT16, shape, to_float)
    model = onnx.load(str(unet))
    out = model.graph.output[0]
    for node in model.graph.node:
        node.output[:] = [f"{out.name}_f32" if o == out.name else o for o in node.output]
    model.graph.node.append(helper.make_node("Cast", [f"{out.name}_f32"], [out.name], to=TensorProto.FLOAT16))
    out.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.save(model, str(unet))
    return dest
