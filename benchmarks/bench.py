"""The benchmark: every backend on the same workload, each in its own process, the PyTorch baseline included.

Per stage it reports the median, p10 and p90 over the timed runs (warm-up runs are reported apart), host
overhead per denoising step (end to end minus time inside model calls, per UNet call), peak host memory,
model-load time, FLOP efficiency against the machine's own matmul rate, each backend's ratio to the PyTorch
baseline measured in the same run, and the image PSNR against that baseline.

CPU timings use ``perf_counter_ns`` around each stage. GPU backends (CUDA events on the working stream) plug
in through the same worker when they exist.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.machine import machine_info, matmul_gflops
from sdengine.errors import SDEngineError
from sdengine.freeu import FREEU_SCALES
from sdengine.images import psnr

#: Stages reported, in pipeline order. ``denoise`` is the whole loop; ``unet`` and ``step`` are its per-call
#: parts where the host can time them, ``denoise_gpu`` its device time where steps are CUDA-graph replays;
#: ``other`` is end to end minus the model work (tokenizing, glue, launches).
REPORT_STAGES = ("text_encoder", "denoise", "unet", "step", "denoise_gpu", "vae_decode", "other", "total")
TIMED = ("text_encoder", "denoise", "unet", "step", "denoise_gpu", "vae_decode", "total")
FLOP_STAGES = ("text_encoder", "unet", "vae_decode")


@dataclass(frozen=True)
class BenchConfig:
    onnx_dir: Path
    checkpoint: Path | None
    backends: tuple[str, ...]
    height: int
    width: int
    batch: int
    steps: int
    guidance: float
    runs: int
    warmup: int
    scheduler: str | None = None
    seed: int = 0
    threads: int | None = None
    device: str | None = None
    optimized_cache: bool = False
    engine_dir: Path | None = None  # TensorRT engines (``sdengine build``) for the trt backend
    graphs: str = "step"  # GPU graph mode of the ort and trt backends
    #: ONNX Runtime CUDA provider options (``KEY=VALUE``) for the ort backend (sdengine.backends.cuda_options)
    cuda_options: tuple[str, ...] = ()
    #: the ControlNets an export holds, which the torch baseline loads beside the checkpoint
    controlnets: tuple[str, ...] = ()
    #: a refiner that finishes every run (sdengine.refiner): its export, checkpoint and TensorRT engines
    refiner: Path | None = None
    refiner_checkpoint: Path | None = None
    refiner_engine_dir: Path | None = None
    #: the IP-Adapter an export holds, which the torch baseline loads beside the checkpoint
    ip_adapter: str | None = None
    #: perturbed-attention guidance's scale (0: none), and the layers the export perturbs, which the torch
    #: baseline's PAG pipelines perturb too
    pag_scale: float = 0.0
    pag_layers: tuple[str, ...] = ()
    #: a seamless export (sdengine export --seamless): the torch baseline's convolutions wrap around too
    seamless: bool = False
    #: DeepCache's interval (1: off), and the export's branch, at which the torch baseline runs the authors'
    #: helper
    deepcache_interval: int = 1
    deepcache: int | None = None
    #: FreeU's scales (s1, s2, b1, b2; None: off), for an export with --freeu; the torch baseline runs
    #: diffusers' enable_freeu
    freeu: tuple[float, ...] | None = None


def stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {
        "median": float(np.median(a)),
        "p10": float(np.percentile(a, 10)),
        "p90": float(np.percentile(a, 90)),
    }


def model_ms(totals: dict[str, float]) -> float:
    """Time spent inside model work: per-call model times on the CPU, the device time of the graph-replayed
    loop on a GPU (whose per-call parts the host cannot see)."""
    loop = totals["denoise_gpu"] if totals["denoise_gpu"] > 0 else totals["unet"] + totals["step"]
    return totals["text_encoder"] + loop + totals["vae_decode"]


def stage_totals_ms(calls: dict[str, list[int]]) -> dict[str, float]:
    """One run's milliseconds per reported stage."""
    totals = {s: sum(calls.get(s, ())) / 1e6 for s in TIMED}
    totals["other"] = totals["total"] - model_ms(totals)
    return totals


def summarise(raw: dict, flops: dict[str, int], peak_gflops: float | None) -> dict:
    runs = [stage_totals_ms(calls) for calls in raw["runs"]]
    unet_calls = [c for calls in raw["runs"] for c in calls.get("unet", ())]
    step_calls = [c for calls in raw["runs"] for c in calls.get("step_call", ())]
    steps = len(raw["runs"][0].get("step_call", raw["runs"][0].get("unet", ()))) or 1
    summary = {
        "load_s": raw["load_s"],
        "peak_rss_mb": raw["peak_rss_mb"],
        "device_memory_mb": raw.get("device_memory_mb"),
        "stages_ms": {s: stats([r[s] for r in runs]) for s in REPORT_STAGES},
        "warmup_total_ms": [sum(c.get("total", ())) / 1e6 for c in raw["warmup"]],
        "unet_call_ms": stats([c / 1e6 for c in unet_calls or [0]]),
        "step_call_us": stats([c / 1e3 for c in step_calls or [0]]),
        "host_overhead_per_step_ms": stats([r["other"] / steps for r in runs]),
        "unet_calls_per_run": steps,
    }
    if flops:
        counts = {"text_encoder": 1, "unet": steps, "vae_decode": 1}
        timed = {s: summary["stages_ms"][s]["median"] for s in FLOP_STAGES}
        if timed["unet"] <= 0:  # graph-replayed steps: the loop's device time (UNet plus the tiny step model)
            timed["unet"] = summary["stages_ms"]["denoise_gpu"]["median"]
        achieved = {s: flops[s] * counts[s] / (timed[s] / 1e3) / 1e9 for s in FLOP_STAGES if timed[s] > 0}
        summary["gflops_per_s"] = achieved
        if peak_gflops:
            summary["fraction_of_matmul_peak"] = {s: v / peak_gflops for s, v in achieved.items()}
    return summary


def _run_worker(config: BenchConfig, backend: str, image_out: Path) -> dict:
    model = {"torch": config.checkpoint, "trt": config.engine_dir}.get(backend, config.onnx_dir)
    if model is None:
        needs = {"torch": "the source checkpoint: pass --checkpoint", "trt": "an engine directory"}[backend]
        raise SDEngineError(f"the {backend} backend needs {needs}")
    refiner = {"torch": config.refiner_checkpoint, "trt": config.refiner_engine_dir}.get(
        backend, config.refiner
    )
    if config.refiner is not None and refiner is None:
        raise SDEngineError(f"the {backend} backend needs the refiner's {backend} model directory too")
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.worker",
        "--backend",
        backend,
        "--model",
        str(model),
        "--steps",
        str(config.steps),
        "--seed",
        str(config.seed),
        "--height",
        str(config.height),
        "--width",
        str(config.width),
        "--batch",
        str(config.batch),
        "--runs",
        str(config.runs),
        "--warmup",
        str(config.warmup),
        "--guidance",
        str(config.guidance),
        "--image-out",
        str(image_out),
    ]
    if config.scheduler:
        cmd += ["--scheduler", config.scheduler]
    if refiner is not None:
        cmd += ["--refiner", str(refiner)]
    if config.threads:
        cmd += ["--threads", str(config.threads)]
    if config.device:
        cmd += ["--device", config.device]
    if config.optimized_cache and backend != "torch":
        cmd += ["--optimized-cache"]
    if backend != "torch":
        cmd += ["--graphs", config.graphs]
    else:
        cmd += [arg for path in config.controlnets for arg in ("--controlnet", path)]
        cmd += ["--ip-adapter", config.ip_adapter] if config.ip_adapter else []
        cmd += ["--pag-layers", ",".join(config.pag_layers)] if config.pag_layers else []
        cmd += ["--seamless"] if config.seamless else []
        cmd += ["--deepcache", str(config.deepcache)] if config.deepcache is not None else []
    if config.pag_scale:
        cmd += ["--pag-scale", str(config.pag_scale)]
    if config.deepcache_interval != 1:
        cmd += ["--deepcache-interval", str(config.deepcache_interval)]
    if config.freeu is not None:
        cmd += ["--freeu", ",".join(map(repr, config.freeu))]
    if backend == "ort":
        cmd += [arg for option in config.cuda_options for arg in ("--cuda-option", option)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SDEngineError(
            f"the {backend} benchmark failed (exit {done.returncode}); see the messages above"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_benchmark(config: BenchConfig, flops: dict[str, int] | None = None) -> dict:
    """Measure every backend of ``config``; the report as a JSON-ready dict."""
    peak = matmul_gflops() if config.device != "cuda" else None  # a CPU ceiling, meaningless on a GPU
    report: dict = {
        "machine": machine_info(),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "matmul_gflops": peak,
        "flops_per_call": flops or {},
        "backends": {},
    }
    images = {}
    with tempfile.TemporaryDirectory(prefix="sdengine-bench-") as tmp:
        for backend in config.backends:
            image_path = Path(tmp) / f"{backend}.npy"
            raw = _run_worker(config, backend, image_path)
            report["backends"][backend] = summarise(raw, flops or {}, peak)
            report["backends"][backend]["raw_runs_ns"] = raw["runs"]
            images[backend] = np.load(image_path)
    if "torch" in report["backends"]:
        base = report["backends"]["torch"]["stages_ms"]
        for name, result in report["backends"].items():
            result["speedup_vs_torch"] = {
                s: base[s]["median"] / result["stages_ms"][s]["median"]
                for s in REPORT_STAGES
                if result["stages_ms"][s]["median"] > 0 and base[s]["median"] > 0
            }
            result["psnr_vs_torch_db"] = psnr(images[name], images["torch"])
    return report


def format_report(report: dict) -> str:
    """A plain table: median (p10-p90) milliseconds per stage, one column per backend, ratios to torch."""
    backends = report["backends"]
    width = 30
    lines = [
        f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores"
        + (f", GPU {', '.join(report['machine']['gpus'])}" if report["machine"]["gpus"] else ""),
        f"matmul ceiling (ONNX Runtime fp32): {report['matmul_gflops']:.0f} GFLOP/s"
        if report["matmul_gflops"]
        else "matmul ceiling: - (the CPU's; not measured for a GPU run)",
        "",
        f"{'stage (ms)':<22}" + "".join(f"{b:>{width}}" for b in backends),
    ]
    if report.get("config", {}).get("cuda_options"):
        lines.insert(2, "ort's CUDA provider options: " + ", ".join(report["config"]["cuda_options"]))
    interval = report.get("config", {}).get("deepcache_interval", 1)
    if interval > 1:  # the baseline runs the authors' helper at the same branch
        lines.insert(
            2,
            f"DeepCache: the whole UNet on every call of {interval}, the shallow one between, on both "
            "backends (UNet call: the median over both kinds)",
        )
    freeu = report.get("config", {}).get("freeu")
    if freeu is not None:  # the baseline runs diffusers' enable_freeu at the same scales
        scales = ", ".join(f"{name} {value:g}" for name, value in zip(FREEU_SCALES, freeu, strict=True))
        lines.insert(2, f"FreeU: {scales}, on both backends")
    for stage in REPORT_STAGES:
        if all(r["stages_ms"][stage]["median"] == 0 for r in backends.values()):
            continue  # a stage no backend here has (e.g. device time on a CPU-only run)
        cells = []
        for r in backends.values():
            s = r["stages_ms"][stage]
            ratio = r.get("speedup_vs_torch", {}).get(stage)
            extra = f" x{ratio:.2f}" if ratio is not None else ""
            cells.append(f"{s['median']:.1f} ({s['p10']:.0f}-{s['p90']:.0f}){extra}" if s["median"] else "-")
        lines.append(f"{stage:<22}" + "".join(f"{c:>{width}}" for c in cells))
    rows = {
        "UNet call (ms)": lambda r: f"{r['unet_call_ms']['median']:.1f}",
        "host overhead/step (ms)": lambda r: f"{r['host_overhead_per_step_ms']['median']:.2f}",
        "host time/step call (us)": lambda r: (
            f"{r['step_call_us']['median']:.0f}" if r["step_call_us"]["median"] else "-"
        ),
        "load (s)": lambda r: f"{r['load_s']:.2f}",
        "peak RSS (MB)": lambda r: f"{r['peak_rss_mb']:.0f}",
        "GPU memory (MB)": lambda r: f"{r['device_memory_mb']:.0f}" if r.get("device_memory_mb") else "-",
        "UNet TFLOP/s": lambda r: f"{r['gflops_per_s']['unet'] / 1e3:.1f}" if "gflops_per_s" in r else "-",
        "UNet % of matmul peak": lambda r: (
            f"{100 * r['fraction_of_matmul_peak']['unet']:.0f}%" if "fraction_of_matmul_peak" in r else "-"
        ),
        "PSNR vs torch (dB)": lambda r: f"{r['psnr_vs_torch_db']:.1f}" if "psnr_vs_torch_db" in r else "-",
    }
    for label, cell in rows.items():
        lines.append(f"{label:<22}" + "".join(f"{cell(r):>{width}}" for r in backends.values()))
    lines.append("(median over runs, p10-p90 in brackets; xN = speed-up over the torch baseline, same run)")
    return "\n".join(lines)


def plot_report(report: dict, path: Path) -> Path:
    """Stacked per-stage bars (median ms) per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(report["backends"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bottom = np.zeros(len(backends))
    results = [report["backends"][b]["stages_ms"] for b in backends]
    medians = {s: np.array([r[s]["median"] for r in results]) for s in TIMED}
    parts = {s: medians[s] for s in ("text_encoder", "denoise", "vae_decode")}
    parts["rest"] = medians["total"] - sum(parts.values())
    for stage, values in parts.items():
        ax.bar(backends, values, bottom=bottom, label=stage)
        bottom += values
    cfg = report["config"]
    ax.set_ylabel("milliseconds (median)")
    ax.set_title(f"{cfg['height']}x{cfg['width']}, batch {cfg['batch']}, {cfg['steps']} steps")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
