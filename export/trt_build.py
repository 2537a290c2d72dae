"""Build TensorRT engines from an exported ONNX directory: ``sdengine build ONNX_DIR --output ENGINE_DIR``.

Everything here but :func:`build_serialized_engine` is plain Python: argument checks, optimization profiles
from the model specs, content keys, the reuse-or-rebuild decision and the engine manifest
(:mod:`sdengine.engine_keys`). :func:`build_serialized_engine` is the one function that calls TensorRT: parse
the ONNX file into a strongly typed network, add the optimization profile, the builder optimization level,
the timing cache and a progress monitor, ``build_serialized_network``, write the plan and the timing cache.
:func:`build_engines` takes any function of the same signature (``builder=``), which is how the tests run
the whole build logic on a CPU.

The TensorRT and cuda-python calls are written against their documented Python APIs (TensorRT 10 and 11,
cuda-python's ``cuda.bindings.runtime``) and have not been run here: neither library can be installed on the
machines this code was developed on. Both are optional and imported only inside the functions that need
them; without them those functions raise a one-line :class:`BackendUnavailableError`.

Precision is whatever the ONNX tensors are (an fp16 export gives an fp16 engine): networks are strongly
typed (TensorRT 11 always; TensorRT 10 through the ``STRONGLY_TYPED`` creation flag) and no fp16/tf32
builder flag is ever set.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Protocol

from sdengine.engine_keys import (
    ENGINE_MANIFEST_NAME,
    MAX_OPTIMIZATION_LEVEL,
    TIMING_CACHE_NAME,
    BuildEnv,
    EngineEntry,
    EngineManifest,
    Profile,
    ProfileRequest,
    Shape,
    check_components,
    engine_file_name,
    engine_key,
    engine_profiles,
    onnx_digest,
    profile_to_json,
)
from sdengine.errors import (
    BackendUnavailableError,
    CorruptModelError,
    InvalidArgumentError,
    ModelDirectoryError,
    SDEngineError,
)
from sdengine.manifest import Manifest
from sdengine.model_dir import open_onnx_dir
from sdengine.model_specs import REQUIRED_COMPONENTS

TRT_MISSING = "TensorRT is not installed: pip install 'sdengine[trt]' on a machine with an NVIDIA GPU"
CUDA_MISSING = "cuda-python is not installed: pip install 'sdengine[trt]' on a machine with an NVIDIA GPU"
DEFAULT_OPTIMIZATION_LEVEL = 3
UNKNOWN_PRECISION = "unknown"


# --- optional dependencies, imported lazily


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or a one-line BackendUnavailableError when it is missing or cannot load."""
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailableError(TRT_MISSING) from None
    except OSError as exc:  # the wheel is there but its CUDA/TensorRT libraries are not
        raise BackendUnavailableError(f"TensorRT is installed but cannot load: {exc}") from None
    return tensorrt


def trt_major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        raise BackendUnavailableError(f"cannot read the TensorRT version {version!r}") from None


def compute_capability(device: int = 0) -> str:
    """Compute capability ("major.minor") of CUDA device ``device``, read with cuda-python."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        raise BackendUnavailableError(CUDA_MISSING) from None
    attrs = cudart.cudaDeviceAttr
    numbers = []
    for attr in (attrs.cudaDevAttrComputeCapabilityMajor, attrs.cudaDevAttrComputeCapabilityMinor):
        err, value = cudart.cudaDeviceGetAttribute(attr, device)
        if err != cudart.cudaError_t.cudaSuccess:
            name = getattr(err, "name", str(err))
            raise BackendUnavailableError(f"no usable NVIDIA GPU (device {device}): CUDA reports {name}")
        numbers.append(int(value))
    return f"{numbers[0]}.{numbers[1]}"


def detect_build_env() -> BuildEnv:
    """This machine's TensorRT version and GPU compute capability (needs both optional libraries)."""
    trt = import_tensorrt()
    return BuildEnv(trt_version=str(trt.__version__), compute_capability=compute_capability())


# --- progress


class PhaseBars:
    """One tqdm bar on stderr per active TensorRT build phase, nested phases below their parent.

    Driven by the :class:`IProgressMonitor` callbacks (from several TensorRT threads, hence the lock). A
    Ctrl-C inside a callback cancels the build through ``step_complete`` returning False.
    """

    def __init__(self, label: str, file: Any = None) -> None:
        self.label = label
        self.file = file if file is not None else sys.stderr
        self.cancelled = False
        self._bars: dict[str, Any] = {}
        self._depth: dict[str, int] = {}
        self._lock = threading.Lock()

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        from tqdm import tqdm

        try:
            with self._lock:
                depth = self._depth.get(parent_phase, -1) + 1 if parent_phase else 0
                self._depth[phase_name] = depth
                self._bars[phase_name] = tqdm(
                    total=num_steps,
                    desc=f"{self.label}: {phase_name}",
                    position=depth,
                    leave=False,
                    file=self.file,
                    unit="step",
                )
        except KeyboardInterrupt:
            self.cancelled = True

    def step_complete(self, phase_name: str, step: int) -> bool:
        try:
            with self._lock:
                bar = self._bars.get(phase_name)
                if bar is not None and step + 1 > bar.n:
                    bar.update(step + 1 - bar.n)
        except KeyboardInterrupt:
            self.cancelled = True
        return not self.cancelled

    def phase_finish(self, phase_name: str) -> None:
        try:
            with self._lock:
                bar = self._bars.pop(phase_name, None)
                self._depth.pop(phase_name, None)
                if bar is not None:
                    bar.close()
        except KeyboardInterrupt:
            self.cancelled = True

    def close(self) -> None:
        with self._lock:
            for bar in self._bars.values():
                bar.close()
            self._bars.clear()
            self._depth.clear()


def _progress_monitor(trt: Any, label: str) -> Any:
    """An ``IProgressMonitor`` driving :class:`PhaseBars`, or None where this TensorRT has no such class."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class _Monitor(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)
            self.bars = PhaseBars(label)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self.bars.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return self.bars.step_complete(phase_name, step)

        def phase_finish(self, phase_name: str) -> None:
            self.bars.phase_finish(phase_name)

    return _Monitor()


# --- the TensorRT call


class EngineBuilder(Protocol):
    """Builds one engine: ``onnx_path`` with ``profile`` -> a serialized plan written to ``plan_path``."""

    def __call__(
        self,
        onnx_path: Path,
        plan_path: Path,
        profile: Profile,
        *,
        optimization_level: int,
        timing_cache: Path,
        progress: bool,
    ) -> None: ...


def check_network_inputs(onnx_path: Path, inputs: Mapping[str, Shape], profile: Profile) -> None:
    """The parsed network's inputs (name -> shape, -1 for run-time sizes) must be what the profile covers."""
    missing = [name for name in profile if name not in inputs]
    if missing:
        raise CorruptModelError(
            f"{onnx_path} has no input {', '.join(missing)}; re-export it: sdengine export"
        )
    for name, shape in inputs.items():
        if name in profile:
            if len(shape) != len(profile[name][0]):
                raise CorruptModelError(
                    f"{onnx_path} input {name} has rank {len(shape)}, sdengine expects "
                    f"{len(profile[name][0])}; re-export it: sdengine export"
                )
        elif any(d < 0 for d in shape):
            raise CorruptModelError(
                f"{onnx_path} input {name} has run-time dimensions {tuple(shape)} that sdengine's spec "
                "does not describe; re-export it: sdengine export"
            )


def _write_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def build_serialized_engine(
    onnx_path: Path,
    plan_path: Path,
    profile: Profile,
    *,
    optimization_level: int,
    timing_cache: Path,
    progress: bool,
) -> None:
    """Build one TensorRT engine from ``onnx_path`` and write its plan to ``plan_path``.

    ``timing_cache`` is read if present (a cache from another TensorRT or GPU is replaced by a new one) and
    written back after a successful build. Written against the documented TensorRT 10/11 Python API; not
    run here (see the module docstring).
    """
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 11 networks are always strongly typed (the flag is deprecated and ignored there).
    flags = (
        0 if trt_major(trt.__version__) >= 11 else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    )
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
        raise CorruptModelError(f"TensorRT cannot parse {onnx_path}: {errors[:300] or 'unknown error'}")
    inputs = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        inputs[tensor.name] = tuple(tensor.shape)
    check_network_inputs(onnx_path, inputs, profile)

    config = builder.create_builder_config()
    config.builder_optimization_level = optimization_level
    if profile:  # a network with only static shapes (the step model) needs none
        opt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.items():
            opt_profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(opt_profile)

    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    if cache is None or not config.set_timing_cache(cache, False):
        # Unreadable, or made by another TensorRT version or GPU: start afresh (overwritten below).
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)

    monitor = _progress_monitor(trt, onnx_path.parent.name) if progress else None
    if monitor is not None:
        config.progress_monitor = monitor
    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        if monitor is not None:
            monitor.bars.close()
    if monitor is not None and monitor.bars.cancelled:
        raise KeyboardInterrupt
    if serialized is None:
        raise SDEngineError(f"TensorRT could not build an engine from {onnx_path} (see its log above)")
    _write_atomic(plan_path, serialized)
    _write_atomic(timing_cache, cache.serialize())


# --- the build


def build_engines(
    onnx_dir: str | os.PathLike,
    engine_dir: str | os.PathLike,
    *,
    batch: int = 1,
    height: int = 512,
    width: int = 512,
    dynamic: bool = False,
    min_batch: int | None = None,
    max_batch: int | None = None,
    min_height: int | None = None,
    max_height: int | None = None,
    min_width: int | None = None,
    max_width: int | None = None,
    cfg: bool = True,
    parts: int = 1,
    optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL,
    components: Iterable[str] | None = None,
    progress: bool | None = None,
    env: BuildEnv | None = None,
    builder: EngineBuilder | None = None,
    log: Callable[[str], None] | None = None,
) -> EngineManifest:
    """Build (or reuse) one TensorRT engine per component of ``onnx_dir`` into ``engine_dir``.

    Static profiles by default (exactly ``batch`` x ``height`` x ``width``); ``dynamic`` spans the min/max
    bounds. ``cfg`` sizes the text encoder and UNet for classifier-free guidance (twice the batch; never
    for a UNet that takes the guidance scale as an input, :mod:`sdengine.guidance_embedding`), ``parts``
    the UNet for composable prompts of up to that many parts (up to 1 + ``parts`` times the batch). An engine
    whose content key is unchanged is reused; a changed one is rebuilt and its old plan file removed. The
    engine manifest is rewritten after each engine, and the timing cache in ``engine_dir`` is shared by all
    builds. ``progress`` (default: when stderr is a terminal) shows TensorRT's build phases; ``env``
    (default: this machine's) and ``builder`` (default: :func:`build_serialized_engine`) exist for tests.
    """
    request = ProfileRequest(
        batch=batch,
        height=height,
        width=width,
        dynamic=dynamic,
        min_batch=min_batch,
        max_batch=max_batch,
        min_height=min_height,
        max_height=max_height,
        min_width=min_width,
        max_width=max_width,
        cfg=cfg,
        parts=parts,
    )
    if not 0 <= optimization_level <= MAX_OPTIMIZATION_LEVEL:
        raise InvalidArgumentError(
            f"optimization level must be 0 to {MAX_OPTIMIZATION_LEVEL}, got {optimization_level}"
        )
    model_dir = open_onnx_dir(onnx_dir)
    if model_dir.arch.guidance_embedding:  # one copy of the batch at any guidance scale
        request = replace(request, cfg=False)
    names = check_components(model_dir.arch.required_components() if components is None else components)
    profiles = {name: engine_profiles(model_dir.arch, name, request) for name in names}
    out = Path(engine_dir)
    if out.exists() and not out.is_dir():
        raise ModelDirectoryError(f"engine directory {out} is not a directory")
    if out.resolve() == model_dir.root.resolve():
        raise InvalidArgumentError("--output must differ from the ONNX directory")
    onnx_paths = {name: model_dir.onnx_path(name) for name in names}
    digests = {name: onnx_digest(path) for name, path in onnx_paths.items()}  # fails early on a missing model
    export = Manifest.read(model_dir.root)
    if export and export.target == "cuda":
        raise InvalidArgumentError(
            f"{model_dir.root}'s UNet is fused for ONNX Runtime's CUDA provider (export --target cuda), "
            "which TensorRT cannot parse: build engines from a portable export"
        )
    precision = export.precision if export else UNKNOWN_PRECISION
    env = env or detect_build_env()
    builder = builder or build_serialized_engine
    show = sys.stderr.isatty() if progress is None else progress
    say = log or (lambda message: None)

    out.mkdir(parents=True, exist_ok=True)
    try:
        previous = EngineManifest.read(out)
    except CorruptModelError:
        say(f"ignoring the unreadable {ENGINE_MANIFEST_NAME} in {out}; rebuilding every engine")
        previous = None
    engines = dict(previous.engines) if previous else {}
    manifest = EngineManifest(onnx_dir=str(model_dir.root.resolve()), engines=engines)
    cache_path = out / TIMING_CACHE_NAME
    for name in names:
        key = engine_key(
            component=name,
            onnx_sha256=digests[name],
            profile=profiles[name],
            precision=precision,
            optimization_level=optimization_level,
            trt_version=env.trt_version,
            compute_capability=env.compute_capability,
        )
        file_name = engine_file_name(name, key)
        old = engines.get(name)
        if old is not None and old.key == key and _plan_intact(out / old.file, old.size_bytes):
            say(f"{name}: unchanged, reusing {old.file}")
            continue
        plan = out / file_name
        tmp = plan.with_name(plan.name + ".partial")
        start = time.perf_counter()
        try:
            builder(
                onnx_paths[name],
                tmp,
                profiles[name],
                optimization_level=optimization_level,
                timing_cache=cache_path,
                progress=show,
            )
            if not tmp.is_file():
                raise SDEngineError(f"the engine builder wrote no plan for {name}")
            os.replace(tmp, plan)
        finally:
            tmp.unlink(missing_ok=True)
        seconds = round(time.perf_counter() - start, 3)
        engines[name] = EngineEntry(
            component=name,
            file=file_name,
            key=key,
            onnx_sha256=digests[name],
            precision=precision,
            profile=profile_to_json(profiles[name]),
            optimization_level=optimization_level,
            trt_version=env.trt_version,
            compute_capability=env.compute_capability,
            request=asdict(request),
            size_bytes=plan.stat().st_size,
            build_seconds=seconds,
        )
        if old is not None and old.file != file_name:
            (out / old.file).unlink(missing_ok=True)
        manifest.write(out)
        say(f"{name}: built {file_name} in {seconds:.1f} s")
    manifest.write(out)
    return manifest


def _plan_intact(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


# --- command line


def add_build_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``build`` to the ``sdengine`` sub-command parsers; returns the new parser."""
    b = subparsers.add_parser("build", help="build TensorRT engines from an ONNX directory (NVIDIA GPU)")
    b.add_argument("onnx_dir", help="an exported ONNX directory (sdengine export)")
    b.add_argument("--output", required=True, help="ENGINE_DIR: engines, their manifest and the timing cache")
    b.add_argument("--batch", type=int, default=1, help="images per prompt batch (default 1)")
    b.add_argument("--height", type=int, default=None, help="default: the model's native size")
    b.add_argument("--width", type=int, default=None, help="default: the model's native size")
    b.add_argument(
        "--dynamic", action="store_true", help="build for a range of sizes (the --min/--max flags)"
    )
    for bound in ("min", "max"):
        for dim in ("batch", "height", "width"):
            b.add_argument(f"--{bound}-{dim}", type=int, default=None, help=f"{bound} {dim} with --dynamic")
    b.add_argument(
        "--optimization-level",
        type=int,
        default=DEFAULT_OPTIMIZATION_LEVEL,
        help=f"TensorRT builder optimization level, 0-{MAX_OPTIMIZATION_LEVEL} (default 3)",
    )
    b.add_argument(
        "--components",
        default=None,
        help=f"comma-separated subset (default: {','.join(REQUIRED_COMPONENTS)}; SDXL: text_encoder_2 too)",
    )
    b.add_argument(
        "--no-cfg",
        action="store_true",
        help="size the text encoder and UNet for guidance 1 (no doubled batch)",
    )
    b.add_argument(
        "--parts",
        type=int,
        default=1,
        help="room in the UNet for composable prompts (the web UI's AND) of up to this many parts: "
        "batches of up to (1 + PARTS) x --batch (default 1: none)",
    )
    b.set_defaults(func=cmd_build)
    return b


def cmd_build(args: argparse.Namespace) -> int:
    """Run ``sdengine build``: errors propagate as SDEngineError for the CLI to print on one line."""
    height, width = args.height, args.width
    if height is None or width is None:
        native = open_onnx_dir(args.onnx_dir).default_image_size
        height = native if height is None else height
        width = native if width is None else width
    components = [c for c in args.components.split(",") if c] if args.components else None
    manifest = build_engines(
        args.onnx_dir,
        args.output,
        batch=args.batch,
        height=height,
        width=width,
        dynamic=args.dynamic,
        min_batch=args.min_batch,
        max_batch=args.max_batch,
        min_height=args.min_height,
        max_height=args.max_height,
        min_width=args.min_width,
        max_width=args.max_width,
        cfg=not args.no_cfg,
        parts=args.parts,
        optimization_level=args.optimization_level,
        components=components,
        log=print,
    )
    print(f"wrote {Path(args.output) / ENGINE_MANIFEST_NAME} ({len(manifest.engines)} engines)")
    return 0


__all__ = [
    "TRT_MISSING",
    "EngineBuilder",
    "PhaseBars",
    "add_build_parser",
    "build_engines",
    "build_serialized_engine",
    "check_network_inputs",
    "cmd_build",
    "compute_capability",
    "detect_build_env",
    "import_tensorrt",
]
