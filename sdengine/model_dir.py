"""Reading model directories: a diffusers checkpoint, or an exported ONNX directory.

All the checks that a directory is complete live here, so every entry point fails the same way: one
:class:`ModelDirectoryError` naming the missing piece and what to run to make it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdengine.controlnet import CONTROLNET_CONFIG, exported_controlnets, exported_residuals
from sdengine.deepcache import DEEPCACHE_CONFIG, exported_deepcache
from sdengine.errors import CorruptModelError, ModelDirectoryError, UnsupportedConfigError
from sdengine.freeu import FREEU_CONFIG, exported_freeu
from sdengine.ip_adapter import IP_ADAPTER_CONFIG, exported_ip_adapter
from sdengine.manifest import MANIFEST_NAME
from sdengine.model_specs import (
    IMAGE_ENCODER,
    REQUIRED_COMPONENTS,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    TINY_VAE_CLASS,
    UNET,
    VAE_CLASSES,
    VAE_DECODER,
    Architecture,
)
from sdengine.pag import PAG_CONFIG, exported_pag

DEFAULT_VAE_SCALING_FACTOR = 0.18215
TOKENIZER_FILES = ("vocab.json", "merges.txt")
#: what makes a tokenizer folder complete in place of TOKENIZER_FILES (transformers 5 saves only it)
TOKENIZER_JSON = "tokenizer.json"
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelDirectoryError(f"missing file {path}") from None
    except (OSError, ValueError) as exc:
        raise CorruptModelError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise CorruptModelError(f"{path} does not hold a JSON object")
    return data


def optional_json(path: Path) -> dict[str, Any]:
    """A config file's object, or {} where the file is absent (a present but broken one is an error)."""
    return read_json(path) if path.is_file() else {}


def _require_dir(path: str | os.PathLike, what: str) -> Path:
    root = Path(path)
    if not root.exists():
        raise ModelDirectoryError(f"{what} {root} does not exist")
    if not root.is_dir():
        raise ModelDirectoryError(f"{what} {root} is not a directory")
    return root


def _require_files(root: Path, files: list[Path | tuple[Path, ...]], hint: str) -> None:
    """Each file of ``files`` is there; a tuple is a set of files that one file can stand in for, its last
    (a tokenizer folder's vocab.json and merges.txt, or its tokenizer.json)."""
    missing = []
    for entry in files:
        if isinstance(entry, Path):
            if not (root / entry).is_file():
                missing.append(str(entry))
        elif not (root / entry[-1]).is_file():
            absent = [str(f) for f in entry[:-1] if not (root / f).is_file()]
            if absent:
                missing.append(f"{' and '.join(absent)} (or {entry[-1]})")
    if missing:
        raise ModelDirectoryError(f"{root} is incomplete: missing {', '.join(missing)} ({hint})")


def architecture(root: Path, vae_folder: str) -> tuple[Architecture, float]:
    """The shape-fixing numbers and the VAE scaling factor, from the components' config.json files.

    Directories without them (some third-party exports) get SD 1.x defaults.
    """
    text = optional_json(root / "text_encoder" / "config.json")
    unet = optional_json(root / "unet" / "config.json")
    vae = optional_json(root / vae_folder / "config.json")
    tok = optional_json(root / "tokenizer" / "tokenizer_config.json")
    default = Architecture()
    blocks = vae.get("block_out_channels")
    latent = int(unet.get("out_channels", vae.get("latent_channels", default.latent_channels)))
    if vae.get("latents_mean") is not None or vae.get("latents_std") is not None:
        # Playground v2.5's: its latents are normalised per channel (and its EDM schedule has no counterpart
        # here); decoding them as SD's would give other images without an error
        raise UnsupportedConfigError(
            f"{root}: a VAE whose latents are normalised per channel (latents_mean, latents_std; "
            "Playground v2.5's) is not supported"
        )
    if vae.get("_class_name", VAE_CLASSES[0]) not in VAE_CLASSES:
        raise UnsupportedConfigError(
            f"{root}: a VAE of class {vae['_class_name']} is not supported (only {' or '.join(VAE_CLASSES)})"
        )
    unet_in = int(unet.get("in_channels", latent))
    if unet_in not in (latent, 2 * latent + 1):
        raise UnsupportedConfigError(
            f"{root}: a UNet with {unet_in} input channels for {latent} latent channels is not supported "
            f"(only {latent}, or {2 * latent + 1} for inpainting: latents, mask and masked image latents)"
        )
    arch = Architecture(
        latent_channels=latent,
        conditioning_channels=unet_in - latent,
        text_hidden_size=int(
            unet.get("cross_attention_dim", text.get("hidden_size", default.text_hidden_size))
        ),
        text_max_length=int(tok.get("model_max_length", default.text_max_length)),
        vae_scale_factor=2 ** (len(blocks) - 1) if blocks else default.vae_scale_factor,
        guidance_embedding=int(unet.get("time_cond_proj_dim") or 0),
        tiny_vae=vae.get("_class_name") == TINY_VAE_CLASS,
        **xl_sizes(root, unet),
    )
    return arch, float(vae.get("scaling_factor", DEFAULT_VAE_SCALING_FACTOR))


def xl_sizes(root: Path, unet: dict[str, Any]) -> dict[str, int]:
    """SDXL's numbers (:class:`Architecture`'s ``text_hidden_size_2``, ``pooled_size``, ``time_ids``),
    from its UNet's added conditioning and second text encoder; none for a UNet without it."""
    kind = unet.get("addition_embed_type")
    if kind is None:
        return {}
    if kind != "text_time":
        raise UnsupportedConfigError(
            f"{root}: a UNet with {kind!r} added conditioning is not supported (SDXL's is 'text_time')"
        )
    text2 = read_json(root / "text_encoder_2" / "config.json")
    pooled = int(text2.get("projection_dim", text2.get("hidden_size", 0)))
    try:
        time_ids = (int(unet["projection_class_embeddings_input_dim"]) - pooled) // int(
            unet["addition_time_embed_dim"]
        )
    except (KeyError, TypeError, ValueError):
        raise CorruptModelError(f"{root}/unet/config.json lacks SDXL's added-conditioning sizes") from None
    if time_ids not in (5, 6):
        raise UnsupportedConfigError(
            f"{root}: a UNet taking {time_ids} size numbers is not supported (SDXL's base takes 6, its "
            "refiner 5)"
        )
    return {"text_hidden_size_2": int(text2["hidden_size"]), "pooled_size": pooled, "time_ids": time_ids}


@dataclass(frozen=True)
class ModelDir:
    """A checked model directory: where each piece is, and the numbers read from its configs."""

    root: Path
    arch: Architecture
    vae_scaling_factor: float
    scheduler_config: dict[str, Any]
    default_image_size: int
    #: the VAE's training size in pixels (its config's sample_size): the tile size of tiled VAE runs
    vae_sample_size: int = 512
    #: SDXL (diffusers' ``force_zeros_for_empty_prompt``): where no negative prompt is given, the negative
    #: side of classifier-free guidance reads zeros, not the empty prompt's embeddings
    zero_negative: bool = False
    #: the VAE overflows float16 (SDXL's; its config's ``force_upcast``): exports keep it in float32
    vae_force_upcast: bool = False
    #: an export whose UNet is fused for ONNX Runtime's CUDA provider (``sdengine export --target cuda``),
    #: which alone runs it
    cuda_fused: bool = False
    #: an export whose UNet and VAE wrap around the image's edges (``sdengine export --seamless``): its
    #: images tile
    seamless: bool = False

    @property
    def tokenizer_dir(self) -> Path:
        """The prompt's tokenizer: the first text encoder's (the second's in SDXL's refiner, its only one)."""
        return self.root / ("tokenizer" if self.arch.first_text_encoder else "tokenizer_2")

    @property
    def tokenizer_2_dir(self) -> Path:
        """SDXL's second text encoder's tokenizer."""
        return self.root / "tokenizer_2"

    def onnx_path(self, component: str) -> Path:
        return self.root / component / "model.onnx"


def _first(size: int | list[int]) -> int:
    return int(size[0] if isinstance(size, list) else size)


def tokenizer_files(arch: Architecture) -> list[tuple[Path, ...]]:
    """The tokenizer files of each text encoder an architecture has: for each folder, vocab.json and
    merges.txt, or tokenizer.json in their place (as :func:`_require_files` reads such a tuple)."""
    folders = ["tokenizer"] * arch.first_text_encoder + ["tokenizer_2"] * arch.xl
    return [tuple(Path(folder) / name for name in (*TOKENIZER_FILES, TOKENIZER_JSON)) for folder in folders]


def text_encoders(arch: Architecture) -> list[str]:
    """The text encoders an architecture has (SDXL's refiner: the second alone)."""
    return [c for c in arch.components() if c in (TEXT_ENCODER, TEXT_ENCODER_2)]


def _open(
    root: Path,
    vae_folder: str,
    files: Callable[[Architecture], list[Path | tuple[Path, ...]]],
    hint: str,
    controlnets: int = 0,
    fields: dict[str, Any] | None = None,
) -> ModelDir:
    """The directory's numbers, once it holds the ``files`` its architecture needs; ``fields``: more of the
    architecture's, from the export's records (an IP-Adapter's, perturbed-attention guidance's)."""
    arch, scaling = architecture(root, vae_folder)
    arch = dataclasses.replace(arch, controlnets=controlnets, **(fields or {}))
    _require_files(root, files(arch), hint)
    unet = optional_json(root / "unet" / "config.json")
    default_image_size = _first(unet.get("sample_size", 64)) * arch.vae_scale_factor
    vae = optional_json(root / vae_folder / "config.json")
    index = optional_json(root / "model_index.json")
    return ModelDir(
        root=root,
        arch=arch,
        vae_scaling_factor=scaling,
        scheduler_config=read_json(root / SCHEDULER_CONFIG),
        default_image_size=default_image_size,
        vae_sample_size=_first(vae.get("sample_size", default_image_size)),
        zero_negative=arch.xl and bool(index.get("force_zeros_for_empty_prompt", True)),
        vae_force_upcast=bool(vae.get("force_upcast", False)),
    )


def open_onnx_dir(path: str | os.PathLike) -> ModelDir:
    """Check an exported ONNX directory (ours or Optimum's) and read its configs."""
    root = _require_dir(path, "ONNX model directory")
    hint = "a diffusers checkpoint? export it first: sdengine export CHECKPOINT --output ONNX_DIR"
    no_models = not any((root / c / "model.onnx").is_file() for c in REQUIRED_COMPONENTS)
    if no_models and (root / "unet" / "config.json").is_file():
        raise ModelDirectoryError(f"{root} has no ONNX models ({hint})")
    again = "re-run: sdengine export CHECKPOINT --output ONNX_DIR"
    _require_files(root, [Path(UNET) / "model.onnx", SCHEDULER_CONFIG], again)

    def files(arch: Architecture) -> list[Path | tuple[Path, ...]]:
        encoder = [Path(IMAGE_ENCODER) / "model.onnx"] if arch.ip_adapter else []
        return [Path(c) / "model.onnx" for c in arch.required_components()] + encoder + tokenizer_files(arch)

    control_config = optional_json(root / CONTROLNET_CONFIG)
    controlnets = exported_controlnets(control_config)
    residuals = {"control_residuals": exported_residuals(control_config)} if controlnets else {}
    ip_adapter = exported_ip_adapter(optional_json(root / IP_ADAPTER_CONFIG))
    pag = {"pag": True} if exported_pag(optional_json(root / PAG_CONFIG)) else {}
    deepcache = exported_deepcache(optional_json(root / DEEPCACHE_CONFIG))
    freeu = {"freeu": True} if exported_freeu(optional_json(root / FREEU_CONFIG)) else {}
    fields = {**residuals, **ip_adapter, **pag, **deepcache, **freeu}
    model_dir = _open(root, VAE_DECODER, files, again, len(controlnets), fields)
    manifest = optional_json(root / MANIFEST_NAME)
    cuda_fused, seamless = manifest.get("target") == "cuda", manifest.get("seamless") is True
    return dataclasses.replace(model_dir, cuda_fused=cuda_fused, seamless=seamless)


def open_checkpoint_dir(path: str | os.PathLike) -> ModelDir:
    """Check a diffusers-format Stable Diffusion checkpoint directory and read its configs."""
    root = _require_dir(path, "checkpoint directory")
    if (root / "unet" / "model.onnx").is_file() and not (root / "unet" / "config.json").is_file():
        raise ModelDirectoryError(f"{root} is an ONNX directory, not a diffusers checkpoint")
    needed = [Path("model_index.json"), SCHEDULER_CONFIG] + [Path(c) / "config.json" for c in ("unet", "vae")]
    hint = "expected a diffusers-format Stable Diffusion checkpoint"
    _require_files(root, needed, hint)

    def files(arch: Architecture) -> list[Path | tuple[Path, ...]]:
        return [Path(c) / "config.json" for c in text_encoders(arch)] + tokenizer_files(arch)

    return _open(root, "vae", files, hint)


#: Weight files diffusers and transformers look for in a component folder, without a variant.
WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "model.safetensors",
    "pytorch_model.bin",
)


def weights_variant(folder: str | os.PathLike) -> str | None:
    """The variant (``fp16``...) a component folder's weights are saved under, where there are no plain
    ones: a checkpoint downloaded with ``variant="fp16"`` holds only ``*.fp16.safetensors``, which
    ``from_pretrained`` finds only when told the variant. Sharded weights (``*.index.json``) count too."""
    folder = Path(folder)
    stems = [name.split(".")[0] for name in WEIGHT_FILES]
    if any((folder / name).is_file() or (folder / f"{name}.index.json").is_file() for name in WEIGHT_FILES):
        return None
    for path in sorted(folder.iterdir()) if folder.is_dir() else ():
        parts = path.name.split(".")
        if parts[0] not in stems:
            continue
        if len(parts) == 3 and parts[2] in ("safetensors", "bin"):  # name.VARIANT.safetensors
            return parts[1]
        if len(parts) == 5 and parts[2:5:2] == ["index", "json"]:  # name.safetensors.index.VARIANT.json
            return parts[3]
    return None
