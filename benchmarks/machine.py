"""What the benchmark ran on, and that machine's own matrix-multiply rate (the compute ceiling)."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import time
from importlib import metadata

import numpy as np

LIBRARIES = (
    "sdengine",
    "numpy",
    "onnxruntime-gpu",
    "onnxruntime",
    "torch",
    "diffusers",
    "transformers",
    "onnx",
)


def _cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def nvidia_smi(*query: str) -> list[str] | None:
    """nvidia-smi's CSV rows for ``query`` (e.g. ``--query-gpu=name``); None without an NVIDIA GPU."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", *query, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [line.strip() for line in out.splitlines() if line.strip()]


def machine_info() -> dict[str, object]:
    versions = {}
    for lib in LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[lib] = metadata.version(lib)
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "memory_gb": round(mem / 2**30, 1),
        "gpus": nvidia_smi("--query-gpu=name,driver_version,memory.total") or [],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": versions,
    }


def matmul_gflops(
    sizes: tuple[int, ...] = (512, 1024, 2048),
    repeats: int = 5,
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
) -> float:
    """The machine's float32 matrix-multiply rate in GFLOP/s: the best over ``sizes`` and ``repeats`` of an
    n x n MatMul in ONNX Runtime (the engine's own kernels). The best, because it estimates a ceiling."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    best = 0.0
    for n in sizes:
        a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])
        b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])
        c = helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])
        graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm", [a, b], [c])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        session = ort.InferenceSession(model.SerializeToString(), providers=list(providers))
        x = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
        feed = {"a": x, "b": x}
        session.run(None, feed)
        for _ in range(repeats):
            start = time.perf_counter()
            session.run(None, feed)
            best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best
