"""Which backend and device run a model directory: ``--backend auto|trt|ort|torch`` and ``--device cpu|cuda``.

The choice is a pure function of what was asked, what kind of directory was given and what this machine has,
so every rule and every refusal is tested on the CPU. ``auto`` picks the fastest available path and says why.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
from dataclasses import dataclass
from pathlib import Path

from sdengine.errors import BackendUnavailableError, InvalidArgumentError, ModelDirectoryError
from sdengine.manifest import MANIFEST_NAME as ONNX_MANIFEST
from sdengine.model_specs import REQUIRED_COMPONENTS

BACKEND_CHOICES = ("auto", "trt", "ort", "torch")
DEVICE_CHOICES = ("cpu", "cuda")
ENGINE_MANIFEST = "sdengine_engines.json"


@dataclass(frozen=True)
class Availability:
    """What this machine can run."""

    ort_cuda: bool = False
    tensorrt: bool = False
    cuda_python: bool = False
    torch: bool = False
    torch_cuda: bool = False


@dataclass(frozen=True)
class Choice:
    backend: str  # trt | ort | torch
    device: str  # cpu | cuda
    reason: str


def ort_cuda_works() -> bool:
    """Whether ONNX Runtime really runs on CUDA here. onnxruntime-gpu lists the CUDA provider even where no
    GPU or CUDA library is present (and then silently runs on the CPU), so a one-node session is tried."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    if hasattr(ort, "preload_dlls"):  # CUDA and cuDNN from the nvidia-* wheels, where torch brought them
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ort.preload_dlls()
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    ort.set_default_logger_severity(4)  # a failed CUDA provider is the expected answer on a CPU machine
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
        return "CUDAExecutionProvider" in session.get_providers()
    except Exception:  # noqa: BLE001 - any failure means "no"
        return False
    finally:
        ort.set_default_logger_severity(2)


def detect(*, torch_cuda: bool = True, ort_cuda: bool = True) -> Availability:
    """Probe the installed libraries. Asking torch about CUDA imports torch, so the lean runtime passes
    ``torch_cuda=False`` unless it is about to run the torch backend anyway; ``ort_cuda=False`` skips the
    ONNX Runtime CUDA probe (a session, about 0.1 s) where the device is already known to be the CPU."""
    has = lambda name: importlib.util.find_spec(name) is not None  # noqa: E731
    if torch_cuda and has("torch") and os.environ.get("CUDA_VISIBLE_DEVICES", "x") != "":
        import torch

        torch_cuda = torch.cuda.is_available()
    else:
        torch_cuda = False
    return Availability(
        ort_cuda=ort_cuda and ort_cuda_works(),
        tensorrt=has("tensorrt"),
        cuda_python=has("cuda"),
        torch=has("torch") and has("diffusers"),
        torch_cuda=torch_cuda,
    )


def model_kind(path: str | os.PathLike) -> str:
    """``engines`` (a TensorRT engine directory), ``onnx`` (an export) or ``checkpoint`` (diffusers)."""
    root = Path(path)
    if root.is_file():
        raise ModelDirectoryError(
            f"{root} is a single file: a model is run from a directory (a single-file checkpoint: sdengine "
            f"export {root} --output DIR exports it, sdengine convert {root} --output DIR makes it a "
            "diffusers directory; sdengine info tells what a .safetensors file is)"
        )
    if not root.is_dir():
        raise ModelDirectoryError(f"model directory {root} does not exist")
    if (root / ENGINE_MANIFEST).is_file():
        return "engines"
    if (root / ONNX_MANIFEST).is_file() or any(
        (root / c / "model.onnx").is_file() for c in REQUIRED_COMPONENTS
    ):
        return "onnx"
    if (root / "model_index.json").is_file() or (root / "unet" / "config.json").is_file():
        return "checkpoint"
    raise ModelDirectoryError(
        f"{root} is neither a diffusers checkpoint, an ONNX export nor an engine directory"
    )


def choose(backend: str, device: str | None, kind: str, has: Availability) -> Choice:
    """The backend and device for a ``kind`` directory, or a one-line BackendUnavailableError why not."""
    if backend not in BACKEND_CHOICES:
        raise InvalidArgumentError(f"unknown backend {backend!r}; choose one of {', '.join(BACKEND_CHOICES)}")
    if device is not None and device not in DEVICE_CHOICES:
        raise InvalidArgumentError(f"unknown device {device!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    if backend == "auto":
        backend = {"engines": "trt", "onnx": "ort", "checkpoint": "torch"}[kind]
        reason = f"auto: {kind} directory"
    else:
        reason = "requested"
    wanted = {"trt": "engines", "ort": "onnx", "torch": "checkpoint"}[backend]
    if kind != wanted:
        hint = {
            "engines": "build engines first: sdengine build ONNX_DIR --output ENGINE_DIR",
            "onnx": "export it first: sdengine export CHECKPOINT --output ONNX_DIR",
            "checkpoint": "the torch backend runs the diffusers checkpoint itself",
        }[wanted]
        what = {
            "engines": "an engine directory",
            "onnx": "an ONNX export",
            "checkpoint": "a diffusers checkpoint",
        }
        raise ModelDirectoryError(f"the {backend} backend runs {what[wanted]}, not {what[kind]} ({hint})")
    if backend == "trt":
        if device == "cpu":
            raise BackendUnavailableError("TensorRT runs on NVIDIA GPUs only; use --backend ort --device cpu")
        if not (has.tensorrt and has.cuda_python):
            raise BackendUnavailableError(
                "TensorRT or cuda-python is not installed: "
                "pip install 'sdengine[trt]' on a machine with an NVIDIA GPU"
            )
        return Choice("trt", "cuda", f"{reason}: TensorRT engines with CUDA-graph steps")
    if backend == "ort":
        if device == "cuda" and not has.ort_cuda:
            raise BackendUnavailableError(
                "ONNX Runtime has no CUDA execution provider here: "
                "install onnxruntime-gpu with a working CUDA, or use --device cpu"
            )
        device = device or ("cuda" if has.ort_cuda else "cpu")
        return Choice("ort", device, f"{reason}: ONNX Runtime on the {device.upper()}")
    if not has.torch:
        raise BackendUnavailableError(
            "the torch backend needs torch and diffusers: pip install 'sdengine[torch]'"
        )
    if device == "cuda" and not has.torch_cuda:
        raise BackendUnavailableError("torch cannot see a CUDA GPU here; use --device cpu")
    device = device or ("cuda" if has.torch_cuda else "cpu")
    return Choice("torch", device, f"{reason}: PyTorch (diffusers) on the {device.upper()}")
