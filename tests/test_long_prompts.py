"""Long prompts: windows of 75 tokens encoded one by one and concatenated, against compel (the library
diffusers users read long prompts with) and, end to end, against diffusers fed those embeddings."""

from __future__ import annotations

import numpy as np
import pytest
from fake_tensorrt import engine_pipeline

from sdengine.cli import main
from sdengine.errors import UnsupportedConfigError
from sdengine.images import psnr, read_png_parameters
from sdengine.pipeline import Pipeline

SETTINGS = dict(steps=4, seed=1, height=64, width=64)
#: 12 times 13 words and a comma: 168 tokens, three windows
LONG = ", ".join(["a highly detailed photo of a red cat sitting on a wooden chair"] * 12)


def ours(onnx_dir):
    return Pipeline.load(onnx_dir, backend="ort", device="cpu")


def test_windows_and_padding_match_compel(tiny_checkpoint, onnx_fp32):
    """compel with ``truncate_long_prompts=False``, splitting at the window's end, then padding the shorter
    conditioning with the empty prompt's: the same embeddings as the engine's text encoder gives."""
    import torch
    from compel import Compel
    from compel.embeddings_provider import SplitLongTextMode
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_checkpoint / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(tiny_checkpoint / "text_encoder").eval()
    compel = Compel(
        tokenizer=tokenizer,
        text_encoder=encoder,
        truncate_long_prompts=False,
        split_long_text_mode=SplitLongTextMode.BRUTAL,
    )
    with torch.no_grad():
        long, short = compel(LONG), compel("blurry")
        long, short = (t.numpy() for t in compel.pad_conditioning_tensors_to_same_length([long, short]))
    pipe = ours(onnx_fp32)
    ids = pipe.tokenizer.chunks([LONG, "blurry"])
    assert ids.shape == (2, 3, 77)
    ours_embeds = pipe.backend.encode_text(ids.reshape(-1, 77)).reshape(2, 3 * 77, -1)
    np.testing.assert_allclose(ours_embeds[0], long[0], atol=1e-5)
    np.testing.assert_allclose(ours_embeds[1], short[0], atol=1e-5)


@pytest.fixture(scope="module")
def pipes(onnx_fp32, tiny_checkpoint):
    return ours(onnx_fp32), Pipeline.load(tiny_checkpoint, backend="torch")


@pytest.mark.parametrize(
    ("prompt", "negative", "extra"),
    [
        (LONG, "blurry", {}),
        ("a cat", LONG, {}),  # the negative is the long one
        ([LONG, "a dog"], ["blurry", LONG + ", ugly"], {}),  # a batch of different lengths
        (LONG, "blurry", {"clip_skip": 1}),
    ],
    ids=["long-prompt", "long-negative", "batch", "clip-skip"],
)
def test_long_prompts_match_diffusers(pipes, prompt, negative, extra):
    pipe, ref = pipes
    a, b = (p(prompt, negative, long_prompts=True, **SETTINGS, **extra).array for p in (pipe, ref))
    assert psnr(a, b) >= 60
    assert psnr(a, pipe(prompt, negative, **SETTINGS, **extra).array) < 50  # the rest of the prompt counted


def test_short_prompts_are_unchanged(pipes):
    pipe, _ = pipes
    np.testing.assert_array_equal(
        pipe("a cat", "blurry", long_prompts=True, **SETTINGS).array,
        pipe("a cat", "blurry", **SETTINGS).array,
    )


def test_the_bound_loop_keeps_state_per_prompt_length(onnx_fp32):
    """Device state is kept per text length (GraphKey.sequence): short, long and short again on one
    backend give what the host loop gives."""
    from sdengine.backends.ort_cuda import OrtCudaBackend

    host = ours(onnx_fp32)
    bound = Pipeline(host.model_dir, OrtCudaBackend(host.model_dir, device="cpu"), host.tokenizer)
    for prompt in ("a cat", LONG, "a dog"):
        np.testing.assert_allclose(
            bound(prompt, long_prompts=True, **SETTINGS).array,
            host(prompt, long_prompts=True, **SETTINGS).array,
            atol=1e-5,
        )
    assert len({key.sequence for key in bound.backend._denoisers}) == 2


def test_static_tensorrt_engines_refuse_long_prompts(simulated, onnx_fp32, tmp_path):
    engines = tmp_path / "engines"
    pipe = engine_pipeline(onnx_fp32, engines, batch=1, height=64, width=64)
    with pytest.raises(UnsupportedConfigError, match="needs the ONNX Runtime backend"):
        pipe(LONG, long_prompts=True, **SETTINGS)
    pipe("a cat", long_prompts=True, **SETTINGS)  # one window: what the engine was built for


def test_cli_long_prompts(onnx_fp32, tmp_path, capsys):
    out = tmp_path / "cat.png"
    args = ["generate", str(onnx_fp32), LONG, "--steps", "2", "--height", "64", "--width", "64"]
    assert main([*args, "--long-prompts", "--device", "cpu", "--output", str(out)]) == 0
    assert read_png_parameters(out)["long_prompts"] is True
    assert "is longer than the text encoder" not in capsys.readouterr().err
