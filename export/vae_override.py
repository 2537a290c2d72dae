"""Another VAE for a checkpoint: ``sdengine export CKPT --vae VAE``, as users swap in a fine-tuned decoder
(SD 1.x's ``sd-vae-ft-mse``) or one that runs in float16 (SDXL's ``sdxl-vae-fp16-fix``).

The checkpoint with its VAE replaced is a directory of its own in the cache (``$SDENGINE_CACHE/checkpoints``):
links to the checkpoint's components and to the VAE's folder, so nothing is copied, and the export's manifest
names a checkpoint that the PyTorch baseline loads with the same VAE. The VAE may be a diffusers
``AutoencoderKL`` folder, a checkpoint directory whose ``vae/`` is taken, or a single file in the original
layout (``vae-ft-mse-840000-ema-pruned.safetensors``), read by diffusers' ``from_single_file`` with the
checkpoint's own VAE config for its shape and saved once into the composed directory. Its config comes with
it: its scaling factor, and whether it must stay float32 in fp16 exports (``force_upcast``).

It may also be a tiny VAE (diffusers' ``AutoencoderTiny`` folder: TAESD for SD 1.x/2.x, TAESDXL for SDXL,
``export.tiny_vae`` writes random ones), which decodes and encodes many times faster than the usual one,
and a little less faithfully; the composed directory's ``model_index.json`` then names its class, so that
diffusers loads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from sdengine.cache import kept
from sdengine.errors import ModelDirectoryError, UnsupportedConfigError
from sdengine.model_dir import optional_json, read_json, weights_variant
from sdengine.model_specs import TINY_VAE_CLASS, VAE_CLASSES

VAE = "vae"
MODEL_INDEX = "model_index.json"


def vae_source(vae: str | os.PathLike) -> Path:
    """The ``AutoencoderKL`` or ``AutoencoderTiny`` folder (or single file) that ``vae`` names: a VAE folder,
    a checkpoint directory's ``vae/``, or a file."""
    path = Path(vae)
    if path.is_file():
        return path
    if not path.is_dir():
        raise ModelDirectoryError(f"VAE {path} does not exist")
    for folder in (path, path / VAE):
        config = optional_json(folder / "config.json")
        if config.get("_class_name") in VAE_CLASSES:
            return folder
    raise ModelDirectoryError(
        f"{path} holds no diffusers VAE (a config.json naming {' or '.join(VAE_CLASSES)}, here or in vae/)"
    )


def preview_vae_source(vae: str | os.PathLike, checkpoint: str | os.PathLike) -> Path:
    """The tiny VAE folder (``AutoencoderTiny``) that ``vae`` names (a folder, or a checkpoint directory's
    ``vae/``) for ``checkpoint``'s latents: ``sdengine export --preview-vae``, whose decoder draws
    previews."""
    source = vae_source(vae)
    config = read_json(source / "config.json") if source.is_dir() else {}
    if config.get("_class_name") != TINY_VAE_CLASS:
        raise ModelDirectoryError(
            f"{vae}: a preview VAE is a tiny one, a diffusers {TINY_VAE_CLASS} folder (TAESD, TAESDXL)"
        )
    _check_fits(config, Path(checkpoint), source)
    if weights_variant(source) is not None:
        raise UnsupportedConfigError(
            f"{source} holds only {weights_variant(source)}-variant weights: give one with plain weights"
        )
    return source


def _check_fits(vae_config: dict, checkpoint: Path, vae: Path) -> None:
    unet = read_json(checkpoint / "unet" / "config.json")
    latent = unet.get("out_channels")
    if vae_config.get("latent_channels") != latent:
        raise UnsupportedConfigError(
            f"VAE {vae} makes {vae_config.get('latent_channels')}-channel latents; {checkpoint}'s UNet "
            f"denoises {latent}-channel ones"
        )


def _key(checkpoint: Path, vae: Path) -> str:
    stamps = [str(checkpoint.resolve()), str(vae.resolve())]
    for path in (vae, *vae.glob("*")) if vae.is_dir() else (vae,):
        stamps.append(f"{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns}")
    return hashlib.sha256("\0".join(stamps).encode()).hexdigest()[:16]


def _convert_vae_file(file: Path, checkpoint: Path, target: Path) -> None:
    """A single-file VAE, shaped by the checkpoint's own VAE config, saved as a diffusers folder."""
    import torch
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_single_file(
            str(file), config=str(checkpoint), subfolder=VAE, local_files_only=True, torch_dtype=torch.float32
        )
    except Exception as exc:  # not a VAE, or one of another shape than the checkpoint's
        raise ModelDirectoryError(
            f"cannot read {file} as a VAE for {checkpoint}: {str(exc).splitlines()[0]}"
        ) from None
    vae.save_pretrained(target, safe_serialization=True)


def checkpoint_with_vae(checkpoint: str | os.PathLike, vae: str | os.PathLike) -> Path:
    """A checkpoint directory that is ``checkpoint`` with ``vae`` as its VAE (see the module's docs), made
    once and kept in the cache."""
    checkpoint, source = Path(checkpoint), vae_source(vae)
    if source.is_dir():
        _check_fits(read_json(source / "config.json"), checkpoint, source)
        if weights_variant(source) is not None:
            raise UnsupportedConfigError(
                f"{source} holds only {weights_variant(source)}-variant weights: give one with plain weights"
            )
    name = f"{checkpoint.resolve().name}+vae-{_key(checkpoint, source)}"
    make = lambda target: _compose(checkpoint, source, target)  # noqa: E731
    return kept("checkpoints", name, MODEL_INDEX, make, None if source.is_dir() else f"VAE {source}")


def _compose(checkpoint: Path, source: Path, target: Path) -> None:
    """Write ``target``: links to ``checkpoint``'s components but its VAE, and ``source`` as the VAE (a link
    to a folder, or a single file converted), staged under another name so that a failure leaves nothing."""
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        staging.mkdir(parents=True)
        for entry in checkpoint.resolve().iterdir():
            if entry.name not in (VAE, MODEL_INDEX) and not entry.name.startswith("."):
                (staging / entry.name).symlink_to(entry)
        index = read_json(checkpoint / MODEL_INDEX)
        if source.is_dir():
            (staging / VAE).symlink_to(source.resolve())
            index[VAE] = ["diffusers", read_json(source / "config.json")["_class_name"]]
        else:
            _convert_vae_file(source, checkpoint, staging / VAE)
            _check_fits(read_json(staging / VAE / "config.json"), checkpoint, source)
        (staging / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
