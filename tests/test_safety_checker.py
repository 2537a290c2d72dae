"""The safety checker: exported with the checkpoints that have one, run on every image as diffusers runs it
(its CLIP preprocessing, its flags, flagged images black), and switched off on request."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fake_tensorrt import ENV, write_plan

from sdengine.backends.ort import OrtBackend
from sdengine.cli import main
from sdengine.errors import ModelDirectoryError
from sdengine.images import psnr, read_png_parameters, to_pil
from sdengine.pipeline import Pipeline
from sdengine.safety import clip_pixels
from sdengine.tokenizer import ClipTokenizer

PROMPTS = ["a lighthouse at dusk", "a bowl of fruit"]
SETTINGS = dict(steps=3, seed=4, height=64, width=96)


@pytest.mark.parametrize(("height", "width"), [(64, 96), (96, 64), (512, 512), (100, 333), (224, 224)])
def test_clip_pixels_are_clip_image_processors(height, width):
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor()
    images = np.random.default_rng(height).random((2, height, width, 3), dtype=np.float32)
    expected = processor(to_pil(images), return_tensors="np").pixel_values
    np.testing.assert_allclose(clip_pixels(images, processor.to_dict()), expected, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """A checkpoint whose safety checker flags exactly the first of the two PROMPTS' images: its thresholds
    are set between the two images' highest concept similarity, found with transformers' own image
    processor and the PyTorch checker. Returns (checkpoint, export)."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
        cosine_distance,
    )
    from transformers import CLIPImageProcessor

    from export.checkpoint import write_random_checkpoint
    from export.onnx_export import export_checkpoint

    root = tmp_path_factory.mktemp("safety")
    checkpoint = write_random_checkpoint(root / "checkpoint", "tiny", seed=3, safety_checker=True)
    export_checkpoint(checkpoint, root / "onnx")
    images = Pipeline.load(root / "onnx", backend="ort", device="cpu", safety_checker=False)(
        PROMPTS, **SETTINGS
    )
    checker = StableDiffusionSafetyChecker.from_pretrained(checkpoint / "safety_checker")
    pixels = CLIPImageProcessor()(to_pil(images.array), return_tensors="pt").pixel_values
    with torch.no_grad():
        embeds = checker.visual_projection(checker.vision_model(pixels)[1])
        highest = cosine_distance(embeds, checker.concept_embeds).max(dim=1).values
        assert abs(float(highest[0] - highest[1])) > 0.01, "the two images must be told apart"
        checker.concept_embeds_weights.fill_(float(highest.mean()))
        checker.special_care_embeds_weights.fill_(2.0)  # never special
        flag_first = highest[0] > highest[1]
    checker.save_pretrained(checkpoint / "safety_checker")
    export_checkpoint(checkpoint, root / "onnx", components=["safety_checker"])
    return checkpoint, root / "onnx", bool(flag_first), (highest - highest.mean()).numpy(), images.array


def test_the_exported_scores_are_diffusers_similarities_less_the_thresholds(checked):
    import onnxruntime as ort

    _, onnx_dir, _, expected, images = checked
    session = ort.InferenceSession(str(onnx_dir / "safety_checker" / "model.onnx"))
    feed = {"clip_input": clip_pixels(images, {}), "images": images}
    flags, scores = session.run(["has_nsfw_concepts", "concept_scores"], feed)
    np.testing.assert_allclose(scores.max(axis=1), expected, rtol=0, atol=1e-5)
    assert list(flags) == list(expected > 0)


def test_flags_match_diffusers_and_flagged_images_are_black(checked):
    checkpoint, onnx_dir, flag_first, _, _ = checked
    ours = Pipeline.load(onnx_dir, backend="ort", device="cpu")(PROMPTS, **SETTINGS)
    ref = Pipeline.load(checkpoint, backend="torch")(PROMPTS, **SETTINGS)
    expected = [flag_first, not flag_first]
    assert ours.nsfw == ref.nsfw == expected
    flagged, kept = (0, 1) if flag_first else (1, 0)
    assert not ours.array[flagged].any() and not ref.array[flagged].any()
    assert psnr(ours.array[kept], ref.array[kept]) >= 100 and ours.array[kept].std() > 0.01
    assert "safety_checker" in ours.times.summary()


def test_the_checker_can_be_switched_off(checked):
    checkpoint, onnx_dir, *_ = checked
    for pipe in (
        Pipeline.load(onnx_dir, backend="ort", device="cpu", safety_checker=False),
        Pipeline.load(checkpoint, backend="torch", safety_checker=False),
    ):
        result = pipe(PROMPTS, **SETTINGS)
        assert result.nsfw is None and all(image.std() > 0.01 for image in result.array)


def test_cli_warns_of_a_flagged_image(checked, tmp_path, capsys):
    _, onnx_dir, flag_first, *_ = checked
    out = tmp_path / "out.png"
    args = ["generate", str(onnx_dir), PROMPTS[0 if flag_first else 1], "--steps", "3", "--seed", "4"]
    args += ["--height", "64", "--width", "96", "--device", "cpu", "--output", str(out)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"the safety checker flagged {out}; it was written black" in err
    assert read_png_parameters(out)["safety_checker"] == "flagged"
    assert main([*args, "--no-safety-checker"]) == 0
    assert "safety_checker" not in read_png_parameters(out)
    capsys.readouterr()
    assert main(["info", str(onnx_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["safety_checker"].startswith("yes")


def test_exports_hold_a_checker_only_where_the_checkpoint_has_one(tiny_checkpoint, onnx_fp32, tmp_path):
    from export.onnx_export import export_checkpoint

    assert not (onnx_fp32 / "safety_checker").exists()
    with pytest.raises(ModelDirectoryError, match="has no safety checker"):
        export_checkpoint(tiny_checkpoint, tmp_path / "x", components=["safety_checker"])


def test_simulated_tensorrt_runs_the_checker_with_onnx_runtime(simulated, checked, tmp_path):
    from export.trt_build import build_engines
    from sdengine.backends.trt import TrtBackend

    _, onnx_dir, flag_first, *_ = checked
    build_engines(onnx_dir, tmp_path / "engines", batch=2, env=ENV, builder=write_plan, height=64, width=96)
    backend = TrtBackend.load(tmp_path / "engines")
    tokenizer = ClipTokenizer.from_dir(backend.model_dir.tokenizer_dir)
    host = Pipeline(backend.model_dir, OrtBackend(backend.model_dir), tokenizer)  # (no detection: simulated)
    result = Pipeline(backend.model_dir, backend, tokenizer)(PROMPTS, **SETTINGS)
    assert result.nsfw == [flag_first, not flag_first]
    np.testing.assert_allclose(result.array, host(PROMPTS, **SETTINGS).array, atol=1e-4)
