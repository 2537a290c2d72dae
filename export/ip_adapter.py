"""IP-Adapters for export: read and checked against the checkpoint's UNet, loaded into it as diffusers loads
them (``unet._load_ip_adapter_weights``, so the traced attention is diffusers' own), and random ones for
tests and the demo.

An IP-Adapter is the weights file of the plain kind (``ip-adapter_sd15.safetensors``, ``ip-adapter_sdxl``:
``image_proj.proj``/``image_proj.norm`` and one ``to_k_ip``/``to_v_ip`` pair per cross-attention layer) with
its CLIP image encoder (a transformers ``CLIPVisionModelWithProjection``) in ``image_encoder/`` beside it, as
the adapters' own repository lays them out. The other kinds (Plus, Full Face, FaceID) are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from sdengine.errors import InvalidArgumentError, ModelDirectoryError, UnsupportedConfigError
from sdengine.ip_adapter import IP_ADAPTER_CONFIG
from sdengine.model_dir import optional_json, read_json

#: The image encoder's folder, beside the adapter's weights file.
ENCODER_FOLDER = "image_encoder"
#: The tokens the plain IP-Adapter's projection makes of one image embedding.
TOKENS = 4


def read_ip_adapter(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The adapter's weights as diffusers' loader takes them (``{"image_proj": ..., "ip_adapter": ...}``,
    torch tensors); ModelDirectoryError for a missing or unreadable file, UnsupportedConfigError for a kind
    other than the plain IP-Adapter."""
    import torch
    from safetensors.torch import load_file

    file = Path(path)
    if not file.is_file():
        raise ModelDirectoryError(f"IP-Adapter file {file} does not exist")
    try:
        flat = load_file(str(file)) if file.suffix == ".safetensors" else torch.load(file, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - safetensors' and torch's own errors, as one line
        raise ModelDirectoryError(f"{file} is not an IP-Adapter weights file ({exc})") from None
    if "image_proj" in flat:  # the .bin layout: already split
        state = {"image_proj": dict(flat["image_proj"]), "ip_adapter": dict(flat["ip_adapter"])}
    else:
        state = {"image_proj": {}, "ip_adapter": {}}
        for key, value in flat.items():
            part, _, rest = key.partition(".")
            if part not in state:
                raise ModelDirectoryError(f"{file}: {key!r} is not an IP-Adapter weight")
            state[part][rest] = value
    if set(state["image_proj"]) != {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}:
        raise UnsupportedConfigError(
            f"{file}: only the plain IP-Adapter (image_proj.proj and .norm) is supported, not this kind "
            "(Plus, Full Face and FaceID adapters read the image encoder differently)"
        )
    return state


def image_encoder_dir(path: str | os.PathLike) -> Path:
    """The image encoder of the adapter file ``path``: ``image_encoder/`` beside it."""
    folder = Path(path).parent / ENCODER_FOLDER
    if not (folder / "config.json").is_file():
        raise ModelDirectoryError(
            f"{path}: no image encoder beside it ({folder}/config.json): IP-Adapters come with theirs"
        )
    return folder


def check_ip_adapter(checkpoint: Path, path: Path) -> dict[str, Any]:
    """What the export records of the adapter ``path``, checked against ``checkpoint``'s UNet and its own
    image encoder before anything is exported: the encoder's embeddings feed the projection, whose tokens
    are the UNet's cross-attention width, and there is one key/value pair per cross-attention layer."""
    state = read_ip_adapter(path)
    encoder = read_json(image_encoder_dir(path) / "config.json")
    vision = encoder.get("vision_config", encoder)
    embeds, size = int(encoder.get("projection_dim", 0)), int(vision.get("image_size", 224))
    proj = state["image_proj"]["proj.weight"]
    unet = optional_json(checkpoint / "unet" / "config.json")
    cross = unet.get("cross_attention_dim")
    if proj.shape[1] != embeds:
        raise UnsupportedConfigError(
            f"{path}: its projection takes embeddings of {proj.shape[1]}, its image encoder gives {embeds}"
        )
    if proj.shape[0] != TOKENS * int(cross or 0):
        raise UnsupportedConfigError(
            f"{path}: its image tokens are {proj.shape[0] // TOKENS} wide, the UNet's cross attention "
            f"{cross}: it was made for another Stable Diffusion architecture"
        )
    return {
        "file": str(path),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "image_encoder": str(image_encoder_dir(path)),
        "image_embeds": embeds,
        "image_size": size,
        "layers": len(state["ip_adapter"]) // 2,
    }


def load_ip_adapter(unet: Any, path: Path) -> None:
    """Load the adapter ``path`` into ``unet`` as diffusers' ``load_ip_adapter`` does (its attention
    processors, and the projection as the UNet's ``encoder_hid_proj``); UnsupportedConfigError where its
    layers do not match the UNet's."""
    try:
        unet._load_ip_adapter_weights([read_ip_adapter(path)], low_cpu_mem_usage=False)  # noqa: SLF001
    except (KeyError, RuntimeError) as exc:
        raise UnsupportedConfigError(
            f"{path}: its attention layers do not fit this UNet ({str(exc).splitlines()[0]}): it was made "
            "for another Stable Diffusion architecture"
        ) from None


def write_ip_adapter_config(out_dir: Path, record: dict[str, Any] | None) -> None:
    """Say which IP-Adapter the exported UNet holds (none: no file, so an older one never outlives it)."""
    path = out_dir / IP_ADAPTER_CONFIG
    if record is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def write_random_ip_adapter(checkpoint: str | os.PathLike, output: str | os.PathLike, seed: int = 0) -> Path:
    """A random plain IP-Adapter for ``checkpoint``'s UNet, with a small random CLIP image encoder beside
    it, written to ``output`` (``ip-adapter.safetensors`` and ``image_encoder/``); returns the weights file.
    Its weights are random: it follows no image."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidArgumentError(f"{out} exists and is not an empty directory")
    config = read_json(Path(checkpoint) / "unet" / "config.json")
    cross, channels = int(config["cross_attention_dim"]), list(config["block_out_channels"])
    embeds = 32 if cross <= 256 else 1024  # a toy model's toy encoder; ViT-H's width for the real sizes
    digest = hashlib.sha256(f"sdengine-random-ip-adapter:{seed}".encode()).digest()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        state = {
            "image_proj.proj.weight": torch.randn(TOKENS * cross, embeds) / embeds**0.5,
            "image_proj.proj.bias": torch.randn(TOKENS * cross) * 0.1,
            "image_proj.norm.weight": 1 + torch.randn(cross) * 0.1,
            "image_proj.norm.bias": torch.randn(cross) * 0.1,
        }
        unet = UNet2DConditionModel.from_config(config)
        key = 1  # diffusers numbers the cross-attention layers 1, 3, 5 ... in its processors' order
        for name in unet.attn_processors:
            if name.endswith("attn1.processor"):
                continue
            if name.startswith("mid_block"):
                hidden = channels[-1]
            elif name.startswith("up_blocks"):
                hidden = list(reversed(channels))[int(name[len("up_blocks.")])]
            else:
                hidden = channels[int(name[len("down_blocks.")])]
            for kind in ("k", "v"):
                state[f"ip_adapter.{key}.to_{kind}_ip.weight"] = torch.randn(hidden, cross) / cross**0.5
            key += 2
        small = embeds == 32
        vision = CLIPVisionConfig(
            hidden_size=32 if small else 1280,
            intermediate_size=64 if small else 5120,
            num_hidden_layers=2 if small else 32,
            num_attention_heads=4 if small else 16,
            image_size=32 if small else 224,
            patch_size=8 if small else 14,
            projection_dim=embeds,
            hidden_act="gelu",
        )
        encoder = CLIPVisionModelWithProjection(vision).eval()
    out.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(out / ENCODER_FOLDER, safe_serialization=True)
    weights = out / "ip-adapter.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    return weights
