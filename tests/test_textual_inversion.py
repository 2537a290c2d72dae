"""Textual inversion: embedding files as new prompt tokens, against diffusers' ``load_textual_inversion``."""

from __future__ import annotations

import numpy as np
import pytest
from fake_tensorrt import engine_pipeline
from safetensors.numpy import save_file

from sdengine.cli import main
from sdengine.errors import InvalidArgumentError, UnsupportedConfigError
from sdengine.images import psnr
from sdengine.pipeline import Pipeline

SETTINGS = dict(steps=4, seed=1, height=64, width=64)


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    """A one-vector embedding in diffusers' format and a three-vector one in A1111's (named by its file)."""
    folder = tmp_path_factory.mktemp("embeddings")
    rng = np.random.default_rng(0)
    save_file({"<toy>": rng.standard_normal(32).astype(np.float32)}, str(folder / "toy.safetensors"))
    save_file(
        {"emb_params": rng.standard_normal((3, 32)).astype(np.float32)}, str(folder / "badstyle.safetensors")
    )
    return folder


def fresh(onnx_dir):
    return Pipeline.load(onnx_dir, backend="ort", device="cpu")


def test_embeddings_match_diffusers(onnx_fp32, tiny_checkpoint, embeddings):
    ours, ref = fresh(onnx_fp32), Pipeline.load(tiny_checkpoint, backend="torch")
    before = ours("a photo of <toy>", "badstyle, blurry", **SETTINGS)
    for pipe in (ours, ref):
        assert pipe.load_textual_inversion(embeddings / "toy.safetensors") == "<toy>"
        assert pipe.load_textual_inversion(embeddings / "badstyle.safetensors") == "badstyle"
    a, b = (pipe("a photo of <toy>", "badstyle, blurry", **SETTINGS) for pipe in (ours, ref))
    assert psnr(a.array, b.array) >= 40
    assert psnr(a.array, before.array) < 60  # the new tokens did something
    ids = ours.tokenizer(["badstyle"])[0]
    first = ours.tokenizer.vocab_size - 3
    assert list(ids[1:5]) == [first, first + 1, first + 2, ours.tokenizer.eos_token_id]  # the whole group
    # compel's weighted prompts read the whole group too (on the torch backend, given diffusers' manager)
    prompt = "a (photo)1.2 of <toy>, badstyle--"
    a, b = (pipe(prompt, **SETTINGS, prompt_weights="compel") for pipe in (ours, ref))
    assert psnr(a.array, b.array) >= 100  # 39 dB where compel reads the group's first token alone


def test_the_bound_loop_reads_the_new_rows(onnx_fp32, embeddings):
    from sdengine.backends.ort_cuda import OrtCudaBackend

    host = fresh(onnx_fp32)
    bound = Pipeline(host.model_dir, OrtCudaBackend(host.model_dir, device="cpu"), fresh(onnx_fp32).tokenizer)
    for pipe in (host, bound):
        pipe.load_textual_inversion(embeddings / "toy.safetensors", token="<thing>")
    np.testing.assert_allclose(
        bound("<thing> on a shelf", **SETTINGS).array, host("<thing> on a shelf", **SETTINGS).array, atol=1e-5
    )


def test_refusals_leave_the_pipeline_as_it_was(onnx_fp32, embeddings, tmp_path):
    pipe = fresh(onnx_fp32)
    size = pipe.tokenizer.vocab_size
    save_file({"<wide>": np.zeros(64, np.float32)}, str(tmp_path / "wide.safetensors"))
    save_file(
        {"a": np.zeros(32, np.float32), "b": np.zeros(32, np.float32)}, str(tmp_path / "two.safetensors")
    )
    for path, token, message in (
        (tmp_path / "wide.safetensors", None, "of size 64 for a text encoder of width 32"),
        (tmp_path / "two.safetensors", None, "is not a textual inversion embedding"),
        (tmp_path / "missing.safetensors", None, "does not exist"),
        (embeddings / "toy.safetensors", "photo</w>", "already in the tokenizer's vocabulary"),
    ):
        with pytest.raises(InvalidArgumentError, match=message):
            pipe.load_textual_inversion(path, token)
        assert pipe.tokenizer.vocab_size == size
    pipe.load_textual_inversion(embeddings / "toy.safetensors")
    with pytest.raises(InvalidArgumentError, match="already in"):
        pipe.load_textual_inversion(embeddings / "toy.safetensors")


def test_tensorrt_engines_refuse_new_tokens(simulated, onnx_fp32, embeddings, tmp_path):
    engines = tmp_path / "engines"
    pipe = engine_pipeline(onnx_fp32, engines, batch=1, height=64, width=64)
    size = pipe.tokenizer.vocab_size
    with pytest.raises(UnsupportedConfigError, match="needs the ONNX Runtime backend"):
        pipe.load_textual_inversion(embeddings / "toy.safetensors")
    assert pipe.tokenizer.vocab_size == size


def test_cli_embedding(onnx_fp32, embeddings, tmp_path, capsys):
    args = ["generate", str(onnx_fp32), "<mine> in a box", "--steps", "2", "--height", "64", "--width", "64"]
    spec = f"{embeddings / 'toy.safetensors'}:<mine>"
    assert main([*args, "--embedding", spec, "--device", "cpu", "--output", str(tmp_path / "box.png")]) == 0
    assert "embedding: <mine> from" in capsys.readouterr().out
    assert main([*args, "--embedding", str(tmp_path / "none.safetensors"), "--device", "cpu"]) == 1
