"""LoRA: low-rank weight updates, read from a safetensors file and fused into the exported models' weights.

A LoRA layer adds ``scale * alpha / rank * up @ down`` to one Linear or Conv2d weight of the UNet or the text
encoder, as diffusers' ``load_lora_weights`` followed by ``fuse_lora(lora_scale=scale)`` does. Read without
torch, in the layouts most files come in:

- diffusers: ``unet.<layer>.lora.down.weight`` / ``.lora.up.weight`` (text encoder: ``text_encoder.<layer>
  .lora_linear_layer.down.weight``), or PEFT's ``lora_A`` / ``lora_B`` names; ``alpha`` from per-layer
  ``<layer>.alpha`` tensors or the file's ``lora_adapter_metadata`` (``lora_alpha``, ``r``, their patterns
  and ``use_rslora``), else equal to the rank;
- kohya-ss (A1111): ``lora_unet_<layer with _ for .>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``,
  ``lora_te_`` for the text encoder, including LoCon's convolution layers. SDXL's: ``lora_te1_`` and
  ``lora_te2_`` for its two text encoders, and UNet layers named after the original (SGM) UNet's blocks,
  ``input_blocks_4_1_...``, which :func:`sgm_unet_name` renames to diffusers' (``down_blocks_1_attentions_0_
  ...``), as diffusers' loader does.

LyCORIS' other decompositions (LoHa, LoKr, Tucker ``lora_mid``) and DoRA are refused by name. Layers are
named relative to the diffusers or transformers component, without transformers 4's ``text_model.`` prefix;
the export names each layer's weight initializer after it (``export.weight_names``), which is how the runtime
finds the weight a layer updates. Fusing leaves the models' files alone: the runtime hands the fused weights
to ONNX Runtime in place of the file's, and ``sdengine export --lora`` fuses them before the export instead.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

from sdengine.errors import InvalidArgumentError, ModelDirectoryError, UnsupportedConfigError
from sdengine.model_specs import TEXT_ENCODER, TEXT_ENCODER_2, UNET
from sdengine.safetensors_io import read_safetensors

#: The components a LoRA file can update, by the prefixes their layers have in diffusers' and kohya's files.
PREFIXES = {
    "unet.": UNET,
    "text_encoder.": TEXT_ENCODER,
    "text_encoder_2.": TEXT_ENCODER_2,
    "lora_unet_": UNET,
    "lora_te_": TEXT_ENCODER,
    "lora_te1_": TEXT_ENCODER,
    "lora_te2_": TEXT_ENCODER_2,
}
#: The original (SGM) UNet's layers that have names of their own in diffusers' (flat, ``_`` for ``.``).
SGM_LAYERS = {
    "input_blocks_0_0": "conv_in",
    "out_2": "conv_out",
    "time_embed_0": "time_embedding_linear_1",
    "time_embed_2": "time_embedding_linear_2",
    "label_emb_0_0": "add_embedding_linear_1",
    "label_emb_0_2": "add_embedding_linear_2",
}
#: ... and its resnets' layers, by their names in diffusers' ResnetBlock2D.
SGM_RESNET = {
    "in_layers_2": "conv1",
    "out_layers_3": "conv2",
    "emb_layers_1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
#: Layers per UNet block: 2 in every SD 1.x, 2.x and SDXL UNet (SGM numbers a block's layers and its down-
#: or upsampler together, so a block spans 3 SGM indices).
SGM_LAYERS_PER_BLOCK = 2
#: Layer-key endings: (down or up, its suffix), in diffusers', PEFT's and kohya's spellings.
SUFFIXES = {
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".alpha": "alpha",
}
#: Key fragments of formats that are not plain LoRA, and what they are.
REFUSED = {
    "hada_": "LyCORIS LoHa",
    "lokr_": "LyCORIS LoKr",
    "lora_mid": "LyCORIS LoCon with a Tucker (lora_mid) factor",
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
}
METADATA_KEY = "lora_adapter_metadata"


def canonical_module(path: str) -> str:
    """A layer's name relative to its component: transformers 4 nests CLIP's layers in ``text_model.``."""
    return path.removeprefix("text_model.")


def weight_name(module: str, transposed: bool) -> str:
    """The initializer name the export gives a layer's weight: ``.T`` where it is stored transposed (a
    Linear weight read by MatMul)."""
    return f"{module}.weight.T" if transposed else f"{module}.weight"


@dataclass(frozen=True)
class LoraLayer:
    """One layer's update: ``factor * up @ down`` added to ``module``'s weight (``flat``: a kohya name,
    its dots written as underscores)."""

    component: str
    module: str
    flat: bool
    down: np.ndarray  # (rank, in, *kernel)
    up: np.ndarray  # (out, rank, *1)
    factor: float  # alpha / rank (alpha / sqrt(rank) for rsLoRA)

    def delta(self, shape: tuple[int, ...], scale: float) -> np.ndarray:
        """The update to a weight of ``shape`` (PyTorch's layout), float32."""
        rank = self.down.shape[0]
        product = self.up.reshape(self.up.shape[0], rank) @ self.down.reshape(rank, -1)
        if product.size != int(np.prod(shape)):
            raise InvalidArgumentError(
                f"LoRA layer {self.module} makes an update of {product.shape[0]}x{product.shape[1]} for a "
                f"weight of shape {tuple(shape)}: the LoRA was made for another model"
            )
        return (scale * self.factor) * product.reshape(shape)


@dataclass(frozen=True)
class LoraFile:
    path: Path
    layers: tuple[LoraLayer, ...]

    def components(self) -> set[str]:
        return {layer.component for layer in self.layers}


def read_lora(path: str | os.PathLike) -> LoraFile:
    """Every layer of a LoRA safetensors file; InvalidArgumentError for a file that is none."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"LoRA file {path} does not exist")
    if path.suffix != ".safetensors":
        raise InvalidArgumentError(f"{path}: LoRA files are read as .safetensors only")
    tensors, metadata = read_safetensors(path, "LoRA")
    for fragment, kind in REFUSED.items():
        if any(fragment in key for key in tensors):
            raise UnsupportedConfigError(f"{path} is a {kind} file; sdengine fuses plain LoRA only")
    parts: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for key, tensor in tensors.items():
        prefix = next((p for p in PREFIXES if key.startswith(p)), None)
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if prefix is None or suffix is None:
            raise InvalidArgumentError(
                f"{path}: {key!r} is not a LoRA layer of a Stable Diffusion UNet or text encoder"
            )
        layer = key[len(prefix) : -len(suffix)]
        parts.setdefault((prefix, layer), {})[SUFFIXES[suffix]] = tensor
    config = _adapter_config(metadata, path)
    layers = []
    for (prefix, layer), found in sorted(parts.items()):
        if "down" not in found or "up" not in found:
            raise InvalidArgumentError(
                f"{path}: layer {layer} lacks its {'up' if 'down' in found else 'down'}"
            )
        component, flat = PREFIXES[prefix], prefix.startswith("lora_")
        module = layer.removeprefix("text_model_") if flat else canonical_module(layer)
        if prefix == "lora_unet_":
            module = sgm_unet_name(module)
        down, up = (np.asarray(found[k], dtype=np.float32) for k in ("down", "up"))
        if up.shape[1] != down.shape[0]:
            raise InvalidArgumentError(f"{path}: layer {layer}'s up and down disagree on the rank")
        factor = _factor(config.get(component, {}), module, down.shape[0], found.get("alpha"))
        layers.append(LoraLayer(component, module, flat, down, up, factor))
    if not layers:
        raise InvalidArgumentError(f"{path} holds no LoRA layers")
    return LoraFile(path, tuple(layers))


def sgm_unet_name(name: str) -> str:
    """A kohya UNet layer name (flat) in the original SGM UNet's terms (SDXL's) as diffusers names it
    (flat); any other name as it is. ``input_blocks_i_j``: block ``(i - 1) // 3``, its resnet (``j`` 0) or
    attention (``j`` 1) ``(i - 1) % 3``, or its downsampler (``op``); ``middle_block_j``: resnet 0,
    attention, resnet 1; ``output_blocks_i_j``: block ``i // 3``, its resnet, attention (``i % 3``) or
    upsampler (``j`` 2). The same mapping as diffusers' ``_maybe_map_sgm_blocks_to_diffusers``."""
    for sgm, ours in SGM_LAYERS.items():
        if name == sgm or name.startswith(sgm + "_"):
            return ours + name[len(sgm) :]
    stride = SGM_LAYERS_PER_BLOCK + 1
    if match := re.fullmatch(r"input_blocks_(\d+)_(\d+)_(.+)", name):
        i, j, rest = int(match[1]), int(match[2]), match[3]
        block, index = (i - 1) // stride, (i - 1) % stride
        if rest.startswith("op"):
            name = f"down_blocks_{block}_downsamplers_0_conv{rest[2:]}"
        else:
            name = f"down_blocks_{block}_{('resnets', 'attentions')[j]}_{index}_{rest}"
    elif match := re.fullmatch(r"middle_block_(\d)_(.+)", name):
        part = ("resnets_0", "attentions_0", "resnets_1")[int(match[1])]
        name = f"mid_block_{part}_{match[2]}"
    elif match := re.fullmatch(r"output_blocks_(\d+)_(\d)_(.+)", name):
        i, j, rest = int(match[1]), int(match[2]), match[3]
        part = ("resnets", "attentions", "upsamplers")[j]
        name = f"up_blocks_{i // stride}_{part}_{i % stride if j < 2 else 0}_{rest}"
    else:
        return name
    for sgm, ours in SGM_RESNET.items():
        name = name.replace(f"_{sgm}", f"_{ours}")
    return name


def _adapter_config(metadata: dict[str, str], path: Path) -> dict[str, dict]:
    """The PEFT adapter config that diffusers keeps in a file's metadata, per component."""
    if METADATA_KEY not in metadata:
        return {}
    try:
        flat = json.loads(metadata[METADATA_KEY])
    except ValueError:
        raise InvalidArgumentError(f"{path}: its {METADATA_KEY} is not JSON") from None
    config: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, name = key.partition(".")
        if component in (UNET, TEXT_ENCODER, TEXT_ENCODER_2):
            config.setdefault(component, {})[name] = value
    for component, values in config.items():
        if values.get("use_dora"):
            raise UnsupportedConfigError(
                f"{path}: its {component} layers are DoRA; sdengine fuses plain LoRA"
            )
    return config


def _pattern_value(patterns: dict | None, module: str) -> object | None:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a layer name ending in it."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return None


def _factor(config: dict, module: str, rank: int, alpha: np.ndarray | None) -> float:
    if alpha is not None:
        return float(alpha) / rank
    r = _pattern_value(config.get("rank_pattern"), module) or config.get("r") or rank
    lora_alpha = _pattern_value(config.get("alpha_pattern"), module) or config.get("lora_alpha") or r
    return float(lora_alpha) / (float(r) ** 0.5 if config.get("use_rslora") else float(r))


def named_weights(model: onnx.ModelProto) -> dict[str, tuple[str, bool]]:
    """Layer name -> (initializer name, stored transposed), for every weight the export named."""
    found = {}
    for tensor in model.graph.initializer:
        for transposed, ending in ((True, ".weight.T"), (False, ".weight")):
            if tensor.name.endswith(ending):
                found[tensor.name[: -len(ending)]] = (tensor.name, transposed)
                break
    return found


def resolve(layer: LoraLayer, weights: dict[str, tuple[str, bool]], flat_names: dict[str, str]) -> str:
    """The layer name in ``weights`` that ``layer`` updates."""
    module = flat_names.get(layer.module) if layer.flat else layer.module
    if module not in weights:
        raise InvalidArgumentError(
            f"LoRA layer {layer.module!r} names no layer of this {layer.component}: the LoRA was made for "
            "another model"
        )
    return module


def fused_weights(
    model_path: str | os.PathLike, component: str, loras: Sequence[tuple[LoraFile, float]]
) -> dict[str, np.ndarray]:
    """Initializer name -> the weight with every LoRA's update added (in the file's dtype and layout), for
    the weights of ``component`` (its ONNX model at ``model_path``) that the LoRAs update."""
    model = onnx.load(str(model_path), load_external_data=False)
    weights = named_weights(model)
    if not weights:
        raise ModelDirectoryError(
            f"{model_path}: its weights carry no layer names, which LoRA needs; export the checkpoint again "
            "with sdengine export"
        )
    flat_names = {name.replace(".", "_"): name for name in weights}
    deltas: dict[str, list[tuple[LoraLayer, float]]] = {}
    for lora, scale in loras:
        for layer in lora.layers:
            if layer.component == component:
                deltas.setdefault(resolve(layer, weights, flat_names), []).append((layer, scale))
    tensors = {t.name: t for t in model.graph.initializer}
    fused = {}
    for module, updates in deltas.items():
        name, transposed = weights[module]
        tensor = tensors[name]
        if external_data_helper.uses_external_data(tensor):
            external_data_helper.load_external_data_for_tensor(tensor, str(Path(model_path).parent))
        base = numpy_helper.to_array(tensor)
        shape = base.shape[::-1] if transposed else base.shape
        total = sum(layer.delta(shape, scale) for layer, scale in updates)
        fused[name] = (base.astype(np.float32) + (total.T if transposed else total)).astype(base.dtype)
    return fused


def parse_lora_arg(value: str) -> tuple[str, float]:
    """``FILE[:SCALE]`` -> (file, scale), scale 1.0 by default (a file whose name has a colon is taken whole
    where it exists)."""
    path, sep, scale = value.rpartition(":")
    if sep and path and not Path(value).exists():
        try:
            return path, float(scale)
        except ValueError:
            pass
    return value, 1.0
