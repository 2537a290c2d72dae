"""TensorRT engine bookkeeping that needs no GPU: profiles, content keys, the engine manifest, load checks.

An engine is only valid for the exact inputs it was built from, so each one gets a *content key*: a sha256
over the ONNX bytes (with any external-data files), the optimization profile, the precision, the build flags,
the TensorRT version and the GPU's compute capability. The engine file is named after its key
(``unet.<key16>.plan``) and the engine manifest (``sdengine_engines.json`` in ENGINE_DIR) records every input
of the key, so a build can tell "unchanged, reuse" from "changed, rebuild", and a loader can tell exactly why
an engine is unusable (stale ONNX, other TensorRT, other GPU) instead of silently running it.

Profiles derive from :mod:`sdengine.model_specs`: each symbolic dimension of an input is looked up in
``Architecture.sizes`` at the minimum, optimum and maximum sizes, so no shape is restated here. With
classifier-free guidance the text encoder and the UNet see the negative and positive prompts in one batch,
so their batch dimension is twice the image batch; composable prompts (``parts`` > 1) run the UNet on one
copy of the batch per part beside the negative one, so its batch range reaches (1 + parts) times the batch.

Nothing in this module imports TensorRT (the runtime reads the manifest too); :mod:`export.trt_build` holds
the one function that builds engines.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sdengine.errors import (
    BackendUnavailableError,
    CorruptModelError,
    InvalidArgumentError,
    ModelDirectoryError,
    UnsupportedConfigError,
)
from sdengine.manifest import file_sha256
from sdengine.model_specs import (
    ENGINE_COMPONENTS,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    UNET,
    UNET_SHALLOW,
    Architecture,
)
from sdengine.step_graph import unet_copies

Shape = tuple[int, ...]
#: input name -> (min shape, opt shape, max shape); only inputs with a run-time-sized dimension appear.
Profile = dict[str, tuple[Shape, Shape, Shape]]

ENGINE_MANIFEST_NAME = "sdengine_engines.json"
ENGINE_MANIFEST_FORMAT = 1
TIMING_CACHE_NAME = "timing.cache"
ENGINE_SUFFIX = ".plan"
KEY_PREFIX_CHARS = 16
#: Bumped whenever the meaning of a key changes, so every older engine reads as changed and is rebuilt.
KEY_FORMAT = 1
#: Build flags that are always on. Precision comes from the ONNX tensor types (strongly typed network).
FIXED_BUILD_FLAGS: dict[str, Any] = {"strongly_typed": True}
#: Components whose batch is doubled under classifier-free guidance (negative and positive prompts together).
CFG_COMPONENTS: tuple[str, ...] = (TEXT_ENCODER, TEXT_ENCODER_2, UNET, UNET_SHALLOW)
MAX_OPTIMIZATION_LEVEL = 5
# Range a --dynamic profile covers when the bounds are not given (widened to include the optimum).
DYNAMIC_DEFAULTS = {"min_batch": 1, "max_batch": 4, "min_size": 256, "max_size": 1024}


@dataclass(frozen=True)
class BuildEnv:
    """What an engine is tied to besides its inputs: the TensorRT version and the GPU's compute capability."""

    trt_version: str
    compute_capability: str  # "major.minor", e.g. "8.9"


@dataclass(frozen=True)
class ProfileRequest:
    """The sizes an engine set is built for: the optimum, and for dynamic engines the range around it."""

    batch: int = 1
    height: int = 512
    width: int = 512
    dynamic: bool = False
    min_batch: int | None = None
    max_batch: int | None = None
    min_height: int | None = None
    max_height: int | None = None
    min_width: int | None = None
    max_width: int | None = None
    cfg: bool = True
    #: the most parts of a composable prompt (the web UI's ``AND``) the UNet engine takes; 1: none
    parts: int = 1

    def bounds(self) -> dict[str, tuple[int, int, int]]:
        """(min, opt, max) of batch, height and width; raises InvalidArgumentError for an invalid request."""
        if self.parts < 1:
            raise InvalidArgumentError(f"--parts must be at least 1, got {self.parts}")
        given = {k: getattr(self, k) for k in ("min_batch", "max_batch", "min_height", "max_height")}
        given.update(min_width=self.min_width, max_width=self.max_width)
        if not self.dynamic:
            extra = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is not None]
            if extra:
                raise InvalidArgumentError(f"{', '.join(extra)} only apply with --dynamic")
            return {
                d: (v, v, v)
                for d, v in (("batch", self.batch), ("height", self.height), ("width", self.width))
            }
        out = {}
        for dim, opt in (("batch", self.batch), ("height", self.height), ("width", self.width)):
            lo_default = DYNAMIC_DEFAULTS["min_batch" if dim == "batch" else "min_size"]
            hi_default = DYNAMIC_DEFAULTS["max_batch" if dim == "batch" else "max_size"]
            lo, hi = given[f"min_{dim}"], given[f"max_{dim}"]
            lo = min(lo_default, opt) if lo is None else lo
            hi = max(hi_default, opt) if hi is None else hi
            if not lo <= opt <= hi:
                raise InvalidArgumentError(
                    f"need min <= opt <= max for {dim}, got {lo} <= {opt} <= {hi}; "
                    f"adjust --min-{dim}/--{dim}/--max-{dim}"
                )
            out[dim] = (lo, opt, hi)
        return out

    def cli_args(self) -> list[str]:
        """The ``sdengine build`` flags that reproduce this request."""
        args = ["--batch", str(self.batch), "--height", str(self.height), "--width", str(self.width)]
        if self.dynamic:
            args.append("--dynamic")
            for name in ("min_batch", "max_batch", "min_height", "max_height", "min_width", "max_width"):
                if getattr(self, name) is not None:
                    args += [f"--{name.replace('_', '-')}", str(getattr(self, name))]
        if not self.cfg:
            args.append("--no-cfg")
        if self.parts != 1:
            args += ["--parts", str(self.parts)]
        return args

    def unet_copies(self) -> tuple[int, int]:
        """The fewest and the most copies of the image batch a UNet call carries: 2 with guidance (negative
        and positive prompts), 1 without; up to 1 + ``parts`` for composable prompts, whose negative side
        runs even without guidance (see :func:`sdengine.step_graph.unet_copies`)."""
        fewest = 2 if self.cfg else 1
        return fewest, unet_copies(True, self.parts) if self.parts > 1 else fewest


def _check_sizes(arch: Architecture, bounds: Mapping[str, tuple[int, int, int]]) -> None:
    """Batch at least 1, sizes positive multiples of the VAE factor; the optimum is checked first."""
    order = ((1, ""), (0, "min "), (2, "max "))
    for index, prefix in order:
        if bounds["batch"][index] < 1:
            raise InvalidArgumentError(f"{prefix}batch must be at least 1, got {bounds['batch'][index]}")
    step = arch.vae_scale_factor
    for dim in ("height", "width"):
        for index, prefix in order:
            size = bounds[dim][index]
            if size < step or size % step:
                raise InvalidArgumentError(f"{prefix}{dim} must be a positive multiple of {step}, got {size}")


def engine_profiles(arch: Architecture, component: str, request: ProfileRequest | None = None) -> Profile:
    """The optimization profile of ``component``: min/opt/max shape of each input with run-time sizes.

    Shapes come from the component's spec at ``arch.sizes(...)`` of the request's min/opt/max; the batch is
    doubled for the text encoder and the UNet when ``request.cfg`` (classifier-free guidance), and the
    UNet's maximum reaches ``1 + request.parts`` copies of the largest batch (composable prompts; the text
    encoder runs any number of texts in batches its profile takes, so it needs no more). Inputs whose
    shape is fixed by the model (the UNet's scalar timestep) need no profile and are left out.
    """
    request = request or ProfileRequest()
    specs = arch.specs()
    known = arch.components()  # the safety checker has a spec, but runs with ONNX Runtime
    if component not in known:
        raise InvalidArgumentError(f"unknown component {component!r}; choose from {', '.join(known)}")
    bounds = request.bounds()
    _check_sizes(arch, bounds)
    most = request.unet_copies()[1]
    factor = 2 if request.cfg and component in CFG_COMPONENTS else 1
    factors = (factor, factor, most if component in (UNET, UNET_SHALLOW) else factor)
    sizes = [
        arch.sizes(factors[i] * bounds["batch"][i], bounds["height"][i], bounds["width"][i]) for i in range(3)
    ]
    profile: Profile = {}
    for tensor in specs[component].inputs:
        if tensor.dynamic_axes:
            lo, opt, hi = (tensor.shape(s) for s in sizes)
            profile[tensor.name] = (lo, opt, hi)
    return profile


def batch_runs(rows: int, low: int, high: int) -> list[tuple[int, int, int]]:
    """How ``rows`` rows (a batch of texts, say) run on an engine whose batch spans [``low``, ``high``]:
    ``(start, stop, size)`` for each run, at most ``high`` rows, and each short one padded up to ``size`` =
    ``low`` rows (the text encoder of a static engine set takes exactly its batch: with prompt edits, weights
    or composable prompts, there are other numbers of texts to encode)."""
    if not 1 <= low <= high:
        raise ValueError(f"need 1 <= low <= high, got {low}, {high}")
    return [
        (start, min(start + high, rows), max(min(high, rows - start), low)) for start in range(0, rows, high)
    ]


def profile_to_json(profile: Profile) -> dict[str, list[list[int]]]:
    return {name: [list(shape) for shape in shapes] for name, shapes in profile.items()}


def profile_from_json(data: Mapping[str, Any]) -> Profile:
    out: Profile = {}
    for name, shapes in data.items():
        lo, opt, hi = (tuple(int(d) for d in shape) for shape in shapes)
        out[str(name)] = (lo, opt, hi)
    return out


def model_files(onnx_path: Path) -> list[Path]:
    """``onnx_path`` and the external-data files beside it: every other file in its folder except JSON
    configs (``model.onnx.data`` of our exports, ``model.onnx_data`` or per-tensor files of others)."""
    if not onnx_path.is_file():
        raise ModelDirectoryError(f"missing file {onnx_path}")
    others = sorted(
        p for p in onnx_path.parent.iterdir() if p.is_file() and p != onnx_path and p.suffix != ".json"
    )
    return [onnx_path, *others]


def onnx_digest(onnx_path: str | os.PathLike) -> str:
    """sha256 identifying an ONNX model with its external data.

    For a model without external data this is the sha256 of the ``.onnx`` file itself (as the export manifest
    records it); otherwise a sha256 over each file's name and sha256.
    """
    files = model_files(Path(onnx_path))
    if len(files) == 1:
        return file_sha256(files[0])
    lines = "".join(f"{p.name}\t{file_sha256(p)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def engine_key(
    *,
    component: str,
    onnx_sha256: str,
    profile: Profile,
    precision: str,
    optimization_level: int,
    trt_version: str,
    compute_capability: str,
) -> str:
    """The content key (sha256 hex) of an engine: equal inputs give equal keys, any change a new key."""
    payload = {
        "key_format": KEY_FORMAT,
        "component": component,
        "onnx_sha256": onnx_sha256,
        "profile": profile_to_json(profile),
        "precision": precision,
        "build_flags": {**FIXED_BUILD_FLAGS, "optimization_level": int(optimization_level)},
        "trt_version": trt_version,
        "compute_capability": compute_capability,
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def engine_file_name(component: str, key: str) -> str:
    return f"{component}.{key[:KEY_PREFIX_CHARS]}{ENGINE_SUFFIX}"


@dataclass(frozen=True)
class EngineEntry:
    """One built engine and every input of its key."""

    component: str
    file: str
    key: str
    onnx_sha256: str
    precision: str
    profile: dict[str, list[list[int]]]
    optimization_level: int
    trt_version: str
    compute_capability: str
    request: dict[str, Any]
    size_bytes: int
    build_seconds: float

    @property
    def shapes(self) -> Profile:
        return profile_from_json(self.profile)

    @property
    def profile_request(self) -> ProfileRequest:
        return ProfileRequest(**self.request)

    def expected_key(self) -> str:
        return engine_key(
            component=self.component,
            onnx_sha256=self.onnx_sha256,
            profile=self.shapes,
            precision=self.precision,
            optimization_level=self.optimization_level,
            trt_version=self.trt_version,
            compute_capability=self.compute_capability,
        )


@dataclass(frozen=True)
class EngineManifest:
    """What ENGINE_DIR holds: one entry per component, built from the ONNX directory ``onnx_dir``."""

    onnx_dir: str
    engines: dict[str, EngineEntry] = field(default_factory=dict)
    timing_cache: str = TIMING_CACHE_NAME
    format: int = ENGINE_MANIFEST_FORMAT

    def write(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / ENGINE_MANIFEST_NAME
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, directory: str | os.PathLike) -> EngineManifest | None:
        """The manifest in ``directory``; None when there is none; CorruptModelError when unreadable."""
        path = Path(directory) / ENGINE_MANIFEST_NAME
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            if data.get("format") != ENGINE_MANIFEST_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {ENGINE_MANIFEST_FORMAT}")
            engines = {k: EngineEntry(**v) for k, v in data.pop("engines").items()}
            for entry in engines.values():  # fail here, not later, on a malformed entry
                entry.profile_request.bounds()
                entry.shapes  # noqa: B018
            return cls(engines=engines, **data)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CorruptModelError(
                f"{path} is not a valid sdengine engine manifest ({reason}); "
                f"rebuild: sdengine build ONNX_DIR --output {Path(directory)}"
            ) from None


def rebuild_command(
    onnx_dir: str | os.PathLike,
    engine_dir: str | os.PathLike,
    entry: EngineEntry,
    request: ProfileRequest | None = None,
    *,
    every_component: bool = False,
) -> str:
    """The ``sdengine build`` command line that rebuilds ``entry`` with the same settings and its profile, or
    ``request``'s; ``every_component``: the whole engine set, not just ``entry``'s component."""
    components = [] if every_component else ["--components", entry.component]
    args = [
        "sdengine build",
        str(onnx_dir),
        "--output",
        str(engine_dir),
        *components,
        *(request or entry.profile_request).cli_args(),
        "--optimization-level",
        str(entry.optimization_level),
    ]
    return " ".join(args)


def covering_request(
    request: ProfileRequest, *, batch: int, height: int, width: int, parts: int, copies: int = 2
) -> ProfileRequest:
    """``request`` grown just enough to take ``batch`` images of ``height`` x ``width``, ``copies`` of them a
    UNet call, with composable prompts of ``parts`` parts: a static one is moved to those sizes, a dynamic
    one's bounds widened; guidance (two copies) turns ``cfg`` on, and one copy a call (guidance 1) off: an
    engine's UNet takes either the doubled batch or the single one."""
    parts, cfg = max(request.parts, parts), copies != 1 and (request.cfg or copies == 2)
    if not request.dynamic:
        return replace(request, batch=batch, height=height, width=width, parts=parts, cfg=cfg)
    bounds, wider = request.bounds(), {"parts": parts, "cfg": cfg}
    for dim, value in (("batch", batch), ("height", height), ("width", width)):
        lo, _, hi = bounds[dim]
        if value < lo:
            wider[f"min_{dim}"] = value
        if value > hi:
            wider[f"max_{dim}"] = value
    return replace(request, **wider)


def check_unet_fits(
    entry: EngineEntry,
    engine_dir: str | os.PathLike,
    onnx_dir: str | os.PathLike,
    arch: Architecture,
    *,
    batch: int,
    height: int,
    width: int,
    copies: int,
    parts: int,
) -> None:
    """Refuse, with the build command that fits, a run whose UNet calls fall outside the UNet engine's
    profile (TensorRT would refuse the shape mid-run): ``batch`` images of ``height`` x ``width`` pixels,
    ``copies`` of them per call (guidance; 1 + ``parts`` for a composable prompt of ``parts`` parts, or
    ``parts`` alone without the negative side)."""
    lo, _, hi = entry.shapes["sample"]
    factor = arch.vae_scale_factor
    rows, latent = copies * batch, (height // factor, width // factor)
    if lo[0] <= rows <= hi[0] and all(lo[i] <= n <= hi[i] for i, n in zip((2, 3), latent, strict=True)):
        return
    request = entry.profile_request
    wanted = covering_request(request, batch=batch, height=height, width=width, parts=parts, copies=copies)
    only_parts = replace(wanted, parts=request.parts) == request
    why = f"{batch} image(s) x {copies} copies"
    if parts > 1:
        why += f" ({'the negative prompt and ' if copies > parts else ''}{parts} parts)"
    takes = f"{lo[0]}-{hi[0]} rows of {lo[2] * factor}x{lo[3] * factor} to {hi[2] * factor}x{hi[3] * factor}"
    command = rebuild_command(onnx_dir, engine_dir, entry, wanted, every_component=not only_parts)
    if request.cfg and not wanted.cfg:  # a run without guidance on engines built for it
        command += " (engines for guidance 1 only; or run with guidance > 1)"
    raise UnsupportedConfigError(
        f"the UNet engine in {engine_dir} takes {takes} pixels a call; this run needs {rows} rows "
        f"({why}) of {height}x{width}; rebuild: {command}"
    )


def check_engine(
    engine_dir: str | os.PathLike,
    component: str,
    onnx_dir: str | os.PathLike,
    *,
    env: BuildEnv | None = None,
) -> EngineEntry:
    """The manifest entry of ``component``'s engine in ``engine_dir``, checked usable on this machine.

    Refuses, each with a one-line error naming what differs and the command that fixes it: a missing or
    corrupt manifest, a missing or truncated engine file, an engine whose ONNX model changed since the build
    (stale), and one built by another TensorRT version or for another GPU compute capability (foreign).
    ``env`` defaults to this machine's (which needs TensorRT and cuda-python).
    """
    root = Path(engine_dir)
    fresh = f"sdengine build {onnx_dir} --output {root}"
    if not root.is_dir():
        raise ModelDirectoryError(f"engine directory {root} does not exist; build engines first: {fresh}")
    manifest = EngineManifest.read(root)
    if manifest is None:
        raise ModelDirectoryError(
            f"{root} has no engine manifest ({ENGINE_MANIFEST_NAME}); build engines first: {fresh}"
        )
    entry = manifest.engines.get(component)
    if entry is None:
        raise ModelDirectoryError(
            f"{root} has no {component} engine; build it: {fresh} --components {component}"
        )
    fix = rebuild_command(onnx_dir, root, entry)
    path = root / entry.file
    if entry.expected_key() != entry.key or entry.file != engine_file_name(component, entry.key):
        raise CorruptModelError(
            f"the {component} entry of {root / ENGINE_MANIFEST_NAME} does not match its key; rebuild: {fix}"
        )
    if not path.is_file():
        raise ModelDirectoryError(f"engine file {path} is missing; rebuild: {fix}")
    if path.stat().st_size != entry.size_bytes:
        raise CorruptModelError(
            f"engine file {path} has {path.stat().st_size} bytes, the manifest says {entry.size_bytes} "
            f"(truncated or replaced); rebuild: {fix}"
        )
    if env is None:
        from export.trt_build import detect_build_env

        env = detect_build_env()
    if entry.trt_version != env.trt_version:
        raise BackendUnavailableError(
            f"the {component} engine in {root} was built with TensorRT {entry.trt_version}, "
            f"this machine has TensorRT {env.trt_version}; rebuild here: {fix}"
        )
    if entry.compute_capability != env.compute_capability:
        raise BackendUnavailableError(
            f"the {component} engine in {root} was built for GPU compute capability "
            f"{entry.compute_capability}, this GPU has {env.compute_capability}; rebuild here: {fix}"
        )
    onnx_path = Path(onnx_dir) / component / "model.onnx"
    current = onnx_digest(onnx_path)
    if current != entry.onnx_sha256:
        raise ModelDirectoryError(
            f"the {component} engine in {root} is stale: {onnx_path} changed since it was built "
            f"(sha256 {entry.onnx_sha256[:12]} then, {current[:12]} now); rebuild: {fix}"
        )
    return entry


def resolve_engine(
    engine_dir: str | os.PathLike,
    component: str,
    onnx_dir: str | os.PathLike,
    *,
    env: BuildEnv | None = None,
) -> Path:
    """The path of ``component``'s engine, after :func:`check_engine` found it usable here."""
    entry = check_engine(engine_dir, component, onnx_dir, env=env)
    return Path(engine_dir) / entry.file


def check_components(components: Iterable[str]) -> list[str]:
    names = list(components)
    unknown = [c for c in names if c not in ENGINE_COMPONENTS]
    if unknown or not names:
        given = ", ".join(unknown) or "(none given)"
        known = ", ".join(ENGINE_COMPONENTS)
        raise InvalidArgumentError(f"unknown component(s) {given}; choose from {known}")
    return list(dict.fromkeys(names))
