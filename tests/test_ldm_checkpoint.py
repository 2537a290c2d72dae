"""export.ldm_checkpoint: random checkpoints written as original-layout single files, read back by diffusers'
own ``from_single_file`` into exactly the weights they were written from."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from export.checkpoint import write_random_checkpoint
from export.ldm_checkpoint import ldm_state_dict, write_single_file
from sdengine.errors import ModelDirectoryError

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
#: (preset, inpainting) -> the diffusers pipeline class that reads it
PIPELINES = {
    ("tiny", False): "StableDiffusionPipeline",
    ("tiny", True): "StableDiffusionInpaintPipeline",
    ("tiny-xl", False): "StableDiffusionXLPipeline",
    ("tiny-xl", True): "StableDiffusionXLInpaintPipeline",
    ("tiny-xl-refiner", False): "StableDiffusionXLImg2ImgPipeline",
}
CASES = [pytest.param(*case, id=f"{case[0]}{'-inpaint' if case[1] else ''}") for case in PIPELINES]


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection attempt fails the test: loading must be fully offline."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _checkpoint(preset: str, inpainting: bool, tmp_path: Path, tiny_checkpoint: Path) -> Path:
    if (preset, inpainting) == ("tiny", False):
        return tiny_checkpoint  # the shared one (read only)
    return write_random_checkpoint(tmp_path / "checkpoint", preset, seed=5, inpainting=inpainting)


def _deepen_second_text_encoder(checkpoint: Path) -> None:
    """Replace ``text_encoder_2`` with a random one of 10 layers, 48 wide. diffusers tells SDXL base and
    refiner files apart from SD 1.x by the OpenCLIP encoder's 10th layer, and picks the loader of SDXL base's
    second encoder by a width different from the first encoder's; tiny-xl's has 3 layers, 32 wide, as its
    first. The UNet is left as it is (its conditioning no longer fits, which loading does not check)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    folder = checkpoint / "text_encoder_2"
    config = CLIPTextConfig.from_pretrained(folder)
    config.num_hidden_layers, config.hidden_size, config.projection_dim = 10, 48, 48
    config.intermediate_size = 96
    torch.manual_seed(0)
    CLIPTextModelWithProjection(config).save_pretrained(folder, safe_serialization=True)


def _text_encoder_2_from_file(file: Path, checkpoint: Path) -> Any:
    """SDXL base's second text encoder, read from the file's OpenCLIP weights by diffusers' own reader.

    Needed for tiny-xl only: diffusers' ``from_single_file`` takes ``conditioner.embedders.0`` (the CLIP-L
    encoder) for ``text_encoder_2`` as well whenever its position embeddings are as wide as
    ``text_encoder_2``'s, as tiny-xl's two 32-wide encoders are (SDXL's are 768 and 1280 wide)."""
    from diffusers.loaders.single_file_utils import (
        create_diffusers_clip_model_from_ldm,
        load_single_file_checkpoint,
    )
    from transformers import CLIPTextModelWithProjection

    state = load_single_file_checkpoint(str(file), local_files_only=True)
    open_clip = {key: value for key, value in state.items() if not key.startswith("conditioner.embedders.0.")}
    return create_diffusers_clip_model_from_ldm(
        CLIPTextModelWithProjection,
        open_clip,
        subfolder="text_encoder_2",
        config=str(checkpoint),
        local_files_only=True,
    )


def _assert_round_trip(checkpoint: Path, file: Path, pipeline: str, **components: Any) -> None:
    """diffusers' ``from_single_file`` on ``file`` gives every weight of ``checkpoint``, name, dtype and
    value alike."""
    import diffusers
    import torch

    cls = getattr(diffusers, pipeline)
    # config: a str (a Path is refused by each model's from_single_file), a local folder: nothing fetched
    loaded = cls.from_single_file(file, config=str(checkpoint), local_files_only=True, **components)
    reference = cls.from_pretrained(checkpoint, local_files_only=True)
    compared = 0
    for name in COMPONENTS:
        model, expected = getattr(loaded, name, None), getattr(reference, name, None)
        assert (model is None) == (expected is None), name
        if expected is None:
            continue
        got, want = model.state_dict(), expected.state_dict()
        assert sorted(got) == sorted(want), name
        for key, tensor in want.items():
            assert got[key].dtype == tensor.dtype, f"{name}.{key}"
            assert torch.equal(got[key], tensor), f"{name}.{key}"
        compared += 1
    assert compared >= 3  # the UNet, the VAE and at least one text encoder


@pytest.mark.parametrize(("preset", "inpainting"), CASES)
def test_diffusers_reads_every_weight_back(
    preset: str, inpainting: bool, tmp_path: Path, tiny_checkpoint: Path, no_network: None
) -> None:
    checkpoint = _checkpoint(preset, inpainting, tmp_path, tiny_checkpoint)
    file = write_single_file(checkpoint, tmp_path / "model.safetensors")
    assert file == tmp_path / "model.safetensors"
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no partial file left
    extra = {}
    if preset == "tiny-xl":
        extra["text_encoder_2"] = _text_encoder_2_from_file(file, checkpoint)
    _assert_round_trip(checkpoint, file, PIPELINES[preset, inpainting], **extra)


FAMILIES = {
    ("tiny", False): "v1",
    ("tiny", True): "inpainting",
    ("tiny-xl", False): "xl_base",
    ("tiny-xl", True): "xl_inpaint",
    ("tiny-xl-refiner", False): "xl_refiner",
}


@pytest.mark.parametrize(("preset", "inpainting"), CASES)
def test_diffusers_tells_the_family(
    preset: str, inpainting: bool, tmp_path: Path, tiny_checkpoint: Path, no_network: None
) -> None:
    """diffusers' own family detection on the written keys, with SDXL's second text encoder deep enough
    for it (see :func:`_deepen_second_text_encoder`: tiny-xl's own files read as ``v1``, its inpainting
    one as ``inpainting``); that file then loads with no help at all."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    checkpoint = _checkpoint(preset, inpainting, tmp_path, tiny_checkpoint)
    if preset.startswith("tiny-xl"):
        _deepen_second_text_encoder(checkpoint)
    assert infer_diffusers_model_type(ldm_state_dict(checkpoint)) == FAMILIES[preset, inpainting]
    if preset.startswith("tiny-xl"):
        file = write_single_file(checkpoint, tmp_path / "model.safetensors")
        _assert_round_trip(checkpoint, file, PIPELINES[preset, inpainting])


def test_original_layout(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The original names and shapes (VAE attention as 1x1 convolutions, OpenCLIP's fused projections), a
    plain file: contiguous tensors, no metadata, no safety checker, tokenizer or scheduler."""
    from safetensors import safe_open

    file = write_single_file(tiny_checkpoint, tmp_path / "sd.safetensors")
    with safe_open(file, "pt") as f:
        assert f.metadata() is None
        keys = set(f.keys())
        for name in ("decoder.mid.attn_1.q.weight", "encoder.mid.attn_1.proj_out.weight"):
            assert tuple(f.get_tensor(f"first_stage_model.{name}").shape) == (32, 32, 1, 1)
    assert {key.split(".")[0] for key in keys} == {"model", "first_stage_model", "cond_stage_model"}
    unet, vae = "model.diffusion_model.", "first_stage_model."
    for key in (
        f"{unet}input_blocks.3.0.op.weight",  # down block 0's downsampler
        f"{unet}input_blocks.1.1.proj_in.weight",  # its first transformer
        f"{unet}output_blocks.2.1.conv.weight",  # up block 0 (no attention): its upsampler
        f"{unet}output_blocks.5.2.conv.weight",  # up block 1 (attention): its upsampler
        f"{unet}middle_block.2.out_layers.3.weight",
        f"{unet}output_blocks.11.0.skip_connection.weight",
        f"{vae}decoder.up.3.upsample.conv.weight",  # diffusers' first (lowest-resolution) up block
        f"{vae}decoder.up.1.block.0.nin_shortcut.weight",  # diffusers' third: 32 -> 16 channels
        f"{vae}encoder.down.2.downsample.conv.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ):
        assert key in keys, key
    for key in (f"{unet}input_blocks.12.0.op.weight", f"{vae}decoder.up.0.upsample.conv.weight"):
        assert key not in keys, key  # the last down block and the last up block change no resolution

    xl = write_random_checkpoint(tmp_path / "xl", "tiny-xl", seed=0)
    state = ldm_state_dict(xl)
    assert all(tensor.is_contiguous() for tensor in state.values())
    fused = state["conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight"]
    assert tuple(fused.shape) == (96, 32)
    assert tuple(state["conditioner.embedders.1.model.text_projection"].shape) == (32, 32)
    assert "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight" in state
    clip_l = [key for key in state if key.startswith("conditioner.embedders.0.transformer.text_model.")]
    open_clip = [key for key in state if key.startswith("conditioner.embedders.1.model.")]
    # CLIP-L keeps transformers' names and separate projections; OpenCLIP's are renamed and fused
    assert len(clip_l) == 36 and any(".self_attn.q_proj." in key for key in clip_l)
    assert not any("in_proj" in key for key in clip_l)
    assert not any("self_attn" in key or "layer_norm" in key or ".fc1." in key for key in open_clip)


def test_dtype_is_kept(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """float16 weights stay float16, and equal the float32 ones rounded."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    half = shutil.copytree(tiny_checkpoint, tmp_path / "half")
    for weights in half.glob("*/*.safetensors"):
        save_file({key: value.half() for key, value in load_file(weights).items()}, weights)
    full, halved = ldm_state_dict(tiny_checkpoint), ldm_state_dict(half)
    assert sorted(full) == sorted(halved)
    for key, tensor in full.items():
        assert halved[key].dtype == torch.float16, key
        assert torch.equal(halved[key], tensor.half()), key


def test_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelDirectoryError, match="model_index.json"):
        write_single_file(tmp_path, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
