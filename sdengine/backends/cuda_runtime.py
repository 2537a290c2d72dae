"""The few CUDA runtime calls the GPU backends make themselves, through cuda-python (``cuda.bindings``).

Streams, events, synchronisation and graph capture only; no torch. cuda-python is optional: :func:`cudart`
raises a one-line :class:`BackendUnavailableError` where it is missing. Written against cuda-python's
documented runtime API (its signatures checked against cuda-bindings 12.9 and 13.5, installed without a GPU);
not run on a GPU here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


def capture_steps(
    stream: Stream,
    kinds: Sequence[bool],
    eager_step: Callable[[int, bool], None],
    two_steps: Callable[[Callable[[int], None]], list[Any]],
) -> list[Any]:
    """A device loop's step graphs: for each kind (``True``, the whole UNet's step; ``False``, DeepCache's
    shallow one's) and state parity, ``eager_step(parity, whole)`` captured on ``stream``, in
    :func:`launch_step`'s order. Each kind's two graphs are then replayed against the plain steps
    (``two_steps`` runs a step function on both parities and gives their samples; :func:`check_replay`).
    Where a capture or a check fails, the graphs made so far are destroyed before the error propagates."""
    graphs: list[Any] = []
    try:
        for whole in kinds:
            for parity in (0, 1):
                graphs.append(capture_graph(stream, lambda p=parity, w=whole: eager_step(p, w)))
        for whole in kinds:
            eager = lambda p, w=whole: eager_step(p, w)  # noqa: E731
            replayed = lambda p, w=whole: launch_step(graphs, stream, p, w)  # noqa: E731
            check_replay(two_steps(eager), two_steps(replayed))
    except BaseException:
        destroy_graphs(graphs)
        raise
    return graphs


def launch_step(
    graphs: Sequence[Any], stream: Stream, parity: int, whole: bool = True, rt: ModuleType | None = None
) -> None:
    """Launch the step graph of this parity and kind (:func:`capture_steps`' order) on ``stream``. ``rt``:
    the runtime module the caller holds, so that a loop's launches skip looking it up each step."""
    check((rt or cudart()).cudaGraphLaunch(graphs[parity + (0 if whole else 2)], stream.handle))


def destroy_graphs(graphs: list[Any], rt: ModuleType | None = None) -> None:
    """Destroy instantiated graphs (none may still be running) and empty the list. ``rt``: the runtime
    module, held by an object whose ``__del__`` may run at interpreter exit, when imports no longer work."""
    rt = rt or cudart()
    for graph in graphs:
        rt.cudaGraphExecDestroy(graph)
    graphs.clear()


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
