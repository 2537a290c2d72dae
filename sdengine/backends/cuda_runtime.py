"""The few CUDA runtime calls the GPU backends make themselves, through cuda-python (``cuda.bindings``).

Streams, events, synchronisation and graph capture only; no torch. cuda-python is optional: :func:`cudart`
raises a one-line :class:`BackendUnavailableError` where it is missing. Written against cuda-python's
documented runtime API (its signatures checked against cuda-bindings 12.9 and 13.5, installed without a GPU);
not run on a GPU here.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from sdengine.errors import BackendUnavailableError


def cudart() -> ModuleType:
    try:
        from cuda.bindings import runtime
    except ImportError:
        raise BackendUnavailableError(
            "cuda-python is not installed: pip install 'sdengine[trt]' on a machine with an NVIDIA GPU"
        ) from None
    return runtime


def check(result: Any) -> Any:
    """Unpack a cuda-python ``(error, value...)`` tuple, raising on any error other than success."""
    rt = cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        raise BackendUnavailableError(f"CUDA error: {err}")
    return values[0] if len(values) == 1 else tuple(values) or None


class Stream:
    """A non-blocking CUDA stream, shared by every model of a backend so their work stays in order."""

    def __init__(self, device: int = 0) -> None:
        rt = cudart()
        check(rt.cudaSetDevice(device))  # a stream belongs to the device current when it is created
        self.handle = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking))

    @property
    def pointer(self) -> int:
        return int(self.handle)

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle))


class Event:
    """A CUDA event for timing work on a stream (milliseconds between two recorded events)."""

    def __init__(self) -> None:
        self.handle = check(cudart().cudaEventCreate())

    def record(self, stream: Stream) -> None:
        check(cudart().cudaEventRecord(self.handle, stream.handle))

    def elapsed_ms(self, since: Event) -> float:
        check(cudart().cudaEventSynchronize(self.handle))
        return float(check(cudart().cudaEventElapsedTime(since.handle, self.handle)))


def capture_graph(stream: Stream, enqueue: Callable[[], None]) -> Any:
    """Capture what ``enqueue`` puts on ``stream`` into an instantiated CUDA graph (a ``cudaGraphExec_t``).

    Thread-local capture mode, as TensorRT's trtexec uses: another thread's CUDA calls cannot invalidate it.
    If ``enqueue`` or the capture fails, the stream is taken out of capture mode before the error propagates,
    so it stays usable for running the same work without a graph.
    """
    rt = cudart()
    mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
    check(rt.cudaStreamBeginCapture(stream.handle, mode))
    try:
        enqueue()
    except BaseException:
        err, graph = rt.cudaStreamEndCapture(stream.handle)
        if err == rt.cudaError_t.cudaSuccess:
            rt.cudaGraphDestroy(graph)
        rt.cudaGetLastError()  # clear the capture's error, if any, from the runtime's last-error state
        raise
    graph = check(rt.cudaStreamEndCapture(stream.handle))
    try:
        return check(rt.cudaGraphInstantiate(graph, 0))
    finally:
        rt.cudaGraphDestroy(graph)  # the instantiated graph no longer needs its template


#: How far a replayed graph's result may be from the plain runs' (relative to the result's largest value):
#: the same kernels on the same inputs agree to rounding; a graph that replays a stale value does not.
REPLAY_TOLERANCE = 1e-3


def check_replay(eager: list[Any], replayed: list[Any]) -> None:
    """Refuse captured step graphs whose results (host arrays, one per graph) differ from those of the plain
    runs they were captured from, on the same inputs: BackendUnavailableError, so the caller falls back."""
    import numpy as np

    for parity, (a, b) in enumerate(zip(eager, replayed, strict=True)):
        diff = float(np.abs(a - b).max())
        if not diff <= REPLAY_TOLERANCE * max(float(np.abs(a).max()), 1e-6):
            raise BackendUnavailableError(
                f"the captured graph of step parity {parity} does not reproduce the plain runs "
                f"(max |difference| {diff:.3g})"
            )
