"""The command line: outputs, PNG metadata, and one-line errors with a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdengine.cli import main
from sdengine.images import read_png_parameters


def test_generate_writes_png_with_parameters(onnx_fp32, tmp_path, capsys):
    out = tmp_path / "cat.png"
    code = main(
        [
            "generate",
            str(onnx_fp32),
            "a cat",
            "--steps",
            "2",
            "--seed",
            "7",
            "--height",
            "64",
            "--width",
            "96",
            "--negative-prompt",
            "dog",
            "--scheduler",
            "euler",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    with Image.open(out) as img:
        assert img.size == (96, 64)
    params = read_png_parameters(out)
    assert params["prompt"] == ["a cat"] and params["negative_prompt"] == ["dog"]
    assert (params["seed"], params["steps"], params["scheduler"], params["backend"]) == (7, 2, "euler", "ort")
    assert "seed 7" in capsys.readouterr().out


def test_batch_writes_numbered_files_and_latents_file_is_used(onnx_fp32, tmp_path):
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8), dtype=np.float32)
    np.save(tmp_path / "lat.npy", latents)
    out = tmp_path / "img.png"
    assert (
        main(
            [
                "generate",
                str(onnx_fp32),
                "a cat",
                "--steps",
                "1",
                "--batch",
                "2",
                "--height",
                "64",
                "--width",
                "64",
                "--latents",
                str(tmp_path / "lat.npy"),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert sorted(p.name for p in tmp_path.glob("img*.png")) == ["img-0.png", "img-1.png"]
    first, second = (read_png_parameters(tmp_path / f"img-{i}.png") for i in (0, 1))
    assert second["latents"] == "supplied" and second["image_of_batch"] == "2 of 2"
    assert second["seed"] == first["seed"] + 1  # each image records the seed that makes it alone


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--height", "65"], "height must be a positive multiple of 8"),
        (["--steps", "0"], "steps must be at least 1"),
        (["--scheduler", "nope"], "nope"),
        (["--batch", "0"], "batch must be at least 1"),
        (["--latents", "missing.npy"], "cannot read latents"),
        (["--cuda-option", "prefer_nhwc"], "expected KEY=VALUE"),
        (["--cuda-option", "device_id=1"], "device_id is set by sdengine"),
        (["--cuda-option", "prefer_nhwc=1"], "need the ort backend on cuda, and this run is ort on cpu"),
    ],
)
def test_generate_errors_are_one_line(onnx_fp32, capsys, extra, message):
    assert main(["generate", str(onnx_fp32), "a cat", "--steps", "2", *extra]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdengine: error:") and message in err and "\n" not in err


def test_missing_model_dir_exits_non_zero_without_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "sdengine.cli", "generate", str(tmp_path / "none"), "a cat"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "does not exist" in done.stderr
    assert "Traceback" not in done.stderr


def test_corrupt_onnx_is_one_line(onnx_fp32, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(onnx_fp32, broken)
    (broken / "vae_decoder" / "model.onnx").write_bytes(b"not an onnx file")
    assert main(["generate", str(broken), "a cat"]) == 1
    err = capsys.readouterr().err.strip()
    assert "cannot load" in err and "vae_decoder" in err and "\n" not in err


def test_demo_writes_both_images_and_matches_diffusers(tmp_path, capsys):
    from sdengine.demo import run_demo

    output = tmp_path / "demo.png"
    scores = run_demo(tmp_path / "work", output=output, steps=4)
    suffixes = ("", "-img2img", "-inpaint", "-edit-hires", "-lora", "-controlnet", "-sdxl", "-sdxl-refined")
    suffixes += ("-ip-adapter", "-torch-noise", "-pag", "-lcm", "-taesd", "-deepcache", "-freeu")
    suffixes += ("-ays", "-apg")
    assert all((tmp_path / f"demo{suffix}.png").is_file() for suffix in suffixes)
    assert scores["psnr_db"] >= 40 and scores["img2img_psnr_db"] >= 40 and scores["inpaint_psnr_db"] >= 40
    assert scores["lora_psnr_db"] >= 40 and scores["controlnet_psnr_db"] >= 40
    assert scores["edit_hires_psnr_db"] >= 40 and scores["sdxl_psnr_db"] >= 40
    assert scores["sdxl_refined_psnr_db"] >= 40 and scores["ip_adapter_psnr_db"] >= 40
    assert scores["torch_noise_psnr_db"] >= 40 and scores["pag_psnr_db"] >= 40
    assert scores["lcm_psnr_db"] >= 40
    assert scores["taesd_psnr_db"] >= 40 and scores["deepcache_psnr_db"] >= 40
    assert scores["freeu_psnr_db"] >= 40 and scores["ays_psnr_db"] >= 40 and scores["apg_psnr_db"] >= 40
    assert "PSNR" in capsys.readouterr().out


def test_info_describes_each_kind_of_directory(tiny_checkpoint, onnx_fp32, tmp_path, capsys):
    from export.trt_build import build_engines
    from sdengine.engine_keys import BuildEnv

    assert main(["info", str(onnx_fp32), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "onnx" and info["manifest"]["precision"] == "fp32" and all(info["models"].values())
    assert info["clip_skip"] == "0 to 1" and info["inpainting"] == "blended, plain UNet"  # 2 text layers
    assert main(["info", str(tiny_checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "kind: checkpoint" in out and "clip_skip: 0 to 1" in out
    engines = tmp_path / "engines"
    env = BuildEnv(trt_version="10.9.0", compute_capability="8.9")
    build_engines(
        onnx_fp32, engines, height=64, width=64, env=env, builder=lambda o, p, *a, **k: p.write_bytes(b"x")
    )
    assert main(["info", str(engines), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "not checked here" in info["this_machine"]  # no TensorRT on this machine
    assert set(info["engines"]) == {"text_encoder", "unet", "vae_decoder"}
    assert main(["info", str(tmp_path / "missing")]) == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_export_prints_each_models_check(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import export.verify

    out = tmp_path / "onnx"
    assert main(["export", str(tiny_checkpoint), "--output", str(out), "--components", "vae_decoder"]) == 0
    printed = capsys.readouterr()
    assert "vs PyTorch" in printed.out and "replacing" not in printed.err
    args = ["export", str(tiny_checkpoint), "--output", str(out), "--components", "vae_decoder"]
    assert main([*args, "--no-verify"]) == 0
    printed = capsys.readouterr()
    assert "not checked" in printed.out and f"sdengine: {out} holds an export: replacing it" in printed.err
    monkeypatch.setitem(export.verify.TOLERANCE, "fp32", 0.0)
    assert main(args) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar: one line
    assert last.startswith("sdengine: error: vae_decoder: the ONNX model's output differs from PyTorch's")


def test_generate_reads_its_input_files_before_loading_any_model(tmp_path, capsys):
    """A bad image, mask or embedding costs no model load: it is refused first (here the model directory
    does not even exist)."""
    missing = str(tmp_path / "missing.png")
    for flag in ("--image", "--mask", "--embedding"):
        args = ["generate", str(tmp_path / "no-model"), "a cat", flag, missing]
        args += ["--image", str(tmp_path / "missing-too.png")] if flag == "--mask" else []
        assert main(args) == 1
        err = capsys.readouterr().err
        assert "missing" in err and "no-model" not in err, (flag, err)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["generate", "m", "p", "--steps", "abc"],
            "sdengine generate: error: argument --steps: invalid int value",
        ),
        (["generate", "m", "p", "--bogus"], "sdengine: error: unrecognized arguments: --bogus"),
        ([], "the following arguments are required: command"),
    ],
)
def test_a_command_line_that_cannot_be_read_is_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and message in err and len(err.splitlines()) == 1
    assert err.endswith("--help)")


def test_an_ip_adapter_directory_names_its_weights_file(tiny_checkpoint, tmp_path, capsys):
    folder = tmp_path / "ip"
    folder.mkdir()
    (folder / "ip-adapter.safetensors").write_bytes(b"")
    assert (
        main(["export", str(tiny_checkpoint), "--output", str(tmp_path / "o"), "--ip-adapter", str(folder)])
        == 1
    )
    err = capsys.readouterr().err.strip()
    assert (
        f"IP-Adapter {folder} is a directory: give its weights file ({folder / 'ip-adapter.safetensors'})"
        in err
    )
