"""ControlNets for export: checked against the checkpoint's UNet, traced into its model
(``export.wrappers.ControlledUNetExport``), and random ones for tests and the demo.

A ControlNet is a diffusers ``ControlNetModel`` directory (``config.json`` and its weights), such as
``lllyasviel/sd-controlnet-canny``, or a single file in the original ("LDM") layout, as the ControlNet authors
and the AUTOMATIC1111 web UI share them (``control_v11p_sd15_canny.pth``, ``.safetensors``): keys
``control_model.input_blocks...``, ``zero_convs.N.0``, ``input_hint_block.M``, ``middle_block_out.0``, with
or without the ``control_model.`` prefix (a file in diffusers' own names is read too). A file holds no
config: its shape is its UNet's plus the conditioning image's encoder, so the config is derived from the
checkpoint's UNet as ``ControlNetModel.from_unet`` derives it, and diffusers' own reader
(``convert_controlnet_checkpoint``, ``ControlNetModel.from_single_file``) converts the file, offline.
:func:`converted_controlnet` keeps each conversion in the cache (``$SDENGINE_CACHE/controlnets``), keyed by
the file (path, size, modification time) and the UNet's config; the export and the torch backend take
:func:`controlnet_directory` of each path, so the export's records (``controlnet/config.json``, the
manifest) name that directory.

The export lists the ControlNets it traced into the UNet in ``controlnet/config.json`` (see
``sdengine.controlnet``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdengine.cache import kept
from sdengine.controlnet import residual_count
from sdengine.errors import InvalidArgumentError, ModelDirectoryError, SDEngineError, UnsupportedConfigError
from sdengine.model_dir import optional_json, read_json, weights_variant
from sdengine.model_specs import Architecture

if TYPE_CHECKING:
    import torch

#: What a ControlNet's residuals must share with the UNet they are added to.
MATCHING = (
    "block_out_channels",
    "down_block_types",
    "layers_per_block",
    "cross_attention_dim",
    "projection_class_embeddings_input_dim",  # SDXL's added conditioning
)
#: The suffixes of single-file ControlNets (safetensors, or a pickled state dict).
CONTROLNET_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
#: The original layout's prefix of a ControlNet's keys (the ``.pth`` files'; absent in some conversions)
LDM_PREFIX = "control_model."
#: Changes when the conversion does, so older conversions in the cache are not reused.
CONVERSION_VERSION = "sdengine-controlnet-file-v1"
#: Beside a converted ControlNet: the file it came from (hidden, so ``checkpoint_hash`` skips it).
SOURCE_RECORD = ".sdengine-source.json"
COND_IN = "controlnet_cond_embedding.conv_in.weight"  # diffusers' name of the control image's first layer


def controlnet_config(path: str | os.PathLike) -> dict[str, Any]:
    """The config of the ControlNet directory ``path``; ModelDirectoryError where it is not one."""
    root = Path(path)
    if is_controlnet_file(root):
        raise InvalidArgumentError(
            f"{root} is a single-file ControlNet: its config comes from the checkpoint it runs with "
            "(converted_controlnet)"
        )
    if root.is_file():
        raise ModelDirectoryError(
            f"{root} is neither a ControlNet directory nor a single-file ControlNet "
            f"({', '.join(CONTROLNET_FILE_SUFFIXES)})"
        )
    if not root.is_dir():
        raise ModelDirectoryError(f"ControlNet directory or file {root} does not exist")
    config = read_json(root / "config.json")
    if config.get("_class_name") != "ControlNetModel":
        raise ModelDirectoryError(
            f"{root} is not a ControlNet: its config.json is a {config.get('_class_name')!r}, not a "
            "diffusers ControlNetModel"
        )
    return config


def with_controlnets(arch: Architecture, paths: Sequence[Path]) -> Architecture:
    """``arch`` with the ControlNet directories ``paths`` inside its UNet, as the export traces them: their
    count, and the residuals each adds, which the UNet weighs row by row (``control_weights``)."""
    residuals = residual_count(controlnet_config(paths[0])) if paths else 0
    return dataclasses.replace(arch, controlnets=len(paths), control_residuals=residuals)


def check_controlnets(checkpoint: Path, arch: Architecture, paths: list[Path]) -> list[dict[str, Any]]:
    """Each ControlNet's config, checked against the checkpoint's UNet before anything is exported: the
    latents it reads, its conditioning image's channels and the residuals it adds must fit. ``paths``:
    directories (:func:`controlnet_directory` gives a single file's)."""
    unet = optional_json(Path(checkpoint) / "unet" / "config.json")
    configs = []
    for path in paths:
        config = controlnet_config(path)
        if int(config.get("in_channels", 4)) != arch.latent_channels:
            raise UnsupportedConfigError(
                f"{path}: a ControlNet reading {config.get('in_channels')} input channels does not fit a "
                f"UNet with {arch.latent_channels} latent channels"
            )
        if int(config.get("conditioning_channels", 3)) != 3:
            raise UnsupportedConfigError(f"{path}: only ControlNets conditioned on RGB images are supported")
        for key in MATCHING:
            if key in config and key in unet and config[key] != unet[key]:
                raise UnsupportedConfigError(
                    f"{path}: the ControlNet's {key} {config[key]} differs from the UNet's {unet[key]}: it "
                    "was made for another Stable Diffusion architecture"
                )
        added = config.get("addition_embed_type")
        if added != unet.get("addition_embed_type") or config.get("class_embed_type"):
            raise UnsupportedConfigError(
                f"{path}: the ControlNet's added conditioning ({added or 'none'}) differs from the UNet's "
                f"({unet.get('addition_embed_type') or 'none'}): it was made for another architecture"
            )
        configs.append(config)
    return configs


def load_controlnets(paths: list[Path], dtype: Any = None, checkpoint: Path | None = None) -> list[Any]:
    """The ControlNets as PyTorch modules in eval mode, in ``dtype`` (default float32). A single-file
    ControlNet needs ``checkpoint`` (its config is derived from the UNet's; :func:`controlnet_directory`)."""
    import torch
    from diffusers import ControlNetModel

    folders = []
    for path in paths:
        if is_controlnet_file(path) and checkpoint is None:
            raise InvalidArgumentError(
                f"{path} is a single-file ControlNet: load it with the checkpoint it runs with, whose UNet "
                "gives its config (controlnet_directory converts it)"
            )
        folders.append(Path(path) if checkpoint is None else controlnet_directory(path, checkpoint))
    load = ControlNetModel.from_pretrained
    return [load(p, variant=weights_variant(p), torch_dtype=dtype or torch.float32).eval() for p in folders]


def is_controlnet_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file that may hold a single-file ControlNet (by its suffix)."""
    return Path(path).is_file() and Path(path).suffix.lower() in CONTROLNET_FILE_SUFFIXES


def controlnet_directory(path: str | os.PathLike, checkpoint: str | os.PathLike) -> Path:
    """The diffusers directory of the ControlNet ``path``: ``path`` itself for a directory (or anything but a
    ControlNet file, which :func:`controlnet_config` then refuses), the cached conversion of a single file
    for ``checkpoint``'s UNet (:func:`converted_controlnet`)."""
    return converted_controlnet(path, checkpoint) if is_controlnet_file(path) else Path(path)


def _conversion_key(path: Path, unet: dict[str, Any]) -> str:
    stat = path.stat()
    shape = json.dumps({k: v for k, v in unet.items() if not k.startswith("_")}, sort_keys=True)
    parts = [CONVERSION_VERSION, str(path.resolve()), str(stat.st_size), str(stat.st_mtime_ns), shape]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def converted_controlnet(path: str | os.PathLike, checkpoint: str | os.PathLike) -> Path:
    """The diffusers ``ControlNetModel`` directory of the single-file ControlNet ``path`` for the diffusers
    checkpoint ``checkpoint`` (whose UNet gives its config), converted on first use and kept in the cache
    (``$SDENGINE_CACHE/controlnets/STEM-KEY``; a changed file, or a UNet of another config, converts
    again)."""
    path = Path(path)
    if not path.is_file():
        raise ModelDirectoryError(f"ControlNet file {path} does not exist")
    unet = read_json(Path(checkpoint) / "unet" / "config.json")
    name = f"{path.stem}-{_conversion_key(path, unet)}"
    make = lambda target: convert_controlnet_file(path, checkpoint, target)  # noqa: E731
    return kept("controlnets", name, "config.json", make, f"ControlNet {path}")


def _read_controlnet_file(path: Path) -> dict[str, torch.Tensor]:
    """The file's ControlNet weights, the ``control_model.`` prefix taken off; anything else refused."""
    import torch
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    try:
        state = load_single_file_checkpoint(str(path), local_files_only=True)
    except Exception as exc:  # safetensors, pickle and zip errors alike: the file is not a state dict
        raise ModelDirectoryError(f"cannot read {path} as a ControlNet: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise ModelDirectoryError(f"{path} is not a ControlNet: it holds no named weights")
    if any(str(key).startswith(LDM_PREFIX) for key in state):
        state = {key[len(LDM_PREFIX) :]: v for key, v in state.items() if str(key).startswith(LDM_PREFIX)}
    state = {key: v for key, v in state.items() if isinstance(v, torch.Tensor)}
    if "input_hint_block.0.weight" not in state and COND_IN not in state:
        kind = (
            "a Stable Diffusion checkpoint"
            if "model.diffusion_model.input_blocks.0.0.weight" in state
            else "a LoRA"
            if any("lora" in key for key in state)
            else "something else"
        )
        raise ModelDirectoryError(
            f"{path} is not a ControlNet: it has no conditioning-image encoder "
            f"(control_model.input_hint_block); it looks like {kind}"
        )
    return state


def _derived_config(unet_config: dict[str, Any]) -> dict[str, Any]:
    """The config ``ControlNetModel.from_unet`` gives a ControlNet of a UNet of ``unet_config``: the UNet
    built on the meta device, so that no weight is read or made."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        net = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    return dict(net.config)


def _diffusers_weights(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``state`` (original layout, no prefix) under diffusers' names: diffusers' own converter, and SDXL's
    added conditioning (``label_emb``), which it leaves out of a ControlNet, by diffusers' UNet mapping."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_controlnet_checkpoint

    if COND_IN in state:  # already diffusers' names
        return dict(state)
    weights = convert_controlnet_checkpoint(dict(state), config)
    weights = {key: value for key, value in weights.items() if value is not None}
    for name, original in DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"].items():
        if original in state:
            weights[name] = state[original]
    return weights


def _check_weights(
    weights: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], path: Path, checkpoint: Path
) -> None:
    """Refuse, in one line, a file whose weights are not exactly the ControlNet the UNet's config makes."""
    fit = f"{path} does not fit the UNet of {checkpoint}"
    for key, tensor in weights.items():
        if key in expected and tuple(tensor.shape) != expected[key]:
            raise UnsupportedConfigError(
                f"{fit}: its {key} is {list(tensor.shape)}, where the UNet's ControlNet has "
                f"{list(expected[key])}: it was made for another Stable Diffusion architecture"
            )
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise UnsupportedConfigError(
            f"{fit}: {len(extra)} of its weights ({extra[0]}...) have no place in the UNet's ControlNet: it "
            "was made for another Stable Diffusion architecture"
        )
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise UnsupportedConfigError(
            f"{fit}: it lacks {len(missing)} of the {len(expected)} weights of the UNet's ControlNet "
            f"({missing[0]}...): a truncated file, or one made for another architecture"
        )


def convert_controlnet_file(
    path: str | os.PathLike, checkpoint: str | os.PathLike, output: str | os.PathLike
) -> Path:
    """Write the single-file ControlNet ``path`` as a diffusers ``ControlNetModel`` directory ``output``
    (which must not exist), its config derived from the diffusers checkpoint ``checkpoint``'s UNet and its
    weights read by diffusers' ``ControlNetModel.from_single_file``, offline. Weights keep the file's float16
    (saved as the ``fp16`` variant) or become float32. A file that is not a ControlNet, or not one for this
    UNet, is refused in one line."""
    import torch
    from diffusers import ControlNetModel
    from diffusers.utils import logging as diffusers_logging

    path, checkpoint, output = Path(path), Path(checkpoint), Path(output)
    if not path.is_file():
        raise ModelDirectoryError(f"ControlNet file {path} does not exist")
    if output.exists():
        raise ModelDirectoryError(f"{output} exists; choose a new directory for the converted ControlNet")
    unet = read_json(checkpoint / "unet" / "config.json")
    state = _read_controlnet_file(path)
    config = _derived_config(unet)
    try:
        weights = _diffusers_weights(state, config)
    except Exception as exc:  # a key layout diffusers' converter cannot follow
        raise UnsupportedConfigError(
            f"cannot convert ControlNet {path}: {str(exc).splitlines()[0]}"
        ) from None
    del state
    # the channels the file's ControlNet reads (latents, control image): check_controlnets says if they fit
    for key, name in (("conv_in.weight", "in_channels"), (COND_IN, "conditioning_channels")):
        if key in weights and weights[key].ndim == 4:
            config[name] = int(weights[key].shape[1])
    with torch.device("meta"):
        model = ControlNetModel.from_config(config)
    _check_weights(weights, {k: tuple(v.shape) for k, v in model.state_dict().items()}, path, checkpoint)
    half = weights["conv_in.weight"].dtype == torch.float16
    staging = output.with_name(f".{output.name}.{uuid.uuid4().hex}.tmp")
    try:
        staging.mkdir(parents=True)
        model.save_config(staging)  # the config diffusers' reader builds the model from
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # its to(dtype) warns of float32 modules this model has not
        try:
            net = ControlNetModel.from_single_file(
                weights,
                config=str(staging),
                local_files_only=True,
                torch_dtype=torch.float16 if half else torch.float32,
            )
        except SDEngineError:
            raise
        except Exception as exc:
            raise ModelDirectoryError(
                f"cannot convert ControlNet {path}: {str(exc).splitlines()[0]}"
            ) from None
        finally:
            diffusers_logging.set_verbosity(verbosity)
        net.save_pretrained(staging, safe_serialization=True, variant="fp16" if half else None)
        stat = path.stat()
        source = {"file": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        source["checkpoint"] = str(checkpoint.resolve())
        (staging / SOURCE_RECORD).write_text(json.dumps(source, indent=2) + "\n")
        try:
            staging.rename(output)
        except OSError:  # another process converted it first
            if not (output / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def write_random_controlnet(checkpoint: str | os.PathLike, output: str | os.PathLike, seed: int = 0) -> Path:
    """A random ControlNet for ``checkpoint``'s UNet, written to ``output`` (diffusers format).

    Made as ControlNet training starts (``ControlNetModel.from_unet``: the UNet's encoder copied, a
    conditioning embedding added), then every weight moved by noise of a tenth of its layer's spread, and the
    layers training starts at zero (the zero convolutions) and the conditioning embedding given random
    weights, so that it and its control image change the image. Its weights are random: it follows no kind
    of control image."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    root, out = Path(checkpoint), Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidArgumentError(f"{out} exists and is not an empty directory")
    unet = UNet2DConditionModel.from_pretrained(root / "unet", variant=weights_variant(root / "unet"))
    # a latent consistency model's UNet: its ControlNets are SD's, without the guidance scale's projection
    # (which from_unet would copy into a ControlNet that has no place for it)
    unet.time_embedding.cond_proj = None
    digest = hashlib.sha256(f"sdengine-random-controlnet:{seed}".encode()).digest()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        model = ControlNetModel.from_unet(unet)
        for param in model.parameters():
            if param.ndim > 1 and float(param.std()) == 0.0:  # a zero convolution
                param.normal_(0.0, 0.5 / param[0].numel() ** 0.5)
            elif param.numel() > 1:
                param.add_(torch.randn_like(param) * 0.1 * float(param.std()))
        # the control image's own path: He-initialised, its output scaled to a spread of 0.5 on a random image
        # (about what conv_in gives the latents), so that the control image moves the result
        embedding = model.controlnet_cond_embedding
        for param in embedding.parameters():
            if param.ndim > 1:
                param.normal_(0.0, (2.0 / param[0].numel()) ** 0.5)
        probe = torch.rand(1, model.config.conditioning_channels, 64, 64)
        embedding.conv_out.weight.mul_(0.5 / float(embedding(probe).std()))
    model.eval().save_pretrained(out, safe_serialization=True)
    return out
