"""Single-file checkpoints (export.single_file): converted by diffusers' own reader into a directory that
exports and runs as the directory the file was written from does."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_ldm_checkpoint import _deepen_second_text_encoder

from export.checkpoint import write_random_checkpoint
from export.ldm_checkpoint import write_single_file
from export.single_file import convert_single_file, converted_checkpoint
from sdengine.cli import main
from sdengine.errors import InvalidArgumentError, ModelDirectoryError, UnsupportedConfigError
from sdengine.images import psnr
from sdengine.pipeline import Pipeline
from sdengine.tokenizer import ClipTokenizer

SETTINGS = dict(steps=4, seed=3, height=64, width=64)
PROMPTS = ("a photo of a cat", "Ünïcode, punctuation!! and <|endoftext|> 123", "")


@pytest.fixture(scope="module")
def tiny_file(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_single_file(tiny_checkpoint, tmp_path_factory.mktemp("single") / "tiny.safetensors")


def _weights(root: Path) -> dict[str, np.ndarray]:
    """Every weight of a checkpoint directory, by folder and name."""
    from safetensors.numpy import load_file

    return {
        f"{path.parent.name}/{key}": value
        for path in sorted(root.glob("*/*.safetensors"))
        for key, value in load_file(path).items()
    }


def _assert_same_weights(converted: Path, original: Path) -> None:
    got, want = _weights(converted), _weights(original)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and np.array_equal(got[key], value), key


def test_export_from_a_single_file_draws_the_directory_s_image(
    tiny_checkpoint: Path, tiny_file: Path, ort_pipe_fp32, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file exports straight away (converted into the cache) and its export draws the image the
    directory's export draws: every weight and every token id came through."""
    from export.onnx_export import export_checkpoint

    monkeypatch.setenv("SDENGINE_CACHE", str(tmp_path / "cache"))
    manifest = export_checkpoint(tiny_file, tmp_path / "onnx", config=tiny_checkpoint, verify=False)
    converted = Path(manifest.source_checkpoint)
    assert converted.parent == (tmp_path / "cache" / "checkpoints").resolve()
    _assert_same_weights(converted, tiny_checkpoint)
    ours, theirs = ClipTokenizer.from_dir(converted / "tokenizer"), ort_pipe_fp32.tokenizer
    assert np.array_equal(ours(list(PROMPTS)), theirs(list(PROMPTS)))

    pipe = Pipeline.load(tmp_path / "onnx", backend="ort", device="cpu")
    got, want = (
        pipe("a photo of a cat", "blurry", **SETTINGS),
        ort_pipe_fp32("a photo of a cat", "blurry", **SETTINGS),
    )
    assert psnr(got.array, want.array) >= 120


def test_conversions_are_kept_until_the_file_changes(
    tiny_checkpoint: Path, tiny_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("SDENGINE_CACHE", str(tmp_path / "cache"))
    file = Path(shutil.copy2(tiny_file, tmp_path / "model.safetensors"))
    first = converted_checkpoint(file, tiny_checkpoint)
    assert "converting" in capsys.readouterr().err
    assert converted_checkpoint(file, tiny_checkpoint) == first
    assert "converting" not in capsys.readouterr().err  # kept
    stat = file.stat()
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed
    second = converted_checkpoint(file, tiny_checkpoint)
    assert second != first and "converting" in capsys.readouterr().err
    _assert_same_weights(second, tiny_checkpoint)


def test_a_ckpt_file_converts_too(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The original training code's ``.ckpt``: a pickled dict whose ``state_dict`` holds the weights."""
    import torch

    from export.ldm_checkpoint import ldm_state_dict

    torch.save({"state_dict": ldm_state_dict(tiny_checkpoint), "global_step": 840000}, tmp_path / "m.ckpt")
    converted = convert_single_file(tmp_path / "m.ckpt", tmp_path / "converted", config=tiny_checkpoint)
    _assert_same_weights(converted, tiny_checkpoint)


def test_float16_files_stay_float16(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A float16 file converts into the ``fp16`` variant's files, as a ``variant="fp16"`` download has them,
    and exports."""
    from safetensors.torch import load_file, save_file

    half = shutil.copytree(tiny_checkpoint, tmp_path / "half")
    for weights in half.glob("*/*.safetensors"):
        save_file({key: value.half() for key, value in load_file(weights).items()}, weights)
    file = write_single_file(half, tmp_path / "half.safetensors")
    converted = convert_single_file(file, tmp_path / "converted", config=tiny_checkpoint)
    assert (converted / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (converted / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert main(["export", str(converted), "--output", str(tmp_path / "onnx"), "--no-verify"]) == 0


def test_sdxl_base_and_refiner(tmp_path: Path) -> None:
    """SDXL files convert with their pipeline's class and both text encoders. (tiny-xl's second text
    encoder is made deeper and wider first: diffusers tells SDXL files by that encoder's tenth layer.)"""
    for preset, cls in (
        ("tiny-xl", "StableDiffusionXLPipeline"),
        ("tiny-xl-refiner", "StableDiffusionXLImg2ImgPipeline"),
    ):
        checkpoint = write_random_checkpoint(tmp_path / preset, preset, seed=2)
        _deepen_second_text_encoder(checkpoint)
        file = write_single_file(checkpoint, tmp_path / f"{preset}.safetensors")
        converted = convert_single_file(file, tmp_path / f"{preset}-converted", config=checkpoint)
        assert f'"_class_name": "{cls}"' in (converted / "model_index.json").read_text()
        _assert_same_weights(converted, checkpoint)
        assert ClipTokenizer.from_dir(converted / "tokenizer_2")(["a cat!"]).tolist() == (
            ClipTokenizer.from_dir(checkpoint / "tokenizer_2")(["a cat!"]).tolist()
        )


def test_refusals(tiny_checkpoint: Path, tiny_file: Path, tmp_path: Path) -> None:
    xl = write_random_checkpoint(tmp_path / "xl", "tiny-xl", seed=2)
    _deepen_second_text_encoder(xl)
    xl_file = write_single_file(xl, tmp_path / "xl.safetensors")
    with pytest.raises(UnsupportedConfigError, match=r"SDXL base checkpoint, but .* StableDiffusionPipeline"):
        convert_single_file(xl_file, tmp_path / "a", config=tiny_checkpoint)
    with pytest.raises(UnsupportedConfigError, match=r"SD 1.x checkpoint, but .* StableDiffusionXLPipeline"):
        convert_single_file(tiny_file, tmp_path / "b", config=xl)
    inpainting = write_random_checkpoint(tmp_path / "inpainting", "tiny", seed=2, inpainting=True)
    inpainting_file = write_single_file(inpainting, tmp_path / "inpainting.safetensors")
    with pytest.raises(
        UnsupportedConfigError, match="takes 9 input channels, .* 4: give the configs of an inp"
    ):
        convert_single_file(inpainting_file, tmp_path / "b", config=tiny_checkpoint)
    with pytest.raises(
        UnsupportedConfigError, match="takes 4 input channels, .* 9: give the configs of a plain"
    ):
        convert_single_file(tiny_file, tmp_path / "b", config=inpainting)

    from safetensors.numpy import save_file

    save_file(
        {"lora_unet_down_blocks_0.lora_down.weight": np.zeros((4, 8), np.float32)}, tmp_path / "l.safetensors"
    )
    with pytest.raises(UnsupportedConfigError, match="holds no Stable Diffusion UNet"):
        convert_single_file(tmp_path / "l.safetensors", tmp_path / "c", config=tiny_checkpoint)
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelDirectoryError, match="cannot read .* as a checkpoint"):
        convert_single_file(tmp_path / "junk.safetensors", tmp_path / "d", config=tiny_checkpoint)
    with pytest.raises(ModelDirectoryError, match="exists"):
        convert_single_file(tiny_file, tmp_path, config=tiny_checkpoint)
    with pytest.raises(ModelDirectoryError, match="no model_index.json"):
        convert_single_file(tiny_file, tmp_path / "e", config=tmp_path)

    from export.onnx_export import export_checkpoint

    with pytest.raises(InvalidArgumentError, match="for single-file checkpoints"):
        export_checkpoint(tiny_checkpoint, tmp_path / "f", config=tiny_checkpoint)
    assert not [p for p in tmp_path.iterdir() if p.name[0] in "abcdef" and p.is_dir()]  # nothing half-written


def test_command_line(tiny_checkpoint: Path, tiny_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "converted"
    assert main(["convert", str(tiny_file), "--output", str(out), "--config", str(tiny_checkpoint)]) == 0
    _assert_same_weights(out, tiny_checkpoint)
    assert main(["info", str(tiny_file)]) == 0
    assert "family: SD 1.x" in capsys.readouterr().out
    assert main(["generate", str(tiny_file), "a cat", "--output", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert "is a single file" in err and "sdengine export" in err and len(err.splitlines()) == 1


def test_offline_without_a_config_says_what_to_pass(tiny_file: Path, tmp_path: Path) -> None:
    """Without ``--config`` the configs come from the Hub; offline that fails in one line naming the fix."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SDENGINE_CACHE": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-m", "sdengine.cli", "convert", str(tiny_file), "--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("sdengine: error: cannot convert") and "--config DIR" in last
    assert not (tmp_path / "out").exists()
