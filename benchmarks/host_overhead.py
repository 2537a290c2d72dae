"""The host's own cost per denoising step on the graph-replay path, without a GPU.

On a GPU each step of the TensorRT backend, and of ONNX Runtime's in its default ``step`` graph mode, is one
``cudaGraphLaunch``, so what the host spends per step is the loop (:func:`sdengine.denoise.denoise`: the
per-step timer and the progress bar, when shown), the backend's ``step()`` and the CUDA driver's launch.
This measures the first two on the real code, with cuda-bindings' runtime module replaced by one whose calls
return at once; the driver's launch is left out (it needs a GPU, and is typically a few microseconds), so add
it when reading the result against the 50 us per-step target.

    python -m benchmarks.host_overhead [--steps 50] [--runs 200]

Prints the median (p10, p90) microseconds per step for each backend, without and with a progress bar.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import types
from unittest import mock

import numpy as np


class InstantRuntime(types.ModuleType):
    """Stands in for ``cuda.bindings.runtime``: every call the step makes succeeds at once."""

    class cudaError_t:  # noqa: N801 - the real name
        cudaSuccess = 0

    def __init__(self) -> None:
        super().__init__("cuda.bindings.runtime")
        self.launches = 0

    def cudaGraphLaunch(self, graph: object, stream: object) -> tuple[int]:  # noqa: N802
        self.launches += 1
        return (0,)

    def cudaGraphExecDestroy(self, graph: object) -> tuple[int]:  # noqa: N802
        return (0,)


class FixedPlan:
    """Just what :func:`denoise` reads of a plan: the number of model calls."""

    def __init__(self, calls: int) -> None:
        self.tables = types.SimpleNamespace(num_calls=calls)


def captured(backend: str, runtime: InstantRuntime, steps: int):
    """The ``backend``'s denoiser past its capture (TensorRT's ``GraphSteps``, ONNX Runtime's
    ``DeviceDenoiser`` in ``step`` mode): two graphs and a stream; nothing else is touched by a step."""
    if backend == "trt":
        from sdengine.backends.trt import GraphSteps as Denoiser
    else:
        from sdengine.backends.ort_cuda import DeviceDenoiser as Denoiser
    denoiser = object.__new__(Denoiser)
    denoiser.graphs, denoiser.stream = ["graph-0", "graph-1"], types.SimpleNamespace(handle=7)
    denoiser.calls, denoiser.num_calls, denoiser._rt = 0, steps, runtime
    denoiser.whole_calls = None  # no DeepCache: the whole UNet's graphs on every call
    denoiser.latents = lambda: np.zeros(1, np.float32)
    return denoiser


def per_step_us(backend_name: str, steps: int, runs: int, progress: bool) -> dict[str, float]:
    from tqdm import tqdm

    from sdengine.denoise import denoise
    from sdengine.timing import StageTimes

    runtime = InstantRuntime()
    denoiser = captured(backend_name, runtime, steps)
    backend = types.SimpleNamespace(denoiser=lambda plan, times: denoiser)
    bar = (lambda it: tqdm(it, file=io.StringIO(), leave=False)) if progress else None
    samples = []
    with (
        mock.patch("sdengine.backends.cuda_runtime.cudart", lambda: runtime),
        mock.patch("sdengine.backends.trt.cudart", lambda: runtime),
    ):
        for _ in range(runs):
            denoiser.calls = 0
            start = time.perf_counter_ns()
            denoise(backend, FixedPlan(steps), StageTimes(), bar)
            samples.append((time.perf_counter_ns() - start) / steps / 1e3)
    assert runtime.launches == steps * runs, "every step must launch one graph"
    a = np.asarray(samples)
    return {
        "median": float(np.median(a)),
        "p10": float(np.percentile(a, 10)),
        "p90": float(np.percentile(a, 90)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--runs", type=int, default=200)
    args = p.parse_args(argv)
    from benchmarks.machine import machine_info

    print(f"machine: {machine_info()['cpu']}, Python {sys.version.split()[0]}")
    for backend in ("trt", "ort"):
        for label, progress in (("loop + step", False), ("loop + step + tqdm progress bar", True)):
            r = per_step_us(backend, args.steps, args.runs, progress)
            name = f"{backend} ({'TensorRT' if backend == 'trt' else 'ONNX Runtime'}): {label}"
            print(f"{name:<56} {r['median']:6.2f} us/step (p10 {r['p10']:.2f}, p90 {r['p90']:.2f})")
    print("the CUDA driver's graph launch is not included (no GPU here): add it against the 50 us target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
