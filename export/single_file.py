"""Single-file checkpoints: one ``.safetensors`` (or ``.ckpt``) in the original layout, as the AUTOMATIC1111
web UI, ComfyUI and most shared fine-tunes keep Stable Diffusion, turned into a diffusers-format directory.

The conversion is diffusers' own ``from_single_file`` (its key mapping is the reference one; writing a second
would only add a way to differ), then ``save_pretrained``. What this module adds is what a user meets around
it: the file's family (SD 1.x, 2.x, SDXL base, SDXL refiner, their inpainting models) is read from its keys
and anything else refused in one line; the components' configs and tokenizer, which a single file does not
hold, come from ``config`` (a diffusers-format directory of the same architecture, whose weights are not
read) or else from the Hugging Face Hub, as diffusers fetches them; a config directory of another family is
refused before anything loads; weights keep the file's float16 (saved as the ``fp16`` variant, as a
``variant="fp16"`` download is) or become float32. A single file holds no safety checker, so the directory
has none.

:func:`converted_checkpoint` keeps each conversion in the cache (``$SDENGINE_CACHE/checkpoints``), keyed by
the file (path, size, modification time) and the config directory, so ``sdengine export FILE`` converts once
and the export's manifest names a directory that the PyTorch baseline can load afterwards.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from sdengine.cache import kept
from sdengine.errors import ModelDirectoryError, SDEngineError, UnsupportedConfigError
from sdengine.model_dir import optional_json

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

#: diffusers' name for each family a single file can hold that sdengine runs -> its pipeline class
PIPELINE_CLASSES = {
    "v1": "StableDiffusionPipeline",
    "v2": "StableDiffusionPipeline",
    "inpainting": "StableDiffusionInpaintPipeline",
    "inpainting_v2": "StableDiffusionInpaintPipeline",
    "xl_base": "StableDiffusionXLPipeline",
    "xl_refiner": "StableDiffusionXLImg2ImgPipeline",
    "xl_inpaint": "StableDiffusionXLInpaintPipeline",
}
FAMILY_NAMES = {
    "v1": "SD 1.x",
    "v2": "SD 2.x",
    "inpainting": "SD 1.x inpainting",
    "inpainting_v2": "SD 2.x inpainting",
    "xl_base": "SDXL base",
    "xl_refiner": "SDXL refiner",
    "xl_inpaint": "SDXL inpainting",
}
UNET_IN_WEIGHT = "model.diffusion_model.input_blocks.0.0.weight"


def is_single_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file that may hold a whole single-file checkpoint."""
    return Path(path).is_file() and Path(path).suffix.lower() in SINGLE_FILE_SUFFIXES


def _read_state_dict(path: Path) -> dict[str, Any]:
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    try:
        return load_single_file_checkpoint(str(path), local_files_only=True)
    except Exception as exc:  # safetensors, pickle and zip errors alike: the file is not a checkpoint
        raise ModelDirectoryError(f"cannot read {path} as a checkpoint: {str(exc).splitlines()[0]}") from None


def checkpoint_family(state_dict: dict[str, Any], path: Path) -> str:
    """diffusers' family name (``v1``, ``xl_base``...) of a single file's weights; other families refused."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    if UNET_IN_WEIGHT not in state_dict:
        raise UnsupportedConfigError(
            f"{path} holds no Stable Diffusion UNet ({UNET_IN_WEIGHT} is missing): a LoRA, VAE, embedding or "
            "ControlNet file is not a checkpoint (LoRAs: --lora; ControlNets: --controlnet)"
        )
    family = infer_diffusers_model_type(state_dict)
    if family not in PIPELINE_CLASSES:
        raise UnsupportedConfigError(
            f"{path} is a {family!r} checkpoint; sdengine runs {', '.join(FAMILY_NAMES.values())} checkpoints"
        )
    return family


def _check_config(config: Path, family: str, path: Path, unet_inputs: int) -> None:
    """Refuse a config directory of another family than the file's (``unet_inputs``: its UNet's input
    channels), before diffusers loads anything."""
    if not config.is_dir():
        raise ModelDirectoryError(f"config directory {config} does not exist")
    index = optional_json(config / "model_index.json")
    if not index:
        raise ModelDirectoryError(
            f"{config} has no model_index.json: --config takes a diffusers-format checkpoint directory"
        )
    config_xl = "XL" in str(index.get("_class_name", ""))
    if config_xl != family.startswith("xl_"):
        raise UnsupportedConfigError(
            f"{path} is an {FAMILY_NAMES[family]} checkpoint, but {config} holds a "
            f"{index.get('_class_name')}'s configs: give a config directory of the same architecture"
        )
    config_inputs = optional_json(config / "unet" / "config.json").get("in_channels", unet_inputs)
    if config_inputs != unet_inputs:
        raise UnsupportedConfigError(
            f"{path}'s UNet takes {unet_inputs} input channels, {config}'s {config_inputs}: give the configs "
            f"of {'an inpainting' if unet_inputs > config_inputs else 'a plain'} model of its architecture"
        )


def convert_single_file(
    path: str | os.PathLike, output: str | os.PathLike, config: str | os.PathLike | None = None
) -> Path:
    """Write the single-file checkpoint ``path`` as a diffusers-format directory ``output`` (which must not
    exist). ``config``: a diffusers-format directory of the same architecture for the configs and tokenizer
    (offline); without it diffusers fetches them from the Hugging Face Hub."""
    import diffusers
    import torch

    path, output = Path(path), Path(output)
    if not path.is_file():
        raise ModelDirectoryError(f"checkpoint file {path} does not exist")
    if output.exists():
        raise ModelDirectoryError(f"{output} exists; choose a new directory for the converted checkpoint")
    state_dict = _read_state_dict(path)
    family = checkpoint_family(state_dict, path)
    if config is not None:
        _check_config(Path(config), family, path, int(state_dict[UNET_IN_WEIGHT].shape[1]))
    half = state_dict[UNET_IN_WEIGHT].dtype == torch.float16
    del state_dict
    pipeline_class = getattr(diffusers, PIPELINE_CLASSES[family])
    extra = (
        {"safety_checker": None, "requires_safety_checker": False}
        if "XL" not in pipeline_class.__name__
        else {}
    )
    try:
        pipe = pipeline_class.from_single_file(
            str(path),
            config=None if config is None else str(config),
            torch_dtype=torch.float16 if half else torch.float32,
            local_files_only=config is not None,
            **extra,
        )
    except SDEngineError:
        raise
    except Exception as exc:  # network, shape mismatch against the configs, a truncated file
        hint = (
            "" if config is not None else " (offline? --config DIR gives the configs and tokenizer locally)"
        )
        raise ModelDirectoryError(
            f"cannot convert {path} ({FAMILY_NAMES[family]}): {str(exc).splitlines()[0]}{hint}"
        ) from None
    staging = output.with_name(f".{output.name}.{uuid.uuid4().hex}.tmp")
    try:
        pipe.save_pretrained(staging, safe_serialization=True, variant="fp16" if half else None)
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def _conversion_key(path: Path, config: str | os.PathLike | None) -> str:
    stat = path.stat()
    parts = [str(path.resolve()), str(stat.st_size), str(stat.st_mtime_ns)]
    if config is not None:
        index = Path(config) / "model_index.json"
        parts += [str(Path(config).resolve()), str(index.stat().st_mtime_ns if index.is_file() else 0)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def converted_checkpoint(path: str | os.PathLike, config: str | os.PathLike | None = None) -> Path:
    """The diffusers-format directory of single-file checkpoint ``path``, converted on first use and kept in
    the cache (a changed file, or another config directory, converts again)."""
    path = Path(path)
    if not path.is_file():
        raise ModelDirectoryError(f"checkpoint file {path} does not exist")
    name = f"{path.stem}-{_conversion_key(path, config)}"
    make = lambda target: convert_single_file(path, target, config)  # noqa: E731
    return kept("checkpoints", name, "model_index.json", make, str(path))
