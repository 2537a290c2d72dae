"""ControlNets for export: checked against the checkpoint's UNet, traced into its model
(``export.wrappers.ControlledUNetExport``), and random ones for tests and the demo.

A ControlNet is a diffusers ``ControlNetModel`` directory (``config.json`` and its weights), such as
``lllyasviel/sd-controlnet-canny``. The export lists the ControlNets it traced into the UNet in
``controlnet/config.json`` (see ``sdengine.controlnet``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from sdengine.errors import InvalidArgumentError, ModelDirectoryError, UnsupportedConfigError
from sdengine.model_dir import optional_json, read_json, weights_variant
from sdengine.model_specs import Architecture

#: What a ControlNet's residuals must share with the UNet they are added to.
MATCHING = (
    "block_out_channels",
    "down_block_types",
    "layers_per_block",
    "cross_attention_dim",
    "projection_class_embeddings_input_dim",  # SDXL's added conditioning
)


def controlnet_config(path: str | os.PathLike) -> dict[str, Any]:
    """The config of the ControlNet directory ``path``; ModelDirectoryError where it is not one."""
    root = Path(path)
    if not root.is_dir():
        raise ModelDirectoryError(f"ControlNet directory {root} does not exist")
    config = read_json(root / "config.json")
    if config.get("_class_name") != "ControlNetModel":
        raise ModelDirectoryError(
            f"{root} is not a ControlNet: its config.json is a {config.get('_class_name')!r}, not a "
            "diffusers ControlNetModel"
        )
    return config


def check_controlnets(checkpoint: Path, arch: Architecture, paths: list[Path]) -> list[dict[str, Any]]:
    """Each ControlNet's config, checked against the checkpoint's UNet before anything is exported: the
    latents it reads, its conditioning image's channels and the residuals it adds must fit."""
    unet = optional_json(checkpoint / "unet" / "config.json")
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


def load_controlnets(paths: list[Path], dtype: Any = None) -> list[Any]:
    """The ControlNets as PyTorch modules in eval mode, in ``dtype`` (default float32)."""
    import torch
    from diffusers import ControlNetModel

    load = ControlNetModel.from_pretrained
    return [load(p, variant=weights_variant(p), torch_dtype=dtype or torch.float32).eval() for p in paths]


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
