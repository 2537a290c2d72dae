"""Another VAE for a checkpoint (export.vae_override): exported in the checkpoint's place, run by the PyTorch
baseline with the same VAE, from a folder, a checkpoint directory or a single file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from export.checkpoint import write_random_checkpoint
from export.ldm_checkpoint import ldm_state_dict
from export.vae_override import checkpoint_with_vae
from sdengine.cli import main
from sdengine.errors import InvalidArgumentError, ModelDirectoryError, UnsupportedConfigError
from sdengine.images import psnr
from sdengine.manifest import Manifest
from sdengine.pipeline import Pipeline

SETTINGS = dict(steps=4, seed=4, height=64, width=64)


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another tiny checkpoint (other weights): its VAE is the one swapped in."""
    return write_random_checkpoint(tmp_path_factory.mktemp("other") / "other", "tiny", seed=7)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SDENGINE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _weights(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(folder / "diffusion_pytorch_model.safetensors")


def test_export_with_another_vae_draws_the_baseline_s_image(
    tiny_checkpoint: Path, other: Path, ort_pipe_fp32, tmp_path: Path, cache: Path
) -> None:
    """The export's VAE is the other one (checked against it by the export's verification), the manifest
    names the composed checkpoint, and the baseline loading that VAE draws the same image."""
    from export.onnx_export import export_checkpoint

    manifest = export_checkpoint(tiny_checkpoint, tmp_path / "onnx", vae=other)
    assert all(record.verification["passed"] for record in manifest.components.values())
    composed = Path(manifest.source_checkpoint)
    assert composed.parent == (cache / "checkpoints").resolve()
    assert (composed / "vae").resolve() == (other / "vae").resolve()
    assert (composed / "unet").resolve() == (tiny_checkpoint / "unet").resolve()
    assert Manifest.read(tmp_path / "onnx").source_checkpoint == str(composed)

    ours = Pipeline.load(tmp_path / "onnx", backend="ort", device="cpu")("a red boat", "fog", **SETTINGS)
    theirs = Pipeline.load(tiny_checkpoint, backend="torch", vae=other / "vae")(
        "a red boat", "fog", **SETTINGS
    )
    assert psnr(ours.array, theirs.array) >= 100
    own_vae = ort_pipe_fp32("a red boat", "fog", **SETTINGS)
    assert np.array_equal(ours.latents, own_vae.latents)  # the same denoising...
    assert psnr(ours.array, own_vae.array) < 30  # ...decoded by another VAE


def test_a_single_file_vae(tiny_checkpoint: Path, other: Path, tmp_path: Path, cache: Path, capsys) -> None:
    """A VAE file in the original layout (as ``vae-ft-mse-840000-ema-pruned.safetensors``) becomes exactly the
    weights it was written from, once."""
    from safetensors.torch import save_file

    prefix = "first_stage_model."
    state = {k[len(prefix) :]: v for k, v in ldm_state_dict(other).items() if k.startswith(prefix)}
    save_file(state, tmp_path / "vae.safetensors")
    composed = checkpoint_with_vae(tiny_checkpoint, tmp_path / "vae.safetensors")
    assert "converting VAE" in capsys.readouterr().err
    got, want = _weights(composed / "vae"), _weights(other / "vae")
    assert sorted(got) == sorted(want)
    assert all(np.array_equal(got[key], value) for key, value in want.items())
    assert checkpoint_with_vae(tiny_checkpoint, tmp_path / "vae.safetensors") == composed
    assert "converting" not in capsys.readouterr().err  # kept

    save_file(
        {"lora_unet_x.lora_down.weight": state["decoder.conv_in.weight"]}, tmp_path / "lora.safetensors"
    )
    with pytest.raises(ModelDirectoryError, match="cannot read .* as a VAE"):
        checkpoint_with_vae(tiny_checkpoint, tmp_path / "lora.safetensors")


def test_a_vae_that_needs_no_upcast_is_exported_in_float16(tmp_path: Path, cache: Path) -> None:
    """SDXL's own VAE stays float32 in fp16 exports; one whose config says it needs no upcast (as
    ``sdxl-vae-fp16-fix``'s) is exported in float16."""
    from export.onnx_export import export_checkpoint

    xl = write_random_checkpoint(tmp_path / "xl", "tiny-xl", seed=0)
    fixed = shutil.copytree(xl / "vae", tmp_path / "vae-fp16-fix")
    config = json.loads((fixed / "config.json").read_text())
    assert config["force_upcast"]
    (fixed / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    export_checkpoint(xl, tmp_path / "onnx", precision="fp16", components=["vae_decoder"], vae=fixed)
    graph = onnx.load(str(tmp_path / "onnx" / "vae_decoder" / "model.onnx")).graph
    assert {t.data_type for t in graph.initializer if len(t.dims) > 1} == {onnx.TensorProto.FLOAT16}
    assert not json.loads((tmp_path / "onnx" / "vae_decoder" / "config.json").read_text())["force_upcast"]


def test_refusals(
    tiny_checkpoint: Path, other: Path, ort_pipe_fp32, tmp_path: Path, cache: Path, capsys
) -> None:
    wide = shutil.copytree(other / "vae", tmp_path / "wide")
    config = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**config, "latent_channels": 16}))
    with pytest.raises(UnsupportedConfigError, match="16-channel latents; .* denoises 4-channel ones"):
        checkpoint_with_vae(tiny_checkpoint, wide)
    with pytest.raises(
        ModelDirectoryError, match="no diffusers VAE .a config.json naming AutoencoderKL or AutoencoderTiny"
    ):
        checkpoint_with_vae(tiny_checkpoint, tiny_checkpoint / "unet")
    with pytest.raises(ModelDirectoryError, match="does not exist"):
        checkpoint_with_vae(tiny_checkpoint, tmp_path / "missing")
    with pytest.raises(InvalidArgumentError, match="an export holds its VAE"):
        Pipeline.load(ort_pipe_fp32.model_dir.root, backend="ort", device="cpu", vae=other)
    assert not cache.exists() or not any((cache / "checkpoints").glob("*"))  # nothing made

    out = tmp_path / "onnx"
    assert (
        main(["export", str(tiny_checkpoint), "--output", str(out), "--vae", str(tmp_path / "missing")]) == 1
    )
    err = capsys.readouterr().err.strip()
    assert err == f"sdengine: error: VAE {tmp_path / 'missing'} does not exist"
    assert not out.exists()
