"""The web UI's ``<lora:NAME:WEIGHT>`` prompt tags: read as the web UI reads them, and served per request."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
from test_server import call, pixels

from sdengine.errors import InvalidArgumentError
from sdengine.extra_networks import LoraTag, lora_hash, lora_hashes, lora_tags, resolve_loras
from sdengine.infotext import parse_infotext
from sdengine.pipeline import Pipeline
from sdengine.server import serve_in_thread

SIZE = {"width": 64, "height": 64, "steps": 3}


def test_tags_leave_the_prompt_and_give_their_weights():
    text, tags = lora_tags("a cat <lora:style:0.8>, <lora:other>, <lyco:style:0.2:0.2:dyn=4> on a mat")
    assert text == "a cat , ,  on a mat"
    assert tags == [LoraTag("style", 1.0), LoraTag("other", 1.0)]  # 0.8 + 0.2: the same file twice
    assert lora_tags("no tags here") == ("no tags here", [])


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("<hypernet:anime:1>", "type 'hypernet' are not supported"),
        ("<lora:style:strong>", "'strong' is not a number"),
        ("<lora:style:0.5:1.0>", "one finite weight for the text encoder and UNet alike"),
        ("<lora:style:inf>", "one finite weight"),
    ],
)
def test_tags_sdengine_cannot_honour_are_refused(prompt, message):
    with pytest.raises(InvalidArgumentError, match=message):
        lora_tags(prompt)


def test_names_are_files_anywhere_under_the_directory(tmp_path):
    (tmp_path / "styles").mkdir()
    (tmp_path / "styles" / "ink.safetensors").write_bytes(b"")
    assert resolve_loras([LoraTag("ink", 0.5)], tmp_path) == [(tmp_path / "styles" / "ink.safetensors", 0.5)]
    with pytest.raises(InvalidArgumentError, match="no LoRA named paint in"):
        resolve_loras([LoraTag("paint", 1.0)], tmp_path)
    with pytest.raises(InvalidArgumentError, match="LoRA tags need a LoRA directory"):
        resolve_loras([LoraTag("ink", 1.0)], None)
    assert resolve_loras([], None) == []


def _tensor_bytes_sha256(path) -> str:
    """sha256 of a safetensors file's data, read by the format's layout: 8 bytes of header length, the
    header, then the tensors."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + length :]).hexdigest()


def test_a_loras_hash_is_its_tensors_sha256_unless_its_metadata_holds_one(tmp_path):
    from safetensors.numpy import save_file

    tensors = {"lora_unet_a.lora_down.weight": np.arange(12, dtype=np.float32).reshape(3, 4)}
    plain, noted = tmp_path / "plain.safetensors", tmp_path / "noted.safetensors"
    save_file(tensors, str(plain))
    save_file(tensors, str(noted), metadata={"ss_output_name": "style", "ss_network_dim": "4"})
    assert plain.read_bytes() != noted.read_bytes()  # other headers, the same tensors: the same hash
    assert lora_hash(plain) == lora_hash(noted) == _tensor_bytes_sha256(plain)
    assert lora_hash(plain) != hashlib.sha256(plain.read_bytes()).hexdigest()
    other = tmp_path / "other.safetensors"
    save_file({k: v + 1 for k, v in tensors.items()}, str(other))
    assert lora_hash(other) != lora_hash(plain)
    save_file(tensors, str(noted), metadata={"sshs_model_hash": "0123456789abcdef"})
    assert lora_hash(noted) == "0123456789abcdef"
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InvalidArgumentError, match="is not a safetensors file"):
        lora_hash(tmp_path / "bad.safetensors")
    tags = [LoraTag("ink,wash:v2", 0.5), LoraTag("style", 1.0)]
    assert lora_hashes(tags, [(plain, 0.5), (other, 1.0)]) == (
        f"inkwashv2: {lora_hash(plain)[:12]}, style: {lora_hash(other)[:12]}"
    )


def test_set_loras_fuses_a_new_set_only(onnx_fp32, tmp_path, monkeypatch):
    from export.random_lora import write_random_lora

    lora = write_random_lora(onnx_fp32, tmp_path / "style.safetensors", seed=1)
    pipe = Pipeline.load(onnx_fp32, backend="ort", device="cpu")
    reopened = []
    original = pipe.backend.set_weights
    monkeypatch.setattr(pipe.backend, "set_weights", lambda c, w: reopened.append(c) or original(c, w))
    pipe.set_loras([(lora, 0.8)])
    count = len(reopened)
    assert count and pipe.loras == [(lora, 0.8)]
    pipe.set_loras([(str(lora), 0.8)])  # the same set, named another way: nothing to do
    assert len(reopened) == count
    pipe.set_loras([])
    assert pipe.loras == [] and len(reopened) > count


def test_the_server_fuses_a_prompts_loras_for_its_request(onnx_fp32, ort_pipe_fp32, tmp_path):
    from export.random_lora import write_random_lora

    loras = tmp_path / "Lora"
    write_random_lora(onnx_fp32, loras / "style.safetensors", seed=1)
    served = Pipeline.load(onnx_fp32, backend="ort", device="cpu")
    server = serve_in_thread(served, lora_dir=loras)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        body = {"prompt": "a cat <lora:style:0.8>", **SIZE, "seed": 5}
        status, answer = call(url, "/sdapi/v1/txt2img", body)
        info = json.loads(answer["info"])
        assert status == 200 and info["extra_networks"] == [{"lora": "style", "weight": 0.8}]
        status, plain = call(url, "/sdapi/v1/txt2img", {**body, "prompt": "a cat "})
        status_missing, missing = call(url, "/sdapi/v1/txt2img", {**body, "prompt": "a cat <lora:paint>"})
        listed = call(url, "/sdapi/v1/loras")[1]
    finally:
        server.shutdown()
    direct = Pipeline.load(onnx_fp32, backend="ort", device="cpu")
    direct.load_lora(loras / "style.safetensors", 0.8)
    settings = dict(SIZE, seed=5, guidance=7.0, scheduler="euler", prompt_weights="a1111", long_prompts=True)
    expected = direct("a cat ", "", **settings)
    np.testing.assert_allclose(pixels(answer["images"][0]), expected.array[0], atol=0.5 / 255)
    without = ort_pipe_fp32("a cat ", "", **settings)  # the next request runs without the LoRA again
    np.testing.assert_allclose(pixels(plain["images"][0]), without.array[0], atol=0.5 / 255)
    assert np.abs(expected.array - without.array).max() > 0.05
    assert status_missing == 422 and "no LoRA named paint" in missing["detail"]
    assert listed == [
        {"name": "style", "alias": "style", "path": str(loras / "style.safetensors"), "metadata": {}}
    ]
    # as the web UI records it: the prompt as given, tags and all, and the file's hash
    short = _tensor_bytes_sha256(loras / "style.safetensors")[:12]
    assert info["prompt"] == info["all_prompts"][0] == "a cat <lora:style:0.8>"
    assert info["extra_generation_params"] == {"Lora hashes": f"style: {short}"}
    read = parse_infotext(info["infotexts"][0])
    assert read["Prompt"] == "a cat <lora:style:0.8>" and read["Lora hashes"] == f"style: {short}"
    assert "Lora hashes" not in parse_infotext(json.loads(plain["info"])["infotexts"][0])


def test_generate_reads_the_tags_with_a_lora_dir(onnx_fp32, tmp_path):
    from PIL import Image

    from export.random_lora import write_random_lora
    from sdengine.cli import main

    write_random_lora(onnx_fp32, tmp_path / "Lora" / "style.safetensors", seed=1)
    args = ["generate", str(onnx_fp32), "--steps", "2", "--height", "64", "--width", "64", "--seed", "4"]
    args += ["--device", "cpu", "--prompt-weights", "a1111"]
    tagged, plain = tmp_path / "tagged.png", tmp_path / "plain.png"
    lora = f"{tmp_path / 'Lora' / 'style.safetensors'}:0.8"
    assert (
        main([*args, "a cat <lora:style:0.8>", "--lora-dir", str(tmp_path / "Lora"), "--output", str(tagged)])
        == 0
    )
    assert main([*args, "a cat ", "--lora", lora, "--output", str(plain)]) == 0
    a, b = (np.asarray(Image.open(p), np.float32) for p in (tagged, plain))
    np.testing.assert_array_equal(a, b)
    recorded = json.loads(Image.open(tagged).info["sdengine"])
    assert recorded["loras"] == [{"file": "style.safetensors", "scale": 0.8}]
    short = _tensor_bytes_sha256(tmp_path / "Lora" / "style.safetensors")[:12]
    assert recorded["prompt"] == "a cat <lora:style:0.8>" and recorded["lora_hashes"] == f"style: {short}"
    infotext = parse_infotext(Image.open(tagged).info["parameters"])
    assert infotext["Prompt"] == "a cat <lora:style:0.8>" and infotext["Lora hashes"] == f"style: {short}"
    assert "Lora hashes" not in parse_infotext(Image.open(plain).info["parameters"])
