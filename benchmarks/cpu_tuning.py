"""CPU tuning experiments for the ONNX Runtime UNet: each variant timed on the same inputs in one run.

    python -m benchmarks.cpu_tuning ONNX_DIR [--height 256 --width 256 --batch 2 --runs 5]

Prints one row per variant (or why it failed): session start seconds, median/p10/p90 milliseconds of one
UNet call, and the largest relative difference of its output from the default session's (parity must hold
for a variant to be kept). Results and decisions are recorded in benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sdengine.backends.ort import session_options
from sdengine.model_dir import open_onnx_dir
from sdengine.model_specs import UNET


def _opts(**changes: object) -> Callable[[], ort.SessionOptions]:
    def make() -> ort.SessionOptions:
        options = session_options()
        for key, value in changes.items():
            if key.startswith("config:"):
                options.add_session_config_entry(key[len("config:") :], str(value))
            else:
                setattr(options, key, value)
        return options

    return make


def fused_unet(model_path: Path, workdir: Path) -> Path:
    """The UNet after ONNX Runtime's transformer optimizer (attention and other fusions)."""
    from onnxruntime.transformers.optimizer import optimize_model

    out = workdir / "unet-fused" / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    optimized = optimize_model(str(model_path), model_type="unet", opt_level=0, use_gpu=False)
    optimized.save_model_to_file(str(out), use_external_data_format=True, all_tensors_to_one_file=True)
    return out


VARIANTS: dict[str, tuple[Callable[[], ort.SessionOptions], bool]] = {
    "default: ORT_ENABLE_ALL with spinning": (_opts(), False),
    "ORT_ENABLE_EXTENDED": (
        _opts(graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED),
        False,
    ),
    "ORT_ENABLE_BASIC": (_opts(graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC), False),
    "no spinning": (_opts(**{"config:session.intra_op.allow_spinning": "0"}), False),
    "1 thread": (_opts(intra_op_num_threads=1), False),
    "no memory pattern": (_opts(enable_mem_pattern=False), False),
    "transformer-optimizer fusions": (_opts(), True),
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("onnx_dir")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--only", default=None, help="comma-separated variant names")
    args = p.parse_args(argv)
    model_dir = open_onnx_dir(args.onnx_dir)
    arch = model_dir.arch
    spec = arch.specs()[UNET]
    sizes = arch.sizes(args.batch, args.height, args.width)
    rng = np.random.default_rng(0)
    feed = {
        t.name: (rng.standard_normal(t.shape(sizes), dtype=np.float32) if t.dims else np.float32(500.0))
        for t in spec.inputs
    }
    feed = {k: np.asarray(v, dtype=np.float32) for k, v in feed.items()}
    reference = None
    wanted = set(args.only.split(",")) if args.only else None
    with tempfile.TemporaryDirectory(prefix="sdengine-tune-") as tmp:
        for name, (make_options, fuse) in VARIANTS.items():
            if wanted and name not in wanted:
                continue
            try:
                path = fused_unet(model_dir.onnx_path(UNET), Path(tmp)) if fuse else model_dir.onnx_path(UNET)
            except Exception as exc:  # noqa: BLE001 - a failed rewrite is a result to record, not a crash
                print(f"{name:<40} failed: {type(exc).__name__}: {exc}", flush=True)
                continue
            start = time.perf_counter()
            session = ort.InferenceSession(str(path), make_options(), providers=["CPUExecutionProvider"])
            start_s = time.perf_counter() - start
            out = session.run(None, feed)[0]  # warm-up
            times = []
            for _ in range(args.runs):
                t0 = time.perf_counter_ns()
                session.run(None, feed)
                times.append((time.perf_counter_ns() - t0) / 1e6)
            if reference is None:
                reference = out
            diff = float(np.abs(out - reference).max() / np.abs(reference).max())
            med, p10, p90 = np.median(times), np.percentile(times, 10), np.percentile(times, 90)
            print(
                f"{name:<40} start {start_s:6.1f} s  call {med:8.1f} ms ({p10:.0f}-{p90:.0f})  "
                f"rel diff {diff:.1e}",
                flush=True,
            )
            del session


if __name__ == "__main__":
    main()
