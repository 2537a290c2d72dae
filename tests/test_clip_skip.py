"""clip_skip: text embeddings from an earlier layer of the text encoder, through its final layer norm, for
positive and negative prompts alike; against the same embeddings made with transformers' own model."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch
from fake_tensorrt import engine_pipeline

from sdengine.cli import main
from sdengine.errors import InvalidArgumentError, ModelDirectoryError
from sdengine.images import psnr, read_png_parameters
from sdengine.pipeline import Pipeline

PROMPT, NEGATIVE = "a red fox in the snow", "blurry"


@pytest.fixture(scope="module")
def torch_pipe(tiny_checkpoint):
    return Pipeline.load(tiny_checkpoint, backend="torch")


def test_embeddings_are_the_earlier_layer_through_the_final_norm(ort_pipe_fp32, tiny_checkpoint):
    from transformers import CLIPTextModel

    ids = ort_pipe_fp32.tokenizer([PROMPT, NEGATIVE])
    model = CLIPTextModel.from_pretrained(tiny_checkpoint / "text_encoder").eval()
    with torch.no_grad():
        out = model(torch.from_numpy(ids).long(), output_hidden_states=True)
        norm = getattr(model, "text_model", model).final_layer_norm
        expected = norm(out.hidden_states[-2]).numpy()
    ours = ort_pipe_fp32.backend.encode_text(ids, clip_skip=1)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    last = ort_pipe_fp32.backend.encode_text(ids)
    np.testing.assert_allclose(last, out.last_hidden_state.numpy(), rtol=0, atol=1e-4 * np.abs(last).max())
    assert np.abs(ours - last).max() > 0.1  # a different layer indeed


@pytest.mark.parametrize("settings", [dict(), dict(guidance=1.0), dict(batch=2, scheduler="euler")])
def test_clip_skip_matches_the_pytorch_baseline(ort_pipe_fp32, torch_pipe, settings):
    settings = dict(steps=4, seed=5, height=64, width=64, clip_skip=1, **settings)
    ours, ref = ort_pipe_fp32(PROMPT, NEGATIVE, **settings), torch_pipe(PROMPT, NEGATIVE, **settings)
    assert psnr(ours.array, ref.array) >= 40
    without = ort_pipe_fp32(PROMPT, NEGATIVE, **{**settings, "clip_skip": 0})
    assert psnr(ours.array, without.array) < 60


def test_bad_clip_skips_are_refused(ort_pipe_fp32):
    for value, message in ((-1, ">= 0"), (True, ">= 0"), (1.5, ">= 0"), (2, r"\[0, 1\] for this 2-layer")):
        with pytest.raises(InvalidArgumentError, match=message):
            ort_pipe_fp32(PROMPT, steps=1, height=64, width=64, clip_skip=value)


def test_exports_without_layer_states_say_how_to_get_them(onnx_fp32, tmp_path):
    """Optimum's exports (and sdengine's older ones) give only the last layer: clip_skip says what to do,
    and everything else still runs."""
    other = tmp_path / "other"
    shutil.copytree(onnx_fp32, other)
    path = other / "text_encoder" / "model.onnx"
    model = onnx.load(str(path))
    keep = [o for o in model.graph.output if o.name != "normed_hidden_states"]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    onnx.save(model, str(path))
    pipe = Pipeline.load(other, backend="ort", device="cpu")
    assert pipe(PROMPT, steps=1, height=64, width=64).array.shape == (1, 64, 64, 3)
    with pytest.raises(ModelDirectoryError, match="export the checkpoint again"):
        pipe(PROMPT, steps=1, height=64, width=64, clip_skip=1)


def test_simulated_tensorrt_reads_the_layer_states(simulated, onnx_fp32, ort_pipe_fp32, tmp_path):
    engines = tmp_path / "engines"
    pipe = engine_pipeline(onnx_fp32, engines, ort_pipe_fp32.tokenizer, batch=1, height=64, width=64)
    settings = dict(steps=3, seed=2, height=64, width=64, clip_skip=1)
    np.testing.assert_allclose(
        pipe(PROMPT, **settings).array, ort_pipe_fp32(PROMPT, **settings).array, atol=1e-4
    )


def test_cli_clip_skip(onnx_fp32, tmp_path):
    out = tmp_path / "fox.png"
    args = ["generate", str(onnx_fp32), PROMPT, "--steps", "2", "--height", "64", "--width", "64"]
    assert main([*args, "--clip-skip", "1", "--device", "cpu", "--output", str(out)]) == 0
    assert read_png_parameters(out)["clip_skip"] == 1
    assert main([*args, "--clip-skip", "-2", "--device", "cpu", "--output", str(out)]) == 1
