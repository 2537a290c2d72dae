"""Randomly initialised Stable Diffusion 1.x and SDXL checkpoints in diffusers format.

Real weights cannot be downloaded here, yet export, runtime and parity tests need a checkpoint with the real
SD 1.x architecture (block types, layer counts, tensor names). ``write_random_checkpoint`` writes one that
``diffusers.StableDiffusionPipeline.from_pretrained`` loads offline:

* ``tiny``: SD 1.x's exact topology at toy widths, small enough that a 64x64 image runs through the whole
  pipeline in a fraction of a second on a laptop CPU. Tests use this one.
* ``sd15``: SD 1.5's exact sizes (about 1.07 B parameters, 4.3 GB in fp32), for export and speed checks.
* ``tiny-xl`` and ``sdxl``: the same for SDXL base (two text encoders, the UNet's added conditioning, SDXL's
  VAE scaling and Euler scheduler); ``sdxl`` has its exact sizes (about 3.5 B parameters, 14 GB in fp32).
* ``tiny-xl-refiner``: SDXL's refiner at toy widths: the second text encoder alone, a four-block UNet
  conditioned on an aesthetic score in place of the target size, for image to image; ``sdxl-refiner`` has
  SDXL refiner 1.0's exact sizes (about 3.0 B parameters).

Weights are seeded per component, so the same seed gives byte-identical files on the same library versions.
The tokenizer is the small generated vocabulary of :mod:`export.tokenizer_vocab`, since CLIP's real one
cannot be downloaded either.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.tokenizer_vocab import MODEL_MAX_LENGTH, build_vocab, write_tokenizer_files
from sdengine.errors import InvalidArgumentError, ModelDirectoryError

PRESETS: tuple[str, ...] = ("tiny", "sd15", "tiny-xl", "sdxl", "tiny-xl-refiner", "sdxl-refiner")
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction")
COMPONENTS: tuple[str, ...] = ("tokenizer", "scheduler", "text_encoder", "unet", "vae")

SD15_VOCAB_SIZE = 49408
DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
VAE_SCALING_FACTOR = 0.18215
XL_DOWN_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
XL_UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
REFINER_DOWN_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
REFINER_UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
XL_VAE_SCALING_FACTOR = 0.13025

# SD 1.5's scheduler/scheduler_config.json; prediction_type is added from the argument.
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


# SDXL base's scheduler/scheduler_config.json (Euler), prediction_type added as above.
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    **SD15_SCHEDULER_CONFIG,
    "interpolation_type": "linear",
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}


@dataclass(frozen=True)
class _XlSizes:
    """SDXL's own numbers: its second text encoder's and its UNet's (three blocks, deeper transformers; the
    refiner's four, and no first text encoder)."""

    text_hidden: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    text_vocab: int | None
    unet_channels: tuple[int, ...]
    unet_heads: tuple[int, ...]
    transformer_layers: tuple[int, ...]
    time_embed_dim: int
    refiner: bool = False


@dataclass(frozen=True)
class _Sizes:
    """The numbers that differ between presets; everything else is SD 1.x's."""

    text_hidden: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    text_vocab: int | None  # None: the tokenizer's vocabulary size
    unet_channels: tuple[int, int, int, int]
    unet_heads: int
    unet_sample_size: int
    vae_channels: tuple[int, int, int, int]
    vae_sample_size: int
    norm_groups: int
    xl: _XlSizes | None = None  # SDXL: its second text encoder and UNet; the first text encoder is above


_PRESET_SIZES: dict[str, _Sizes] = {
    "tiny": _Sizes(
        text_hidden=32,
        text_layers=2,
        text_heads=4,
        text_intermediate=64,
        text_vocab=None,
        unet_channels=(16, 16, 32, 32),
        unet_heads=2,
        unet_sample_size=8,
        vae_channels=(16, 16, 32, 32),
        vae_sample_size=64,
        norm_groups=8,
    ),
    "sd15": _Sizes(
        text_hidden=768,
        text_layers=12,
        text_heads=12,
        text_intermediate=3072,
        text_vocab=SD15_VOCAB_SIZE,
        unet_channels=(320, 640, 1280, 1280),
        unet_heads=8,
        unet_sample_size=64,
        vae_channels=(128, 256, 512, 512),
        vae_sample_size=512,
        norm_groups=32,
    ),
}
_PRESET_SIZES["tiny-xl"] = dataclasses.replace(
    _PRESET_SIZES["tiny"],
    xl=_XlSizes(
        text_hidden=32,
        text_layers=3,
        text_heads=4,
        text_intermediate=64,
        text_vocab=None,
        unet_channels=(16, 32, 32),
        unet_heads=(2, 2, 4),
        transformer_layers=(1, 1, 2),
        time_embed_dim=8,
    ),
)
_PRESET_SIZES["tiny-xl-refiner"] = dataclasses.replace(  # tiny-xl's text encoder, the refiner's four blocks
    _PRESET_SIZES["tiny-xl"],
    xl=dataclasses.replace(
        _PRESET_SIZES["tiny-xl"].xl,  # type: ignore[arg-type]
        unet_channels=(16, 16, 32, 32),
        unet_heads=(2, 2, 4, 4),
        transformer_layers=(1, 1, 2, 1),
        refiner=True,
    ),
)
_PRESET_SIZES["sdxl"] = dataclasses.replace(
    _PRESET_SIZES["sd15"],
    unet_sample_size=128,
    vae_sample_size=1024,
    xl=_XlSizes(
        text_hidden=1280,
        text_layers=32,
        text_heads=20,
        text_intermediate=5120,
        text_vocab=SD15_VOCAB_SIZE,
        unet_channels=(320, 640, 1280),
        unet_heads=(5, 10, 20),
        transformer_layers=(1, 2, 10),
        time_embed_dim=256,
    ),
)


_PRESET_SIZES["sdxl-refiner"] = dataclasses.replace(  # sdxl's second text encoder and VAE, the refiner's UNet
    _PRESET_SIZES["sdxl"],
    xl=dataclasses.replace(
        _PRESET_SIZES["sdxl"].xl,  # type: ignore[arg-type]
        unet_channels=(384, 768, 1536, 1536),
        unet_heads=(6, 12, 24, 24),
        transformer_layers=(4, 4, 4, 4),
        refiner=True,
    ),
)


def _component_seed(seed: int, component: str) -> int:
    """An independent seed per component, so changing one model's size never changes another's weights."""
    digest = hashlib.sha256(f"sdengine-random-checkpoint:{seed}:{component}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _write_text_encoder(
    out: Path, sizes: _Sizes | _XlSizes, seed: int, tokenizer_vocab_size: int, second: bool = False
) -> None:
    """CLIP ViT-L's text encoder at ``sizes``; ``second``: SDXL's second one (OpenCLIP ViT-bigG's: GELU,
    and a projection of the pooled output)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    # Special ids come from the tokenizer's layout (BOS and EOS are its last two ids). With eos_token_id != 2,
    # transformers pools at the first EOS instead of at argmax(input_ids); both pick the same position here.
    config = CLIPTextConfig(
        vocab_size=sizes.text_vocab or tokenizer_vocab_size,
        hidden_size=sizes.text_hidden,
        intermediate_size=sizes.text_intermediate,
        projection_dim=sizes.text_hidden,
        num_hidden_layers=sizes.text_layers,
        num_attention_heads=sizes.text_heads,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act="gelu" if second else "quick_gelu",
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
        dropout=0.0,
        initializer_range=0.02,
        initializer_factor=1.0,
        bos_token_id=tokenizer_vocab_size - 2,
        eos_token_id=tokenizer_vocab_size - 1,
        pad_token_id=tokenizer_vocab_size - 1,
    )
    name = "text_encoder_2" if second else "text_encoder"
    cls = CLIPTextModelWithProjection if second else CLIPTextModel
    config.architectures = [cls.__name__]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_component_seed(seed, name))
        model = cls(config).eval()
    model.save_pretrained(out / name, safe_serialization=True)


def _xl_unet_config(sizes: _Sizes, xl: _XlSizes) -> dict[str, Any]:
    """SDXL base's UNet settings at these sizes: three blocks, linear projections in deeper transformers,
    and the added conditioning of the pooled text embeddings and six size numbers (the refiner: four
    blocks, the second text encoder's states alone, and five numbers: an aesthetic score for the target
    size)."""
    return {
        "down_block_types": REFINER_DOWN_BLOCK_TYPES if xl.refiner else XL_DOWN_BLOCK_TYPES,
        "up_block_types": REFINER_UP_BLOCK_TYPES if xl.refiner else XL_UP_BLOCK_TYPES,
        "block_out_channels": xl.unet_channels,
        "attention_head_dim": xl.unet_heads,
        "transformer_layers_per_block": xl.transformer_layers,
        "use_linear_projection": True,
        "cross_attention_dim": xl.text_hidden if xl.refiner else sizes.text_hidden + xl.text_hidden,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": xl.time_embed_dim,
        "projection_class_embeddings_input_dim": (5 if xl.refiner else 6) * xl.time_embed_dim
        + xl.text_hidden,
    }


def _write_unet(
    out: Path, sizes: _Sizes, seed: int, inpainting: bool = False, guidance_embedding: int = 0
) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    config: dict[str, Any] = {
        "down_block_types": DOWN_BLOCK_TYPES,
        "up_block_types": UP_BLOCK_TYPES,
        "block_out_channels": sizes.unet_channels,
        "cross_attention_dim": sizes.text_hidden,
        # As in SD 1.x's own config, this diffusers field holds the number of heads.
        "attention_head_dim": sizes.unet_heads,
    }
    if sizes.xl:
        config.update(_xl_unet_config(sizes, sizes.xl))
    if guidance_embedding:  # a latent consistency model's (LCM_Dreamshaper_v7's is 256)
        config["time_cond_proj_dim"] = guidance_embedding
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_component_seed(seed, "unet"))
        model = UNet2DConditionModel(
            sample_size=sizes.unet_sample_size,
            in_channels=9 if inpainting else 4,  # inpainting: latents, mask, masked image latents
            out_channels=4,
            center_input_sample=False,
            flip_sin_to_cos=True,
            freq_shift=0,
            layers_per_block=2,
            downsample_padding=1,
            mid_block_scale_factor=1,
            act_fn="silu",
            norm_num_groups=sizes.norm_groups,
            norm_eps=1e-5,
            **config,
        ).eval()
    model.save_pretrained(out / "unet", safe_serialization=True)


def _write_vae(out: Path, sizes: _Sizes, seed: int) -> None:
    import torch
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_component_seed(seed, "vae"))
        model = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=sizes.vae_channels,
            layers_per_block=2,
            act_fn="silu",
            latent_channels=4,
            norm_num_groups=sizes.norm_groups,
            sample_size=sizes.vae_sample_size,
            scaling_factor=XL_VAE_SCALING_FACTOR if sizes.xl else VAE_SCALING_FACTOR,
            force_upcast=sizes.xl is not None,  # SDXL's VAE overflows float16
        ).eval()
    model.save_pretrained(out / "vae", safe_serialization=True)


def _write_safety_checker(out: Path, seed: int) -> None:
    """A small random safety checker (SD 1.x's architecture: a CLIP vision model, a projection, 17 concept
    and 3 special-care embeddings with their thresholds) and CLIP's image processor settings. Its
    thresholds sit above the cosine similarities random embeddings give, so it flags nothing until a
    test lowers them."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 224,
            "patch_size": 32,
        },
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(_component_seed(seed, "safety_checker"))
        model = StableDiffusionSafetyChecker(config).eval()
        model.concept_embeds.normal_()
        model.special_care_embeds.normal_()
        model.concept_embeds_weights.fill_(0.9)
        model.special_care_embeds_weights.fill_(0.9)
    model.save_pretrained(out / "safety_checker", safe_serialization=True)
    CLIPImageProcessor().save_pretrained(out / "feature_extractor")


def _write_scheduler(out: Path, prediction_type: str, xl: bool = False) -> None:
    """Written as JSON, as SD 1.5 (PNDM) and SDXL (Euler) ship it: it holds ``clip_sample``, which PNDM
    itself does not take but which other schedulers built ``from_config`` (DDIM) read."""
    import diffusers

    config = {
        "_class_name": "EulerDiscreteScheduler" if xl else "PNDMScheduler",
        "_diffusers_version": diffusers.__version__,
        **(SDXL_SCHEDULER_CONFIG if xl else SD15_SCHEDULER_CONFIG),
        "prediction_type": prediction_type,
    }
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    (out / "scheduler" / "scheduler_config.json").write_text(text)


def _write_model_index(out: Path, inpainting: bool = False, safety_checker: bool = False) -> None:
    import diffusers

    if (out / "text_encoder_2").is_dir():
        _write_xl_model_index(out, inpainting, refiner=not (out / "text_encoder").is_dir())
        return
    index = {
        "_class_name": "StableDiffusionInpaintPipeline" if inpainting else "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": ["transformers", "CLIPImageProcessor"] if safety_checker else [None, None],
        "requires_safety_checker": safety_checker,
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"]
        if safety_checker
        else [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_xl_model_index(out: Path, inpainting: bool, refiner: bool = False) -> None:
    """SDXL base's model_index.json, or its refiner's (an image-to-image pipeline with no first text encoder,
    conditioned on an aesthetic score, whose negative side reads the empty prompt)."""
    import diffusers

    kind = "Img2Img" if refiner else "Inpaint" if inpainting else ""
    index = {
        "_class_name": f"StableDiffusionXL{kind}Pipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "force_zeros_for_empty_prompt": not refiner,
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": [None, None] if refiner else ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": [None, None] if refiner else ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        **({"requires_aesthetics_score": True} if refiner else {}),
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _prepare_target(target: Path, overwrite: bool) -> None:
    """Refuse to clobber anything that is not ours to replace."""
    if target.exists() and not target.is_dir():
        raise InvalidArgumentError(f"{target} exists and is not a directory; choose a directory path")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise InvalidArgumentError(
                f"{target} already exists and is not empty; pass overwrite=True (--overwrite) to replace it"
            )
        if not (target / "model_index.json").is_file():
            raise InvalidArgumentError(
                f"refusing to replace {target}: it is not a diffusers checkpoint (no model_index.json); "
                "choose an empty or new directory"
            )


def write_random_checkpoint(
    path: str | os.PathLike,
    preset: str = "tiny",
    *,
    seed: int = 0,
    prediction_type: str = "epsilon",
    overwrite: bool = False,
    inpainting: bool = False,
    safety_checker: bool = False,
    guidance_embedding: int = 0,
) -> Path:
    """Write a randomly initialised SD 1.x checkpoint in diffusers format to ``path`` and return its path.

    The folder holds model_index.json, text_encoder/, tokenizer/, unet/, vae/ and scheduler/ (PNDM with
    SD 1.5's scheduler config), weights as safetensors, and (unless asked for) no safety checker. It is
    written next to ``path`` first and moved into place at the end, so an interrupted write never leaves a
    half-written checkpoint behind, and each model is written and freed before the next is built. A
    non-empty ``path`` is only replaced with ``overwrite=True``, and only if it is itself a diffusers
    checkpoint. ``inpainting``: the UNet takes 9 input channels (latents, mask, masked image latents), as
    SD's inpainting checkpoints do.
    ``safety_checker``: with a small random safety checker and its image processor (see
    :func:`_write_safety_checker`), as SD 1.x checkpoints ship one. ``guidance_embedding``: the UNet takes
    the guidance scale as an embedding this wide (``time_cond_proj_dim``), as latent consistency models'
    do (``sdengine.guidance_embedding``).
    """
    if preset not in PRESETS:
        raise InvalidArgumentError(
            f"unknown checkpoint preset {preset!r}; choose one of {', '.join(PRESETS)}"
        )
    if prediction_type not in PREDICTION_TYPES:
        raise InvalidArgumentError(
            f"unknown prediction_type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}"
        )
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise InvalidArgumentError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(guidance_embedding, int) or not (guidance_embedding == 0 or guidance_embedding >= 4):
        raise InvalidArgumentError(
            f"guidance_embedding must be 0 or a width >= 4, got {guidance_embedding!r}"
        )
    sizes = _PRESET_SIZES[preset]
    target = Path(path).absolute()
    _prepare_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)

    vocab_size = len(build_vocab()[0])
    if vocab_size > (sizes.text_vocab or vocab_size):  # pragma: no cover - guards future vocabulary growth
        raise InvalidArgumentError(
            f"tokenizer has {vocab_size} ids, more than the text encoder's {sizes.text_vocab}"
        )
    xl = sizes.xl
    steps: list[tuple[str, Callable[[Path], object]]] = [
        ("tokenizer", lambda out: write_tokenizer_files(out / "tokenizer")),
        ("scheduler", lambda out: _write_scheduler(out, prediction_type, xl is not None)),
        ("text_encoder", lambda out: _write_text_encoder(out, sizes, seed, vocab_size)),
        ("unet", lambda out: _write_unet(out, sizes, seed, inpainting, guidance_embedding)),
        ("vae", lambda out: _write_vae(out, sizes, seed)),
        ("model_index", lambda out: _write_model_index(out, inpainting, safety_checker)),
    ]
    if xl is not None:  # SDXL's second tokenizer pads with "!", as OpenCLIP's does
        steps[3:3] = [
            ("tokenizer_2", lambda out: write_tokenizer_files(out / "tokenizer_2", pad_token="!")),
            ("text_encoder_2", lambda out: _write_text_encoder(out, xl, seed, vocab_size, second=True)),
        ]
        if safety_checker:
            raise InvalidArgumentError("SDXL checkpoints ship no safety checker")
        if xl.refiner:  # the second text encoder alone
            steps = [step for step in steps if step[0] not in ("tokenizer", "text_encoder")]
    if safety_checker:
        steps.insert(-1, ("safety_checker", lambda out: _write_safety_checker(out, seed)))

    from tqdm.auto import tqdm

    # Not mkdtemp: its 0700 mode would end up on the checkpoint folder.
    staging = target.parent / f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        with tqdm(
            steps, desc=f"writing {preset} checkpoint", unit="part", disable=preset.startswith("tiny")
        ) as bar:
            for name, write in bar:
                bar.set_postfix_str(name)
                write(staging)
                if not preset.startswith("tiny"):
                    gc.collect()  # free each multi-GB model before building the next
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            target.rename(old)
        staging.rename(target)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _checkpoint_files(root: Path) -> list[tuple[str, Path]]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            file = Path(dirpath) / name
            files.append((file.relative_to(root).as_posix(), file))
    return sorted(files)


def checkpoint_hash(path: str | os.PathLike) -> str:
    """sha256 (hex) over every file of a checkpoint folder: relative paths, sizes and contents.

    Hidden files and folders (such as the ``.cache/`` that hub downloads leave behind, whose metadata holds
    timestamps) are skipped, so the hash only changes when the checkpoint does. Files are streamed, never read
    whole.
    """
    root = Path(path)
    if not root.is_dir():
        raise ModelDirectoryError(
            f"checkpoint directory {root} does not exist; pass a diffusers checkpoint folder"
        )
    digest = hashlib.sha256(b"sdengine-checkpoint-hash-v1\0")
    for rel, file in _checkpoint_files(root):
        size = file.stat().st_size
        digest.update(rel.encode("utf-8") + b"\0" + size.to_bytes(8, "little"))
        with open(file, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


__all__ = ["PRESETS", "PREDICTION_TYPES", "checkpoint_hash", "write_random_checkpoint"]
