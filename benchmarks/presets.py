"""Named benchmark workloads, and the cached random checkpoints and ONNX exports they run on."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from sdengine.cache import cache_dir
from sdengine.errors import InvalidArgumentError


@dataclass(frozen=True)
class Workload:
    name: str
    checkpoint: str  # random-checkpoint preset
    height: int
    width: int
    batch: int
    steps: int
    guidance: float
    precision: str
    runs: int
    warmup: int
    description: str
    device: str | None = None  # None: whatever the machine has
    refiner: str | None = None  # a refiner's random-checkpoint preset: it makes the last 20% of each run


PRESETS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("tiny", "tiny", 64, 64, 1, 4, 7.5, "fp32", 5, 1, "test checkpoint, seconds"),
        Workload("sd15-cpu", "sd15", 256, 256, 1, 4, 7.5, "fp32", 3, 1, "SD 1.5 size, 256x256, 4 steps: CPU"),
        # the GPU headline: on a CPU it would take hours, so it asks for CUDA (a clear error without it)
        Workload(
            "sd15-512", "sd15", 512, 512, 1, 50, 7.5, "fp16", 5, 1, "SD 1.5, 512x512, 50 steps: GPU", "cuda"
        ),
        Workload("tiny-xl", "tiny-xl", 64, 64, 1, 4, 7.5, "fp32", 5, 1, "test SDXL checkpoint, seconds"),
        # SDXL at its own size; its fp16 export keeps the VAE in float32, as diffusers runs it
        Workload(
            "sdxl-1024",
            "sdxl",
            1024,
            1024,
            1,
            30,
            7.5,
            "fp16",
            3,
            1,
            "SDXL, 1024x1024, 30 steps: GPU",
            "cuda",
        ),
        Workload(
            "tiny-xl-refined",
            "tiny-xl",
            64,
            64,
            1,
            10,
            7.5,
            "fp32",
            5,
            1,
            "test SDXL checkpoint and refiner, seconds",
            refiner="tiny-xl-refiner",
        ),
        # diffusers' documented SDXL workflow: the base to 0.8, its refiner from there
        Workload(
            "sdxl-1024-refined",
            "sdxl",
            1024,
            1024,
            1,
            30,
            7.5,
            "fp16",
            3,
            1,
            "SDXL base then refiner, 1024x1024, 30 steps: GPU",
            "cuda",
            refiner="sdxl-refiner",
        ),
    )
}


def get_preset(name: str) -> Workload:
    try:
        return PRESETS[name]
    except KeyError:
        raise InvalidArgumentError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def prepare(workload: Workload, root: Path | None = None) -> tuple[Path, Path, dict[str, float]]:
    """The workload's checkpoint and ONNX export, made on first use; returns the seconds spent making them."""
    return prepare_checkpoint(workload.checkpoint, workload.precision, root)


def prepare_checkpoint(
    preset: str, precision: str, root: Path | None = None, label: str = ""
) -> tuple[Path, Path, dict[str, float]]:
    """A random checkpoint of ``preset`` and its ONNX export in ``precision``, made on first use (cached);
    the seconds spent making them, each key prefixed with ``label``."""
    from export.checkpoint import write_random_checkpoint
    from export.onnx_export import export_checkpoint
    from sdengine.manifest import Manifest

    root = root or cache_dir()
    checkpoint = root / f"random-{preset}"
    onnx_dir = root / f"random-{preset}-onnx-{precision}"
    made: dict[str, float] = {}
    if not (checkpoint / "model_index.json").is_file():
        start = time.perf_counter()
        write_random_checkpoint(checkpoint, preset, seed=0, overwrite=True)
        made["checkpoint_s"] = time.perf_counter() - start
    if Manifest.read(onnx_dir) is None:
        manifest = export_checkpoint(checkpoint, onnx_dir, precision=precision)
        made.update({f"export_{n}_s": r.export_seconds for n, r in manifest.components.items()})
        made.update(
            {f"export_{n}_peak_rss_mb": r.peak_rss_bytes / 2**20 for n, r in manifest.components.items()}
        )
    return checkpoint, onnx_dir, {label + key: value for key, value in made.items()}
