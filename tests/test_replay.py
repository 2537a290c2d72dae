"""``generate --from IMAGE``: a PNG's record made again (sdengine/replay.py), each image of a batch alone, any
option given changing that setting alone; inputs the record only names asked for in one line; the PNG never
written over."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from export.random_lora import write_random_lora
from sdengine.cli import main
from sdengine.images import PARAMETERS_CHUNK, read_png_parameters
from sdengine.replay import Replay, changed_settings, replay
from sdengine.request import make_request

TINY = ["--height", "64", "--width", "64", "--steps", "3"]


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def generate(*args: str) -> int:
    return main(["generate", *args])


def comparison_line(capsys) -> str:
    """What generate printed of the new image against the PNG it made again."""
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("against ")]
    assert len(lines) == 1, lines
    return lines[0]


def test_each_image_of_a_batch_is_made_again_alone(onnx_fp32, tmp_path, capsys):
    """Seeds and variation seeds per image, a custom schedule (whose count sets the steps) and the hires
    fix's own: the record of image 2 of 2 makes it again, to the bit."""
    first = tmp_path / "batch.png"
    settings = ["--seed", "5", "--variation-seed", "40", "--variation-strength", "0.4", "--batch", "2"]
    custom = ["--scheduler", "dpmpp_2m", "--sigmas", "ays", "--hires-scale", "1.5", "--hires-sigmas", "ays"]
    assert (
        generate(
            str(onnx_fp32),
            "a cat",
            "--height",
            "64",
            "--width",
            "64",
            *settings,
            *custom,
            "--guidance",
            "5",
            "--output",
            str(first),
        )
        == 0
    )
    second = tmp_path / "batch-1.png"
    record = read_png_parameters(second)
    assert (record["seed"], record["variation_seed"], len(record["sigmas"])) == (6, 41, 11)
    again = tmp_path / "again.png"
    capsys.readouterr()
    assert generate("--from", str(second), "--output", str(again)) == 0
    assert comparison_line(capsys) == f"against {second} (the same settings): identical"
    np.testing.assert_array_equal(pixels(again), pixels(second))
    assert read_png_parameters(again) == {**record, "image_of_batch": "1 of 1"}
    assert pixels(again).shape == (96, 96, 3)  # the hires fix ran again


def test_an_option_given_changes_that_setting_alone(onnx_fp32, tmp_path, capsys):
    source, changed = tmp_path / "a.png", tmp_path / "b.png"
    assert generate(str(onnx_fp32), "a cat", *TINY, "--seed", "3", "--output", str(source)) == 0
    capsys.readouterr()
    assert generate("--from", str(source), "--steps", "4", "--output", str(changed)) == 0
    line = comparison_line(capsys)
    assert line.startswith(f"against {source} (settings changed: steps: 3 -> 4): PSNR ")
    old, new = read_png_parameters(source), read_png_parameters(changed)
    assert changed_settings(old, new) == ["steps: 3 -> 4"] and {**new, "steps": 3} == old
    assert generate(str(onnx_fp32), "a dog", "--from", str(source), "--output", str(changed)) == 0
    assert "settings changed: prompt: ['a cat'] -> ['a dog']" in comparison_line(capsys)


def test_inputs_the_record_names_are_asked_for_in_one_line(onnx_fp32, tmp_path, capsys):
    picture, mask = tmp_path / "picture.png", tmp_path / "mask.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(picture)
    Image.fromarray(np.where(np.arange(64)[:, None] < 32, 255, 0).repeat(64, 1).astype(np.uint8)).save(mask)
    lora = write_random_lora(onnx_fp32, tmp_path / "style.safetensors")
    source = tmp_path / "inpainted.png"
    inputs = ["--image", str(picture), "--mask", str(mask), "--lora", f"{lora}:0.5"]
    assert generate(str(onnx_fp32), "a cat", *TINY, *inputs, "--output", str(source)) == 0
    capsys.readouterr()
    again = tmp_path / "again.png"
    assert generate("--from", str(source), "--image", str(picture), "--output", str(again)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not again.exists()
    assert "give them again: --mask (supplied), --lora (style.safetensors:0.5)" in err
    assert generate("--from", str(source), *inputs, "--output", str(again)) == 0
    assert comparison_line(capsys) == f"against {source} (the same settings): identical"


def test_the_png_is_never_written_over_and_bad_files_are_one_line(onnx_fp32, tmp_path, capsys):
    source = tmp_path / "a.png"
    assert generate(str(onnx_fp32), "a cat", *TINY, "--output", str(source)) == 0
    before = source.read_bytes()
    capsys.readouterr()
    assert generate("--from", str(source), "--output", str(source)) == 1
    assert "would write over" in capsys.readouterr().err and source.read_bytes() == before
    numbered = tmp_path / "b-1.png"  # what a batch of two written to b.png names its second image
    numbered.write_bytes(before)
    assert generate("--from", str(numbered), "--batch", "2", "--output", str(tmp_path / "b.png")) == 1
    assert "would write over" in capsys.readouterr().err and numbered.read_bytes() == before
    plain, photo, foreign = tmp_path / "plain.png", tmp_path / "photo.jpg", tmp_path / "foreign.png"
    Image.new("RGB", (8, 8)).save(plain)
    Image.new("RGB", (8, 8)).save(photo)
    info = PngInfo()
    info.add_text(PARAMETERS_CHUNK, '{"prompt": ["x"], "steps": 2, "karras_rho": 7}')
    Image.new("RGB", (8, 8)).save(foreign, pnginfo=info)
    for path, message in [
        (plain, "holds no record of sdengine's settings"),
        (photo, "cannot read a record from"),
        (foreign, "records settings generate does not take: karras_rho"),
        (tmp_path / "missing.png", "cannot read a record from"),
    ]:
        capsys.readouterr()
        assert generate("--from", str(path), "--output", str(tmp_path / "out.png")) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    with pytest.raises(SystemExit):  # without --from, argparse asks for the prompt
        generate(str(onnx_fp32))
    assert "the following arguments are required: prompt" in capsys.readouterr().err
    info = PngInfo()  # a record without a model: the model directory is asked for
    info.add_text(PARAMETERS_CHUNK, '{"prompt": ["x"], "steps": 2}')
    Image.new("RGB", (8, 8)).save(tmp_path / "nomodel.png", pnginfo=info)
    assert generate("--from", str(tmp_path / "nomodel.png"), "--output", str(tmp_path / "out.png")) == 1
    assert "generate needs MODEL_DIR and PROMPT" in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()


def test_appended_options_come_from_the_record_only_where_none_is_given(tmp_path):
    replayed = Replay(
        tmp_path / "x.png", {}, appended={"control_scale": [0.5, 0.7], "control_mode": ["guess"]}
    )
    args = argparse.Namespace(control_scale=[], control_mode=["prompt"])
    replayed.fill(args)
    assert args.control_scale == [0.5, 0.7] and args.control_mode == ["prompt"]


def test_the_record_of_one_image_names_its_own_variation_seed():
    request = make_request(
        "a cat", height=64, width=64, seed=10, batch=3, variation_seed=20, variation_strength=0.5
    )
    assert [request.parameters(i)["variation_seed"] for i in range(3)] == [20, 21, 22]
    assert [request.parameters(i)["seed"] for i in range(3)] == [10, 11, 12]


def test_records_read_into_generates_options(tmp_path):
    info = PngInfo()
    record = {
        "prompt": ["a cat <lora:ink:0.7>"],
        "negative_prompt": ["dog"],
        "steps": 10,
        "timesteps": [999, 500],
        "freeu": [0.9, 0.2, 1.5, 1.6],
        "size_conditioning": {"original_size": [1024, 1024]},
        "loras": [{"file": "ink.safetensors", "scale": 0.7}],
        "lora_hashes": "ink: 0123456789ab",
        "model": "onnx",
        "backend": "ort",
    }
    info.add_text(PARAMETERS_CHUNK, __import__("json").dumps(record))
    Image.new("RGB", (8, 8)).save(tmp_path / "r.png", pnginfo=info)
    replayed = replay(tmp_path / "r.png")
    assert replayed.defaults == {
        "prompt": "a cat <lora:ink:0.7>",
        "negative_prompt": "dog",
        "model_dir": "onnx",
        "timesteps": "999.0,500.0",  # steps left to the custom schedule's count
        "freeu": "0.9,0.2,1.5,1.6",
        "original_size": (1024, 1024),
    }
    assert replayed.needs == {"--lora-dir": "ink: 0123456789ab"}  # the tag's LoRA comes from --lora-dir
    with pytest.raises(Exception, match="give them again: --lora-dir"):
        replayed.fill(argparse.Namespace(lora_dir=None))
