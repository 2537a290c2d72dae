"""Write a diffusers-format Stable Diffusion checkpoint as one original-layout ("LDM") single-file checkpoint.

Tests and demos of single-file loading (the layout the AUTOMATIC1111 web UI, ComfyUI and most shared
fine-tunes keep Stable Diffusion in) need such files, and no real one can be downloaded here. This writes the
random checkpoints of :mod:`export.checkpoint` in that layout: the inverse of what diffusers'
``from_single_file`` reads (``diffusers.loaders.single_file_utils``), so that reading the file back gives
every weight of the directory, bit for bit.

The layout, as the original training code names its modules:

* ``model.diffusion_model.``: the UNet. Its ``input_blocks`` list conv_in, then per down block its
  resnet/transformer pairs and its downsampler; ``middle_block`` is resnet, transformer, resnet;
  ``output_blocks`` list per up block its resnet/transformer pairs, the last one carrying the upsampler.
  The numbering follows the UNet's config (block count, ``layers_per_block``, which blocks have
  cross-attention), not SD 1.5's counts.
* ``first_stage_model.``: the VAE, whose mid-block attention projections are 1x1 convolutions
  (``[C, C, 1, 1]``) and whose decoder's up blocks are numbered from the lowest resolution up.
* SD 1.x: the CLIP text encoder, in transformers' own layout, under ``cond_stage_model.transformer.``.
* SDXL base: the same under ``conditioner.embedders.0.transformer.``, and the second text encoder in
  OpenCLIP's layout (fused ``in_proj`` attention, ``text_projection`` stored transposed) under
  ``conditioner.embedders.1.model.``; the SDXL refiner has only the latter, under
  ``conditioner.embedders.0.model.``.

A ControlNet (:func:`write_controlnet_single_file`) is a file of its own, as the ControlNet authors share them
(``control_v11p_sd15_canny.pth``): under ``control_model.`` (or no prefix), its copy of the UNet's encoder
named as the UNet's (``input_blocks``, ``middle_block``, ``time_embed``, SDXL's ``label_emb``), its zero
convolutions ``zero_convs.N.0`` and ``middle_block_out.0``, and its control image's encoder
``input_hint_block.M``; the inverse of diffusers' ``convert_controlnet_checkpoint``.

Tensors keep their dtype and are stored contiguous, in a plain ``safetensors`` file (no metadata). Tokenizers,
scheduler and safety checker are not written: a single file holds no tokenizer or scheduler, and
``from_single_file`` never reads a safety checker from one.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdengine.errors import ModelDirectoryError, UnsupportedConfigError

if TYPE_CHECKING:
    import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x's text encoder
XL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL base's first text encoder
XL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL base's second text encoder
REFINER_OPEN_CLIP_PREFIX = "conditioner.embedders.0.model."  # the SDXL refiner's only text encoder
CONTROLNET_PREFIX = "control_model."  # a ControlNet file's (the original ControlNet's ``.pth``)

#: Weight files of a diffusers (``diffusion_pytorch_model``) or transformers (``model``) component, in the
#: order they are looked for; a sharded one is read through its ``.index.json``.
WEIGHT_STEMS = ("diffusion_pytorch_model", "model")

# A resnet's layers: diffusers' names -> the original ones (UNet; the VAE's differ only in the shortcut).
_UNET_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "time_emb_proj.": "emb_layers.1.",
    "conv_shortcut.": "skip_connection.",
}
_VAE_RESNET = {"conv_shortcut.": "nin_shortcut."}
# The VAE's mid-block attention (with the names older diffusers versions saved it under).
_VAE_ATTENTION = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
    "query.": "q.",
    "key.": "k.",
    "value.": "v.",
    "proj_attn.": "proj_out.",
}
_UNET_DOWN_TYPES = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}  # block type -> has attention
_UNET_UP_TYPES = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
_OPEN_CLIP_FIXED = {
    "embeddings.position_embedding.weight": "positional_embedding",
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "self_attn.out_proj.": "attn.out_proj.",
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}
_OPEN_CLIP_QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")
_OPEN_CLIP_LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)")


@dataclass(frozen=True)
class _Rule:
    """Keys under diffusers' ``source`` prefix go under ``target``; the rest of the key's leading part is
    renamed by ``renames`` (prefix -> prefix); ``conv1x1``: 2-D weights become ``[C, C, 1, 1]``."""

    source: str
    target: str
    renames: dict[str, str] = field(default_factory=dict)
    conv1x1: bool = False


def _apply_rules(
    weights: dict[str, torch.Tensor], rules: list[_Rule], prefix: str, what: str
) -> dict[str, torch.Tensor]:
    """``weights`` renamed by ``rules`` (each key by the rule of its longest matching prefix) under
    ``prefix``; a key no rule maps, or two keys mapped to one name, is refused rather than dropped."""
    by_length = sorted(rules, key=lambda rule: len(rule.source), reverse=True)
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, tensor in weights.items():
        rule = next((rule for rule in by_length if key.startswith(rule.source)), None)
        if rule is None:
            unmapped.append(key)
            continue
        rest = key[len(rule.source) :]
        for old, new in rule.renames.items():
            if rest.startswith(old):
                rest = new + rest[len(old) :]
                break
        if rule.conv1x1 and rest.endswith("weight") and tensor.ndim == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        name = prefix + rule.target + rest
        if name in out:
            raise UnsupportedConfigError(f"{what}: two weights map to {name}")
        out[name] = tensor
    if unmapped:
        shown = ", ".join(unmapped[:5]) + (f" and {len(unmapped) - 5} more" if len(unmapped) > 5 else "")
        raise UnsupportedConfigError(
            f"{what}: {len(unmapped)} weights have no place in the original layout for this config: {shown}"
        )
    return out


def _layers_per_block(config: dict[str, Any], what: str) -> int:
    layers = config.get("layers_per_block", 2)
    if isinstance(layers, list):
        if len(set(layers)) != 1:
            raise UnsupportedConfigError(
                f"{what}: layers_per_block {layers} differs between blocks; the original layout's readers "
                "assume one count"
            )
        layers = layers[0]
    return int(layers)


def _layer_rules(block: str, blocks: str, first: int, layers: int, attention: bool) -> list[_Rule]:
    """Each layer of diffusers' ``block`` (a down or up block): its resnet, and its transformer where the
    block has ``attention``, at entries ``first``, ``first + 1``... of the original ``blocks`` list."""
    rules = []
    for layer in range(layers):
        rules.append(_Rule(f"{block}.resnets.{layer}.", f"{blocks}.{first + layer}.0.", _UNET_RESNET))
        if attention:
            rules.append(_Rule(f"{block}.attentions.{layer}.", f"{blocks}.{first + layer}.1."))
    return rules


def _encoder_rules(config: dict[str, Any], what: str) -> list[_Rule]:
    """The renames a UNet and its ControlNet share: time embedding, conv_in, SDXL's added conditioning,
    down blocks (``input_blocks``) and mid block (``middle_block``), for ``config`` (a
    ``UNet2DConditionModel`` or ``ControlNetModel`` config; ``what`` names it in errors)."""
    down = list(config["down_block_types"])
    unknown = [kind for kind in down if kind not in _UNET_DOWN_TYPES]
    if unknown:
        raise UnsupportedConfigError(
            f"{what} down blocks {down}: the original layout's are of types {', '.join(_UNET_DOWN_TYPES)}"
        )
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise UnsupportedConfigError(
            f"{what} mid block {config['mid_block_type']}: the original layout's is resnet, transformer, "
            "resnet"
        )
    layers = _layers_per_block(config, what)
    rules = [
        _Rule("time_embedding.linear_1.", "time_embed.0."),
        _Rule("time_embedding.linear_2.", "time_embed.2."),
        _Rule("conv_in.", "input_blocks.0.0."),
        _Rule("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET),
        _Rule("mid_block.attentions.0.", "middle_block.1."),
        _Rule("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET),
    ]
    if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text and size conditioning
        rules += [
            _Rule("add_embedding.linear_1.", "label_emb.0.0."),
            _Rule("add_embedding.linear_2.", "label_emb.0.2."),
        ]
    for block, kind in enumerate(down):
        first = 1 + block * (layers + 1)  # input_blocks.0 is conv_in
        rules += _layer_rules(f"down_blocks.{block}", "input_blocks", first, layers, _UNET_DOWN_TYPES[kind])
        if block < len(down) - 1:  # every block but the last halves the resolution
            rules.append(
                _Rule(f"down_blocks.{block}.downsamplers.0.conv.", f"input_blocks.{first + layers}.0.op.")
            )
    return rules


def _unet_rules(config: dict[str, Any]) -> list[_Rule]:
    """The UNet's diffusers -> original renames for ``config`` (a ``UNet2DConditionModel`` config)."""
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    unknown = [kind for kind in down if kind not in _UNET_DOWN_TYPES]
    unknown += [kind for kind in up if kind not in _UNET_UP_TYPES]
    if unknown or len(up) != len(down):
        raise UnsupportedConfigError(
            f"UNet blocks {down} / {up}: the original layout holds as many down as up blocks, of types "
            f"{', '.join([*_UNET_DOWN_TYPES, *_UNET_UP_TYPES])}"
        )
    layers = _layers_per_block(config, "UNet")
    rules = _encoder_rules(config, "UNet")
    rules += [_Rule("conv_norm_out.", "out.0."), _Rule("conv_out.", "out.2.")]
    for block, kind in enumerate(up):
        first = block * (layers + 1)  # up blocks hold one resnet more than down blocks
        rules += _layer_rules(f"up_blocks.{block}", "output_blocks", first, layers + 1, _UNET_UP_TYPES[kind])
        if block < len(up) - 1:  # the upsampler follows the block's last resnet (and its transformer)
            slot = 2 if _UNET_UP_TYPES[kind] else 1
            rules.append(
                _Rule(f"up_blocks.{block}.upsamplers.0.conv.", f"output_blocks.{first + layers}.{slot}.conv.")
            )
    return rules


def _controlnet_rules(config: dict[str, Any]) -> list[_Rule]:
    """A ControlNet's diffusers -> original renames for ``config`` (a ``ControlNetModel`` config): its copy
    of the UNet's encoder as the UNet's, each zero convolution ``zero_convs.N.0`` (one per ``input_blocks``
    entry), the mid block's ``middle_block_out.0``, and the conditioning embedding ``input_hint_block``, a
    sequence of convolutions and SiLUs (``conv_in`` at 0, ``blocks.K`` at ``2K + 2``, ``conv_out`` last)."""
    down = list(config["down_block_types"])
    layers = _layers_per_block(config, "ControlNet")
    rules = _encoder_rules(config, "ControlNet")
    # one per input_blocks entry: conv_in, each block's resnets and each but the last block's downsampler
    for index in range(len(down) * (layers + 1)):
        rules.append(_Rule(f"controlnet_down_blocks.{index}.", f"zero_convs.{index}.0."))
    blocks = 2 * (len(config.get("conditioning_embedding_out_channels", (16, 32, 96, 256))) - 1)
    rules += [
        _Rule("controlnet_mid_block.", "middle_block_out.0."),
        _Rule("controlnet_cond_embedding.conv_in.", "input_hint_block.0."),
        _Rule("controlnet_cond_embedding.conv_out.", f"input_hint_block.{2 * blocks + 2}."),
    ]
    for block in range(blocks):
        rules.append(
            _Rule(f"controlnet_cond_embedding.blocks.{block}.", f"input_hint_block.{2 * block + 2}.")
        )
    return rules


def _vae_rules(config: dict[str, Any]) -> list[_Rule]:
    """The VAE's diffusers -> original renames for ``config`` (an ``AutoencoderKL`` config)."""
    layers = _layers_per_block(config, "VAE")
    down, up = len(config["down_block_types"]), len(config["up_block_types"])
    rules = [_Rule("quant_conv.", "quant_conv."), _Rule("post_quant_conv.", "post_quant_conv.")]
    for side in ("encoder", "decoder"):
        rules += [
            _Rule(f"{side}.conv_in.", f"{side}.conv_in."),
            _Rule(f"{side}.conv_out.", f"{side}.conv_out."),
            _Rule(f"{side}.conv_norm_out.", f"{side}.norm_out."),
            _Rule(f"{side}.mid_block.resnets.0.", f"{side}.mid.block_1.", _VAE_RESNET),
            _Rule(f"{side}.mid_block.resnets.1.", f"{side}.mid.block_2.", _VAE_RESNET),
            _Rule(f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1.", _VAE_ATTENTION, conv1x1=True),
        ]
    for block in range(down):
        for layer in range(layers):
            rules.append(
                _Rule(
                    f"encoder.down_blocks.{block}.resnets.{layer}.",
                    f"encoder.down.{block}.block.{layer}.",
                    _VAE_RESNET,
                )
            )
        if block < down - 1:
            rules.append(
                _Rule(
                    f"encoder.down_blocks.{block}.downsamplers.0.conv.",
                    f"encoder.down.{block}.downsample.conv.",
                )
            )
    for block in range(up):
        original = up - 1 - block  # the original decoder numbers its up blocks from the lowest resolution
        for layer in range(layers + 1):
            rules.append(
                _Rule(
                    f"decoder.up_blocks.{block}.resnets.{layer}.",
                    f"decoder.up.{original}.block.{layer}.",
                    _VAE_RESNET,
                )
            )
        if block < up - 1:
            rules.append(
                _Rule(
                    f"decoder.up_blocks.{block}.upsamplers.0.conv.", f"decoder.up.{original}.upsample.conv."
                )
            )
    return rules


def _clip_state_dict(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModel``'s weights in the original layout (transformers' own names, under
    ``text_model.``, which transformers 5 no longer saves) under ``prefix``."""
    out = {}
    for key, tensor in weights.items():
        name = key.removeprefix("text_model.")
        if name.endswith("position_ids"):  # a buffer, not a weight
            continue
        if not name.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
            raise UnsupportedConfigError(
                f"text encoder weight {key} has no place in the original CLIP layout"
            )
        out[f"{prefix}text_model.{name}"] = tensor
    return out


def _open_clip_state_dict(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModelWithProjection``'s weights in OpenCLIP's layout under ``prefix``: each
    layer's q, k and v projections fused into ``in_proj_weight`` / ``in_proj_bias`` (in that order) and the
    projection stored as the matrix the pooled output is multiplied by (the Linear weight transposed)."""
    import torch

    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        name = key.removeprefix("text_model.")
        if name.endswith("position_ids"):
            continue
        if name in _OPEN_CLIP_FIXED:
            out[prefix + _OPEN_CLIP_FIXED[name]] = tensor
        elif name == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T.contiguous()
        elif match := _OPEN_CLIP_QKV.fullmatch(name):
            layer, which, kind = match.groups()
            fused.setdefault((layer, kind), {})[which] = tensor
        elif (match := _OPEN_CLIP_LAYER_KEY.fullmatch(name)) and match.group(2).startswith(
            tuple(_OPEN_CLIP_LAYER)
        ):
            layer, rest = match.groups()
            old = next(old for old in _OPEN_CLIP_LAYER if rest.startswith(old))
            out[f"{prefix}transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER[old]}{rest[len(old) :]}"] = tensor
        else:
            raise UnsupportedConfigError(f"text encoder weight {key} has no place in OpenCLIP's layout")
    for (layer, kind), parts in fused.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise UnsupportedConfigError(f"text encoder layer {layer} lacks some of its q, k, v {kind}")
        fused_name = f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"
        out[fused_name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A component's weights as saved (dtype kept): its single safetensors file or its shards."""
    from safetensors.torch import load_file

    for stem in WEIGHT_STEMS:
        single = folder / f"{stem}.safetensors"
        if single.is_file():
            return load_file(single)
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            weights: dict[str, torch.Tensor] = {}
            for shard in shards:
                weights.update(load_file(folder / shard))
            return weights
    raise ModelDirectoryError(
        f"{folder} holds no safetensors weights ({' or '.join(s + '.safetensors' for s in WEIGHT_STEMS)})"
    )


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelDirectoryError(f"{folder} has no config.json")
    return json.loads(path.read_text())


def _components(checkpoint_dir: Path) -> set[str]:
    """The model components the checkpoint's model_index.json names (null entries left out)."""
    path = checkpoint_dir / "model_index.json"
    if not path.is_file():
        raise ModelDirectoryError(
            f"{checkpoint_dir} has no model_index.json: pass a diffusers checkpoint folder"
        )
    index = json.loads(path.read_text())
    return {
        name
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and value and value[0] is not None
    }


def ldm_state_dict(checkpoint_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every UNet, VAE and text-encoder weight of the diffusers checkpoint ``checkpoint_dir`` under its
    original-layout name (see the module docstring), dtype kept, contiguous."""
    root = Path(checkpoint_dir)
    components = _components(root)
    missing = {"unet", "vae"} - components
    if missing:
        raise ModelDirectoryError(
            f"{root} has no {' or '.join(sorted(missing))}: not a Stable Diffusion checkpoint"
        )
    state = _apply_rules(
        _read_weights(root / "unet"), _unet_rules(_read_config(root / "unet")), UNET_PREFIX, "UNet"
    )
    state.update(
        _apply_rules(_read_weights(root / "vae"), _vae_rules(_read_config(root / "vae")), VAE_PREFIX, "VAE")
    )
    first, second = "text_encoder" in components, "text_encoder_2" in components
    if first and second:  # SDXL base
        state.update(_clip_state_dict(_read_weights(root / "text_encoder"), XL_CLIP_PREFIX))
        state.update(_open_clip_state_dict(_read_weights(root / "text_encoder_2"), XL_OPEN_CLIP_PREFIX))
    elif second:  # SDXL refiner
        state.update(_open_clip_state_dict(_read_weights(root / "text_encoder_2"), REFINER_OPEN_CLIP_PREFIX))
    elif first:  # SD 1.x
        state.update(_clip_state_dict(_read_weights(root / "text_encoder"), CLIP_PREFIX))
    else:
        raise ModelDirectoryError(f"{root} has no text encoder: not a Stable Diffusion checkpoint")
    return {name: tensor.contiguous() for name, tensor in state.items()}


def write_single_file(checkpoint_dir: Path, output: Path) -> Path:
    """Write the diffusers-format checkpoint ``checkpoint_dir`` (SD 1.x, SDXL base or refiner, their
    inpainting UNets included) as the single original-layout safetensors file ``output``, and return its
    path. The file is written beside ``output`` and moved into place, so an interrupted write leaves no
    partial file; an existing ``output`` is replaced."""
    from safetensors.torch import save_file

    output = Path(output)
    state = ldm_state_dict(checkpoint_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f".{output.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        save_file(state, staging)
        os.replace(staging, output)
    finally:
        staging.unlink(missing_ok=True)
    return output


def controlnet_ldm_state_dict(
    controlnet_dir: str | os.PathLike, prefix: str = CONTROLNET_PREFIX
) -> dict[str, torch.Tensor]:
    """Every weight of the diffusers ``ControlNetModel`` directory ``controlnet_dir`` under its
    original-layout name (``input_blocks...``, ``zero_convs.N.0``, ``input_hint_block.M``,
    ``middle_block_out.0``; see :func:`_controlnet_rules`) behind ``prefix``, dtype kept, contiguous."""
    root = Path(controlnet_dir)
    config = _read_config(root)
    if config.get("_class_name") != "ControlNetModel":
        raise ModelDirectoryError(f"{root} is not a diffusers ControlNetModel directory")
    state = _apply_rules(_read_weights(root), _controlnet_rules(config), prefix, "ControlNet")
    return {name: tensor.contiguous() for name, tensor in state.items()}


def write_controlnet_single_file(controlnet_dir: Path, output: Path, prefix: str = CONTROLNET_PREFIX) -> Path:
    """Write the diffusers ``ControlNetModel`` directory ``controlnet_dir`` as one original-layout file
    ``output``, as the ControlNet authors' ``control_v11p_sd15_canny.pth`` holds one, and return its path:
    the inverse of diffusers' ``convert_controlnet_checkpoint``. ``prefix``: ``control_model.`` (the
    ``.pth`` files') or ``""`` (as the web UI's ``.safetensors`` conversions keep them). A ``.safetensors``
    ``output`` is a safetensors file, any other a ``torch.save`` of the state dict. Written beside ``output``
    and moved into place; an existing ``output`` is replaced."""
    import torch
    from safetensors.torch import save_file

    output = Path(output)
    state = controlnet_ldm_state_dict(controlnet_dir, prefix)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f".{output.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        if output.suffix.lower() == ".safetensors":
            save_file(state, staging)
        else:
            torch.save(state, staging)
        os.replace(staging, output)
    finally:
        staging.unlink(missing_ok=True)
    return output


__all__ = ["controlnet_ldm_state_dict", "ldm_state_dict", "write_controlnet_single_file", "write_single_file"]
