"""A simulated CUDA runtime (``cuda.bindings.runtime``) for the GPU backends' tests on the CPU.

Device memory is host memory at the addresses handed out; a stream capture records the launches the code under
test puts into :attr:`FakeCudart.capture` (a simulated engine or run appends a closure there instead of
running), and a launched graph replays exactly those closures. Streams, events and copies succeed at once.
"""

from __future__ import annotations

import ctypes
import sys
import types

import numpy as np
import pytest


def view(ptr: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    count = int(np.prod(shape, dtype=np.int64))
    raw = (ctypes.c_char * (count * np.dtype(dtype).itemsize)).from_address(ptr)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


class FakeCudart(types.ModuleType):
    class cudaError_t:  # noqa: N801 - the real names
        cudaSuccess = 0

    class cudaMemcpyKind:  # noqa: N801
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    class cudaStreamCaptureMode:  # noqa: N801
        cudaStreamCaptureModeGlobal, cudaStreamCaptureModeThreadLocal = 0, 1

    class cudaDeviceAttr:  # noqa: N801
        cudaDevAttrComputeCapabilityMajor, cudaDevAttrComputeCapabilityMinor = 75, 76

    cudaStreamNonBlocking = 1

    def __init__(self) -> None:
        super().__init__("cuda.bindings.runtime")
        self.memory: dict[int, np.ndarray] = {}
        self.capture: list | None = None
        self.launches = 0

    def cudaMalloc(self, size):  # noqa: N802
        block = np.zeros(size, np.uint8)
        self.memory[block.ctypes.data] = block
        return 0, block.ctypes.data

    def cudaFree(self, ptr):  # noqa: N802
        self.memory.pop(ptr, None)
        return (0,)

    def cudaMemcpyAsync(self, dst, src, size, kind, stream):  # noqa: N802
        ctypes.memmove(dst, src, size)
        return (0,)

    def cudaStreamCreateWithFlags(self, flags):  # noqa: N802
        return 0, 7

    def cudaSetDevice(self, device):  # noqa: N802
        return (0,)

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        return (0,)

    def cudaEventCreate(self):  # noqa: N802
        return 0, object()

    def cudaEventRecord(self, event, stream):  # noqa: N802
        return (0,)

    def cudaEventSynchronize(self, event):  # noqa: N802
        return (0,)

    def cudaEventElapsedTime(self, start, end):  # noqa: N802
        return 0, 1.5

    def cudaStreamBeginCapture(self, stream, mode):  # noqa: N802
        assert self.capture is None, "a stream was left in capture mode"
        self.capture = []
        return (0,)

    def cudaStreamEndCapture(self, stream):  # noqa: N802
        graph, self.capture = self.capture, None
        return 0, graph

    def cudaGetLastError(self):  # noqa: N802
        return (0,)

    def cudaGraphInstantiate(self, graph, flags):  # noqa: N802
        return 0, tuple(graph)

    def cudaGraphDestroy(self, graph):  # noqa: N802
        return (0,)

    def cudaGraphExecDestroy(self, graph):  # noqa: N802
        return (0,)

    def cudaGraphLaunch(self, graph, stream):  # noqa: N802
        self.launches += 1
        for launch in graph:
            launch()
        return (0,)

    def cudaDeviceGetAttribute(self, attr, device):  # noqa: N802
        return 0, 8 if attr == self.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor else 9


def record_ort_steps_on_capture(monkeypatch: pytest.MonkeyPatch, cudart: FakeCudart) -> None:
    """Make the ONNX Runtime CUDA backend's steps behave on the simulated stream as on a real one: work put
    on a capturing stream is recorded into the graph, not run; outside a capture it runs."""
    from sdengine.backends import ort_cuda

    enqueue_step = ort_cuda.DeviceDenoiser._eager_step

    def on_stream(self, parity, options=None, whole=True):
        if cudart.capture is not None:
            cudart.capture.append(lambda: enqueue_step(self, parity, whole=whole))
        else:
            enqueue_step(self, parity, options, whole)

    monkeypatch.setattr(ort_cuda.DeviceDenoiser, "_eager_step", on_stream)


def install_fake_cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCudart:
    """Make ``from cuda.bindings import runtime`` give a fresh :class:`FakeCudart` for one test."""
    cudart = FakeCudart()
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cudart
    cuda = types.ModuleType("cuda")
    cuda.bindings = bindings
    for name, module in (("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.runtime", cudart)):
        monkeypatch.setitem(sys.modules, name, module)
    return cudart
