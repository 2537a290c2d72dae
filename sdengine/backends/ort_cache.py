"""A per-machine cache of ONNX Runtime's optimised CPU graphs, so a session starts in seconds, not tens.

At ORT_ENABLE_ALL, ONNX Runtime rewrites a model for this CPU (NCHWc convolution layouts, fusions, constant
folding) every time a session is created: about 13 s for an SD 1.5 UNet on 2 cores. The rewritten graph can be
saved and loaded back with optimisation off (1.4 s, identical outputs and speed; measured, see
benchmarks/NOTES.md). It holds optimisations specific to the CPU it was made on, so it is cached per machine,
keyed by the ONNX Runtime version, the CPU's model and flags and the source model file, never shipped. The
cached copy repeats the model's weights on disk, so the cache is opt-in (``optimized_cache=True``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort

from sdengine.cache import cache_dir
from sdengine.errors import CorruptModelError

DATA_NAME = "model.onnx.data"


def _cpu_identity() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def cache_key(source: Path) -> str:
    """What the optimised graph depends on: ONNX Runtime, this CPU, and the exact source files."""
    digest = hashlib.sha256()
    digest.update(ort.__version__.encode())
    digest.update(_cpu_identity().encode())
    for path in sorted(source.parent.iterdir()):
        if path.is_file() and path.suffix != ".json":
            stat = path.stat()
            digest.update(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


def optimized_model(
    source: Path,
    make_options: Callable[[], ort.SessionOptions],
    open_fn: Callable[[str, ort.SessionOptions], ort.InferenceSession],
    root: Path | None = None,
) -> ort.InferenceSession:
    """A CPU session for ``source``: from the cached optimised graph if there is one, else made and cached."""
    target = (root or cache_dir() / "ort-optimized") / cache_key(source) / source.parent.name
    model = target / "model.onnx"
    if model.is_file():
        options = make_options()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return open_fn(str(model), options)
        except CorruptModelError:  # a damaged cache entry is remade, never fatal
            shutil.rmtree(target, ignore_errors=True)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    options = make_options()
    options.optimized_model_filepath = str(partial / "model.onnx")
    prefix = "session.optimized_model_external_initializers_"
    options.add_session_config_entry(prefix + "file_name", DATA_NAME)
    options.add_session_config_entry(prefix + "min_size_in_bytes", "1024")
    try:
        session = open_fn(str(source), options)
        with contextlib.suppress(OSError):  # another process cached it first: keep theirs
            os.replace(partial, target)  # whole or nothing: a crashed save leaves only a .partial folder
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return session
