"""export.checkpoint: random-weight SD 1.x checkpoints that diffusers loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from export.checkpoint import PRESETS, checkpoint_hash, write_random_checkpoint
from sdengine.errors import InvalidArgumentError, ModelDirectoryError, SDEngineError
from sdengine.tokenizer import ClipTokenizer

WEIGHT_FILES = (
    "text_encoder/model.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
)


def _config(checkpoint: Path, name: str) -> dict[str, Any]:
    return json.loads((checkpoint / name).read_text())


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint: Path) -> Any:
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_checkpoint, local_files_only=True)


def test_diffusers_runs_it(pipe: Any) -> None:
    import torch

    out = pipe(
        "a photo of an astronaut riding a horse",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    image = out.images
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all()
    assert image.std() > 0


def test_layout_and_architecture(tiny_checkpoint: Path, pipe: Any) -> None:
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    assert sorted(p.name for p in tiny_checkpoint.iterdir()) == [
        "model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae",
    ]  # fmt: skip
    index = _config(tiny_checkpoint, "model_index.json")
    assert index["requires_safety_checker"] is False
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert pipe.safety_checker is None
    for name in WEIGHT_FILES:
        assert (tiny_checkpoint / name).is_file()

    unet, vae, text = pipe.unet, pipe.vae, pipe.text_encoder
    assert isinstance(unet, UNet2DConditionModel) and isinstance(vae, AutoencoderKL)
    assert isinstance(text, CLIPTextModel) and isinstance(pipe.scheduler, PNDMScheduler)
    assert [type(b).__name__ for b in unet.down_blocks] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert type(unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn"
    assert [type(b).__name__ for b in unet.up_blocks] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert all(len(b.resnets) == 2 for b in unet.down_blocks)
    assert all(len(b.resnets) == 3 for b in unet.up_blocks)
    assert unet.config.in_channels == unet.config.out_channels == 4
    assert unet.config.cross_attention_dim == text.config.hidden_size
    assert unet.config.sample_size * pipe.vae_scale_factor == 64
    assert len(vae.config.block_out_channels) == 4 and pipe.vae_scale_factor == 8
    assert vae.config.latent_channels == 4 and vae.config.scaling_factor == 0.18215
    assert text.config.hidden_act == "quick_gelu" and text.config.max_position_embeddings == 77

    tokenizer = ClipTokenizer.from_dir(tiny_checkpoint / "tokenizer")
    assert text.config.vocab_size == tokenizer.vocab_size
    assert text.config.bos_token_id == tokenizer.bos_token_id
    assert text.config.eos_token_id == text.config.pad_token_id == tokenizer.eos_token_id
    # The pipeline's own tokenizer gives the runtime tokenizer's ids.
    prompts = ["a photo of a cat", "Zebra! 42 café"]
    expected = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    assert tokenizer(prompts).tolist() == expected

    sched = _config(tiny_checkpoint, "scheduler/scheduler_config.json")
    assert sched["_class_name"] == "PNDMScheduler"
    assert (sched["beta_start"], sched["beta_end"], sched["beta_schedule"]) == (
        0.00085,
        0.012,
        "scaled_linear",
    )
    assert sched["num_train_timesteps"] == 1000 and sched["trained_betas"] is None
    assert sched["skip_prk_steps"] is True and sched["set_alpha_to_one"] is False
    assert sched["steps_offset"] == 1 and sched["prediction_type"] == "epsilon"

    total = sum(f.stat().st_size for f in tiny_checkpoint.rglob("*") if f.is_file())
    assert total < 8 * 2**20


def test_same_seed_same_bytes_other_seed_other_weights(tiny_checkpoint: Path, tmp_path: Path) -> None:
    again = write_random_checkpoint(tmp_path / "again", "tiny", seed=0)
    for name in WEIGHT_FILES:
        assert (again / name).read_bytes() == (tiny_checkpoint / name).read_bytes(), name
    assert checkpoint_hash(again) == checkpoint_hash(tiny_checkpoint)

    other = write_random_checkpoint(tmp_path / "other", "tiny", seed=1, prediction_type="v_prediction")
    assert checkpoint_hash(other) != checkpoint_hash(tiny_checkpoint)
    for name in WEIGHT_FILES:
        assert (other / name).read_bytes() != (tiny_checkpoint / name).read_bytes(), name
    assert _config(other, "unet/config.json") == _config(tiny_checkpoint, "unet/config.json")
    assert _config(other, "scheduler/scheduler_config.json")["prediction_type"] == "v_prediction"


def test_overwrite_rules(tiny_checkpoint: Path, tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "model_index.json").write_text("{}")
    (target / "stale.bin").write_bytes(b"x")
    with pytest.raises(InvalidArgumentError, match="overwrite=True") as info:
        write_random_checkpoint(target)
    assert "\n" not in str(info.value)
    assert (target / "stale.bin").exists()

    assert write_random_checkpoint(target, overwrite=True) == target.absolute()
    assert not (target / "stale.bin").exists()
    assert checkpoint_hash(target) == checkpoint_hash(tiny_checkpoint)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging folder left behind

    # A folder that is not a checkpoint is never deleted, even with overwrite=True.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(SDEngineError, match="not a diffusers checkpoint"):
        write_random_checkpoint(other, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(InvalidArgumentError):
        write_random_checkpoint(file, overwrite=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"preset": "sd99"},
        {"prediction_type": "sample"},
        {"seed": -1},
        {"preset": "SD15"},
        {"preset": "tiny-xl", "safety_checker": True},  # SDXL ships none
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgumentError):
        write_random_checkpoint(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()
    assert PRESETS == ("tiny", "sd15", "tiny-xl", "sdxl", "tiny-xl-refiner", "sdxl-refiner")


def test_checkpoint_hash_covers_names_and_contents_but_not_hidden_files(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "w.bin").write_bytes(b"\x00" * 10)
    (tmp_path / "model_index.json").write_text("{}")
    base = checkpoint_hash(tmp_path)
    assert len(base) == 64 and base == checkpoint_hash(str(tmp_path))

    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "download.metadata").write_text("timestamp")
    (tmp_path / ".DS_Store").write_text("x")
    assert checkpoint_hash(tmp_path) == base

    (tmp_path / "unet" / "w.bin").write_bytes(b"\x00" * 9 + b"\x01")
    changed = checkpoint_hash(tmp_path)
    assert changed != base
    (tmp_path / "unet" / "w.bin").rename(tmp_path / "unet" / "v.bin")
    assert checkpoint_hash(tmp_path) not in (base, changed)

    with pytest.raises(ModelDirectoryError):
        checkpoint_hash(tmp_path / "missing")


def test_the_full_size_sdxl_presets_have_the_released_unet_settings() -> None:
    """The UNet settings the sdxl and sdxl-refiner presets derive, against SDXL 1.0 base's and refiner's
    released unet/config.json values (weights are not written: 2.6 B and 2.3 B parameters)."""
    from export.checkpoint import _PRESET_SIZES, _xl_unet_config

    released = {
        "sdxl": ((320, 640, 1280), (5, 10, 20), (1, 2, 10), 2048, 2816),
        "sdxl-refiner": ((384, 768, 1536, 1536), (6, 12, 24, 24), (4, 4, 4, 4), 1280, 2560),
    }
    for preset, (channels, heads, layers, cross, projection) in released.items():
        sizes = _PRESET_SIZES[preset]
        config = _xl_unet_config(sizes, sizes.xl)
        assert config["block_out_channels"] == channels and config["attention_head_dim"] == heads
        assert config["transformer_layers_per_block"] == layers
        assert config["cross_attention_dim"] == cross
        assert config["projection_class_embeddings_input_dim"] == projection
        assert config["addition_time_embed_dim"] == 256
