"""Single-file ControlNets in the original ("LDM") layout (``control_v11p_sd15_canny.pth``): written from a
random ControlNet directory (``export.ldm_checkpoint.write_controlnet_single_file``), read back by diffusers'
own converter against the checkpoint's UNet (``export.controlnet.converted_controlnet``), exported and run
by the torch backend as the directory is, the conversion kept in the cache, and files that are not such a
ControlNet refused in one line."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from export.controlnet import (
    check_controlnets,
    controlnet_directory,
    converted_controlnet,
    load_controlnets,
    write_random_controlnet,
)
from export.ldm_checkpoint import write_controlnet_single_file, write_single_file
from sdengine.errors import InvalidArgumentError, ModelDirectoryError, UnsupportedConfigError
from sdengine.model_dir import open_checkpoint_dir

WEIGHTS = "diffusion_pytorch_model.safetensors"
PROMPT = "a house by a lake"


@pytest.fixture(scope="module", autouse=True)
def module_cache(tmp_path_factory):
    """Conversions go to a cache of this module's own (a test that counts them sets its own)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SDENGINE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def xl_checkpoint(tmp_path_factory):
    from export.checkpoint import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("checkpoints") / "tiny-xl", "tiny-xl", seed=0)


@pytest.fixture(scope="module")
def nets(tiny_checkpoint, xl_checkpoint, tmp_path_factory):
    """A random ControlNet directory for each tiny checkpoint, by preset."""
    root = tmp_path_factory.mktemp("controlnets")
    return {
        "tiny": write_random_controlnet(tiny_checkpoint, root / "tiny", seed=2),
        "tiny-xl": write_random_controlnet(xl_checkpoint, root / "tiny-xl", seed=3),
    }


@pytest.fixture(scope="module")
def canny(nets, tmp_path_factory):
    """The tiny ControlNet as the ControlNet authors' ``.pth`` holds one."""
    path = tmp_path_factory.mktemp("files") / "control_v11p_sd15_canny.pth"
    return write_controlnet_single_file(nets["tiny"], path)


def checkpoints(preset, tiny_checkpoint, xl_checkpoint):
    return {"tiny": tiny_checkpoint, "tiny-xl": xl_checkpoint}[preset]


@pytest.mark.parametrize(
    "preset, prefix, suffix",
    [
        ("tiny", "control_model.", ".pth"),
        ("tiny", "control_model.", ".safetensors"),
        ("tiny", "", ".safetensors"),
        ("tiny", "", ".pth"),
        ("tiny-xl", "control_model.", ".safetensors"),
    ],
)
def test_a_file_reads_back_as_its_directory(
    preset, prefix, suffix, nets, tiny_checkpoint, xl_checkpoint, tmp_path
):
    """Every weight, bit for bit, under the same names, and the same config as the directory's."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type, load_single_file_checkpoint

    net = nets[preset]
    file = write_controlnet_single_file(net, tmp_path / f"net{suffix}", prefix=prefix)
    state = load_single_file_checkpoint(str(file))
    assert all(key.startswith(prefix) for key in state)
    for key in ("zero_convs.0.0.weight", "input_hint_block.14.weight", "middle_block_out.0.bias"):
        assert prefix + key in state
    if prefix:  # diffusers itself tells a ControlNet file by these keys
        assert infer_diffusers_model_type(state) == "controlnet"
    folder = converted_controlnet(file, checkpoints(preset, tiny_checkpoint, xl_checkpoint))
    expected, actual = load_file(net / WEIGHTS), load_file(folder / WEIGHTS)
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype and torch.equal(actual[key], tensor), key
    config, original = (json.loads((d / "config.json").read_text()) for d in (folder, net))
    assert config == original


def test_float16_weights_stay_float16(nets, tiny_checkpoint, tmp_path):
    """A float16 file (as the shared ones are) becomes the fp16 variant, which loads as float32 too."""
    file = write_controlnet_single_file(nets["tiny"], tmp_path / "full.pth")
    half = tmp_path / "half.pth"
    torch.save({k: v.half() for k, v in torch.load(file).items()}, half)
    folder = converted_controlnet(half, tiny_checkpoint)
    weights = load_file(folder / "diffusion_pytorch_model.fp16.safetensors")
    expected = load_file(nets["tiny"] / WEIGHTS)
    assert all(torch.equal(weights[k], v.half()) for k, v in expected.items())
    (net,) = load_controlnets([half], checkpoint=tiny_checkpoint)
    assert net.conv_in.weight.dtype == torch.float32


def test_export_with_a_file_gives_the_directorys_unet(nets, canny, tiny_checkpoint, tmp_path):
    """The same UNet model as an export with the directory, its records naming the converted directory."""
    import onnxruntime as ort

    from export.checkpoint import checkpoint_hash
    from export.onnx_export import export_checkpoint
    from export.wrappers import sample_inputs
    from sdengine.manifest import Manifest

    export_checkpoint(
        tiny_checkpoint, tmp_path / "dir", controlnets=[nets["tiny"]], components=["unet"], verify=False
    )
    manifest = export_checkpoint(tiny_checkpoint, tmp_path / "file", controlnets=[canny], components=["unet"])
    assert manifest.components["unet"].verification["passed"]
    folder = converted_controlnet(canny, tiny_checkpoint)
    assert manifest.controlnets == [{"dir": str(folder), "sha256": checkpoint_hash(folder)}]
    assert checkpoint_hash(folder) == checkpoint_hash(nets["tiny"])  # the same weights and config
    listed = json.loads((tmp_path / "file" / "controlnet" / "config.json").read_text())["controlnets"]
    assert listed[0]["dir"] == str(folder) and folder.name.startswith("control_v11p_sd15_canny-")
    assert Manifest.read(tmp_path / "file").controlnets == manifest.controlnets
    arch = dataclasses.replace(open_checkpoint_dir(tiny_checkpoint).arch, controlnets=1, control_residuals=13)
    feeds = {
        k: v.numpy() for k, v in sample_inputs(arch, "unet", batch=2, height=64, width=64, seed=5).items()
    }
    outputs = [
        ort.InferenceSession(str(root / "unet" / "model.onnx"), providers=["CPUExecutionProvider"]).run(
            None, feeds
        )
        for root in (tmp_path / "dir", tmp_path / "file")
    ]
    for a, b in zip(*outputs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_torch_backend_runs_a_file_as_its_directory(nets, canny, tiny_checkpoint):
    from test_controlnet import control

    from sdengine.pipeline import Pipeline

    settings = dict(steps=2, seed=3, height=64, width=64, control_image=control(height=64, width=64))
    images = [
        Pipeline.load(tiny_checkpoint, backend="torch", controlnets=[net])(PROMPT, **settings).array
        for net in (nets["tiny"], canny)
    ]
    np.testing.assert_array_equal(*images)
    with pytest.raises(InvalidArgumentError, match="single-file ControlNet") as error:
        load_controlnets([canny])  # its config comes from a checkpoint
    assert "\n" not in str(error.value)


def test_a_file_s_directory_is_its_conversion(nets, canny, tiny_checkpoint):
    paths = [controlnet_directory(path, tiny_checkpoint) for path in (nets["tiny"], canny)]
    assert paths == [nets["tiny"], converted_controlnet(canny, tiny_checkpoint)]
    configs = check_controlnets(tiny_checkpoint, open_checkpoint_dir(tiny_checkpoint).arch, paths)
    assert configs[0] == configs[1]
    with pytest.raises(InvalidArgumentError, match="its config comes from the checkpoint"):
        check_controlnets(tiny_checkpoint, open_checkpoint_dir(tiny_checkpoint).arch, [canny])


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_files_that_are_not_a_fitting_controlnet_are_refused(
    nets, canny, tiny_checkpoint, xl_checkpoint, tmp_path
):
    from export.onnx_export import export_checkpoint

    lora = tmp_path / "lora.safetensors"
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file(
        {f"{name}.lora_down.weight": torch.zeros(4, 16), f"{name}.lora_up.weight": torch.zeros(16, 4)}, lora
    )
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(256))
    sd_file = write_single_file(tiny_checkpoint, tmp_path / "model.safetensors")
    xl_net = write_controlnet_single_file(nets["tiny-xl"], tmp_path / "xl-canny.safetensors")
    partial = tmp_path / "partial.safetensors"
    state = load_file(write_controlnet_single_file(nets["tiny"], tmp_path / "whole.safetensors"))
    save_file({k: v for k, v in state.items() if "zero_convs.3." not in k}, partial)
    cases = [
        (lora, tiny_checkpoint, ModelDirectoryError, "is not a ControlNet.*looks like a LoRA"),
        (junk, tiny_checkpoint, ModelDirectoryError, "cannot read .*junk.safetensors as a ControlNet"),
        (sd_file, tiny_checkpoint, ModelDirectoryError, "looks like a Stable Diffusion checkpoint"),
        (xl_net, tiny_checkpoint, UnsupportedConfigError, "made for another Stable Diffusion architecture"),
        (canny, xl_checkpoint, UnsupportedConfigError, "made for another Stable Diffusion architecture"),
        (partial, tiny_checkpoint, UnsupportedConfigError, "lacks 2 of the .* weights"),
    ]
    for file, checkpoint, kind, match in cases:
        with pytest.raises(kind) as error:
            converted_controlnet(file, checkpoint)
        assert file.name in one_line(error) and error.match(match), file
    with pytest.raises(UnsupportedConfigError, match="another Stable Diffusion architecture") as error:
        export_checkpoint(tiny_checkpoint, tmp_path / "out", controlnets=[xl_net], components=["unet"])
    one_line(error)
    assert not (tmp_path / "out").exists()


def test_the_conversion_is_kept_in_the_cache(canny, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import export.controlnet as module

    monkeypatch.setenv("SDENGINE_CACHE", str(tmp_path / "cache"))
    file = tmp_path / canny.name
    file.write_bytes(canny.read_bytes())
    folder = converted_controlnet(file, tiny_checkpoint)
    assert folder.parent == tmp_path / "cache" / "controlnets" and folder.name.startswith(file.stem + "-")
    assert "converting ControlNet" in capsys.readouterr().err
    assert json.loads((folder / ".sdengine-source.json").read_text())["file"] == str(file.resolve())
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no staging left behind

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(module, "convert_controlnet_file", no_conversion)
    assert converted_controlnet(file, tiny_checkpoint) == folder
    assert (
        controlnet_directory(file, tiny_checkpoint) == folder
    )  # as the torch backend and the export find it
    assert load_controlnets([file], checkpoint=tiny_checkpoint)
    assert "converting" not in capsys.readouterr().err
    stat = file.stat()
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a changed file converts again
    with pytest.raises(AssertionError, match="converted again"):
        converted_controlnet(file, tiny_checkpoint)


def test_info_describes_a_file_and_run_refuses_one(nets, canny, tmp_path, capsys):
    from sdengine.cli import main
    from sdengine.info import describe

    info = describe(write_controlnet_single_file(nets["tiny"], tmp_path / "canny.safetensors"))
    assert info["kind"] == "single-file ControlNet" and info["control_image_channels"] == 3
    assert info["residuals"] == 13 and not info["sdxl"]  # SD 1.x: 12 down-block residuals and the mid block's
    xl = describe(write_controlnet_single_file(nets["tiny-xl"], tmp_path / "xl.safetensors", prefix=""))
    assert xl["sdxl"] and xl["residuals"] == 10  # SDXL's three down blocks: 9, and the mid block's
    assert main(["generate", str(canny), "a house"]) == 1  # the .pth
    assert "is a single file: a model is run from a directory" in capsys.readouterr().err
