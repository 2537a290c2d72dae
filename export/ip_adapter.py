"""IP-Adapters for export: read and checked against the checkpoint's UNet, loaded into it as diffusers loads
them (``unet._load_ip_adapter_weights``, so the traced attention is diffusers' own), and random ones for
tests and the demo.

An IP-Adapter is a weights file (``image_proj.*``, and one ``to_k_ip``/``to_v_ip`` pair per cross-attention
layer) with its CLIP image encoder (a transformers ``CLIPVisionModelWithProjection``) in ``image_encoder/``
beside it, as the adapters' own repository lays them out. Its kind is told by its projection's weights: the
plain IP-Adapter's ``proj``/``norm`` (``ip-adapter_sd15``, ``ip-adapter_sdxl``) and the Plus kind's resampler
``latents`` (``ip-adapter-plus_sd15``, ``-plus-face``, ``ip-adapter-plus_sdxl_vit-h``). Refused: FaceID
adapters, which read a face model's embedding, and Full Face (``proj.0``...``proj.3``), whose loader in
diffusers assumes ViT-H's 257 tokens, too large an encoder to check it against here.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from export.records import write_record
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
    not supported (:func:`adapter_kind`)."""
    import torch
    from safetensors.torch import load_file

    file = Path(path)
    if file.is_dir():
        inside = sorted(p.name for p in file.iterdir() if p.suffix in (".safetensors", ".bin"))
        raise ModelDirectoryError(
            f"IP-Adapter {file} is a directory: give its weights file"
            + (f" ({', '.join(str(file / name) for name in inside)})" if inside else "")
        )
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
    adapter_kind(state, file)
    return state


#: The projection weights of each supported kind (Plus: some of them; it has a block of each per layer).
KINDS = {
    "plain": {"proj.weight", "proj.bias", "norm.weight", "norm.bias"},
    "plus": {"latents", "proj_in.weight", "proj_out.weight", "norm_out.weight"},
}


def adapter_kind(state: dict[str, dict[str, Any]], file: Path) -> str:
    """ "plain" or "plus" (:data:`KINDS`); UnsupportedConfigError for another kind."""
    keys = set(state["image_proj"])
    for kind, needed in KINDS.items():
        if needed <= keys and (kind != "plain" or keys == needed) and not any("perceiver" in k for k in keys):
            return kind
    raise UnsupportedConfigError(
        f"{file}: an IP-Adapter of another kind (FaceID's, which read a face model's embedding, Full Face's, "
        "and others); the plain and Plus kinds are supported"
    )


def reads_hidden_states(path: str | os.PathLike) -> bool:
    """The adapter reads the image encoder's penultimate layer (Plus), not its projection."""
    return adapter_kind(read_ip_adapter(path), Path(path)) != "plain"


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
    are the UNet's cross-attention width (its attention layers meet the UNet's as it loads:
    :func:`load_ip_adapter`)."""
    state = read_ip_adapter(path)
    kind, proj = adapter_kind(state, path), state["image_proj"]
    encoder = read_json(image_encoder_dir(path) / "config.json")
    vision = encoder.get("vision_config", encoder)
    size, patch = int(vision.get("image_size", 224)), int(vision.get("patch_size", 14))
    cross = int(optional_json(checkpoint / "unet" / "config.json").get("cross_attention_dim") or 0)
    # what the projection reads from the encoder, and the width of the tokens it gives the UNet
    if kind == "plain":  # the projected embedding in, 4 tokens out
        embeds, tokens = int(encoder.get("projection_dim", 0)), 0
        reads, gives = proj["proj.weight"].shape[1], proj["proj.weight"].shape[0] // TOKENS
    else:  # every token of the penultimate layer in
        embeds, tokens = int(vision.get("hidden_size", 0)), (size // patch) ** 2 + 1
        reads, gives = proj["proj_in.weight"].shape[1], proj["proj_out.weight"].shape[0]
    if reads != embeds:
        raise UnsupportedConfigError(
            f"{path}: its projection takes embeddings of {reads}, its image encoder gives {embeds}"
        )
    if gives != cross:
        raise UnsupportedConfigError(
            f"{path}: its image tokens are {gives} wide, the UNet's cross attention {cross}: it was made for "
            "another Stable Diffusion architecture"
        )
    return {
        "file": str(path),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "kind": kind,
        "image_encoder": str(image_encoder_dir(path)),
        "image_embeds": embeds,
        "image_size": size,
        "image_tokens": tokens,
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
    write_record(out_dir, IP_ADAPTER_CONFIG, record)


def write_random_ip_adapter(
    checkpoint: str | os.PathLike, output: str | os.PathLike, seed: int = 0, kind: str = "plain"
) -> Path:
    """A random IP-Adapter of ``kind`` ("plain" or "plus") for ``checkpoint``'s UNet, with a random CLIP
    image encoder beside it (ViT-H's sizes for a full-size UNet, toy ones for a toy one), written to
    ``output`` (``ip-adapter.safetensors`` and ``image_encoder/``); returns the weights file. Its weights are
    random: it follows no image."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if kind not in ("plain", "plus"):
        raise InvalidArgumentError(f"unknown IP-Adapter kind {kind!r}; choose plain or plus")
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidArgumentError(f"{out} exists and is not an empty directory")
    config = read_json(Path(checkpoint) / "unet" / "config.json")
    cross, channels = int(config["cross_attention_dim"]), list(config["block_out_channels"])
    small = cross <= 256  # a toy model's toy encoder; ViT-H's sizes for the real ones
    embeds, states = (32, 32) if small else (1024, 1280)  # projected embedding, penultimate layer's states
    digest = hashlib.sha256(f"sdengine-random-ip-adapter:{kind}:{seed}".encode()).digest()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        state = plus_projection(states, cross) if kind == "plus" else plain_projection(embeds, cross)
        unet = UNet2DConditionModel.from_config(config)
        key = 1  # diffusers numbers the cross-attention layers 1, 3, 5 ... in its processors' order
        for name in unet.attn_processors:
            if name.endswith("attn1.processor"):
                continue
            if name.startswith("mid_block"):
                width = channels[-1]
            elif name.startswith("up_blocks"):
                width = list(reversed(channels))[int(name[len("up_blocks.")])]
            else:
                width = channels[int(name[len("down_blocks.")])]
            for part in ("k", "v"):
                state[f"ip_adapter.{key}.to_{part}_ip.weight"] = torch.randn(width, cross) / cross**0.5
            key += 2
        vision = CLIPVisionConfig(
            hidden_size=states,
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


def plain_projection(embeds: int, cross: int) -> dict[str, Any]:
    """Random weights of the plain IP-Adapter's projection: the image embedding to 4 tokens, normalised."""
    import torch

    return {
        "image_proj.proj.weight": torch.randn(TOKENS * cross, embeds) / embeds**0.5,
        "image_proj.proj.bias": torch.randn(TOKENS * cross) * 0.1,
        "image_proj.norm.weight": 1 + torch.randn(cross) * 0.1,
        "image_proj.norm.bias": torch.randn(cross) * 0.1,
    }


def plus_projection(states: int, cross: int, queries: int = 16, depth: int = 4) -> dict[str, Any]:
    """Random weights of the Plus kind's resampler, in the adapters' own layout: ``queries`` learnt tokens
    attend, ``depth`` times, to the encoder's states (``states`` wide; heads of 64), each block followed by
    a feed-forward of 4 times the width; the tokens are as wide as the UNet's cross attention."""
    import torch

    inner, width = 64 * max(1, cross // 64), cross

    def linear(rows: int, cols: int) -> Any:
        return torch.randn(rows, cols) / cols**0.5

    state = {
        "image_proj.latents": torch.randn(1, queries, width) / width**0.5,
        "image_proj.proj_in.weight": linear(width, states),
        "image_proj.proj_in.bias": torch.randn(width) * 0.1,
        "image_proj.proj_out.weight": linear(cross, width),
        "image_proj.proj_out.bias": torch.randn(cross) * 0.1,
        "image_proj.norm_out.weight": 1 + torch.randn(cross) * 0.1,
        "image_proj.norm_out.bias": torch.randn(cross) * 0.1,
    }
    for i in range(depth):
        block = f"image_proj.layers.{i}"
        for norm in (f"{block}.0.norm1", f"{block}.0.norm2", f"{block}.1.0"):
            state[f"{norm}.weight"] = 1 + torch.randn(width) * 0.1
            state[f"{norm}.bias"] = torch.randn(width) * 0.1
        state[f"{block}.0.to_q.weight"] = linear(inner, width)
        state[f"{block}.0.to_kv.weight"] = linear(2 * inner, width)
        state[f"{block}.0.to_out.weight"] = linear(width, inner)
        state[f"{block}.1.1.weight"] = linear(4 * width, width)
        state[f"{block}.1.3.weight"] = linear(width, 4 * width)
    return state
