"""The prepared GPU check: parity and per-stage latency of every available GPU backend against diffusers.

Run on a lent GPU machine by ``benchmarks/gpu_check.sh`` (which installs the carried onnxruntime-gpu wheel):

    python -m benchmarks.gpu_check [--out DIR] [--steps 20,50] [--runs 3]

1. Parity on the tiny random checkpoint: ONNX Runtime CUDA with CUDA graphs against the same backend eager
   (graph replay must give the eager latents), against ONNX Runtime on the CPU (fp32), and fp16 ONNX Runtime
   CUDA against diffusers fp16 on the GPU.
2. Latency on the SD 1.5-sized random checkpoint, fp16, 512x512, batch 1, CFG, for each step count: every
   available GPU backend against diffusers fp16 eager on the same GPU, in the same run (CUDA events for the
   denoising loop, medians over runs).
Writes ``gpu_check.json`` and the tables to --out. TensorRT runs only where it is installed (engines are
built for 512x512 first, and their build time reported); the lent machines here have none.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.bench import BenchConfig, format_report, run_benchmark
from benchmarks.flops import stage_flops
from benchmarks.machine import machine_info
from sdengine.backends.select import detect
from sdengine.images import psnr

PROMPT = "a photo of an astronaut riding a horse on mars"


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def parity(work: Path, device: str = "cuda") -> dict[str, float | str]:
    from export.checkpoint import write_random_checkpoint
    from export.onnx_export import export_checkpoint
    from sdengine.backends.ort_cuda import OrtCudaBackend
    from sdengine.baseline import TorchPipeline
    from sdengine.model_dir import open_onnx_dir
    from sdengine.pipeline import Pipeline
    from sdengine.tokenizer import ClipTokenizer

    ckpt = write_random_checkpoint(work / "tiny", "tiny", seed=0, overwrite=True)
    parts = ["text_encoder", "unet", "vae_decoder"]
    export_checkpoint(ckpt, work / "tiny-fp32", components=parts)
    export_checkpoint(ckpt, work / "tiny-fp16", precision="fp16", components=parts)
    fp32, fp16 = open_onnx_dir(work / "tiny-fp32"), open_onnx_dir(work / "tiny-fp16")
    settings = dict(steps=8, seed=1, height=64, width=96, guidance=7.5)
    tok = ClipTokenizer.from_dir(fp32.tokenizer_dir)
    graph_backend = OrtCudaBackend(fp32, cuda_graphs=True, device=device)
    graphs = Pipeline(fp32, graph_backend, tok)
    eager = Pipeline(fp32, OrtCudaBackend(fp32, cuda_graphs=False, device=device), tok)
    cpu = Pipeline.load(fp32.root, backend="ort", device="cpu")
    results = {}
    for scheduler in ("pndm", "euler_a", "dpmpp_2m"):
        g1 = graphs(PROMPT, scheduler=scheduler, **settings)
        g2 = graphs(PROMPT, scheduler=scheduler, **{**settings, "seed": 2})  # replays the captured graphs
        e1 = eager(PROMPT, scheduler=scheduler, **settings)
        e2 = eager(PROMPT, scheduler=scheduler, **{**settings, "seed": 2})
        c1 = cpu(PROMPT, scheduler=scheduler, **settings)
        results[f"{scheduler}: graph vs eager, max |latent diff|"] = float(
            max(np.abs(g1.latents - e1.latents).max(), np.abs(g2.latents - e2.latents).max())
        )
        results[f"{scheduler}: CUDA vs CPU fp32, PSNR dB"] = psnr(g1.array, c1.array)
    results["UNet CUDA graphs refused by ONNX Runtime"] = graph_backend.graphs_refused or "no"
    half = Pipeline(fp16, OrtCudaBackend(fp16, cuda_graphs=True, device=device), tok)
    torch16 = TorchPipeline.load(ckpt, device=device)
    results["fp16 CUDA vs diffusers fp16 GPU, PSNR dB"] = psnr(
        half(PROMPT, **settings).array, torch16(PROMPT, **settings).array
    )
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gpu-check-out")
    p.add_argument("--work", default="/tmp/sdengine-gpu-check")
    p.add_argument("--steps", default="20,50")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument(
        "--rehearse",
        action="store_true",
        help="run the whole script on the CPU with the tiny checkpoint (checks the script, not the GPU)",
    )
    args = p.parse_args(argv)
    device = "cpu" if args.rehearse else "cuda"
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    has = detect()
    log(f"machine: {info['gpus']}; available: {has}")
    if not has.ort_cuda and not args.rehearse:
        print("gpu_check: ONNX Runtime cannot run on CUDA here (install the onnxruntime-gpu wheel first)")
        return 2
    report: dict = {"machine": info, "availability": vars(has)}
    log("parity on the tiny checkpoint")
    report["parity"] = parity(work, device)
    for name, value in report["parity"].items():
        log(f"  {name}: {value:.4g}" if isinstance(value, float) else f"  {name}: {value}")

    from export.checkpoint import write_random_checkpoint
    from export.onnx_export import export_checkpoint

    preset, size = ("tiny", 64) if args.rehearse else ("sd15", 512)
    log(f"{preset} random checkpoint and its fp16 export")
    ckpt = work / preset
    if not (ckpt / "model_index.json").is_file():
        write_random_checkpoint(ckpt, preset, seed=0, overwrite=True)
    onnx_dir = work / f"{preset}-fp16"
    start = time.perf_counter()
    manifest = export_checkpoint(
        ckpt, onnx_dir, precision="fp16", components=["text_encoder", "unet", "vae_decoder"]
    )
    report["export_s"] = {n: r.export_seconds for n, r in manifest.components.items()}
    log(f"exported in {time.perf_counter() - start:.0f} s")
    backends, engine_dir = ("ort", "torch"), None
    if has.tensorrt and has.cuda_python and not args.rehearse:
        from export.trt_build import build_engines

        log("TensorRT engines, static 512x512 batch 1 with CFG")
        engine_dir = work / f"{preset}-engines"
        start = time.perf_counter()
        build_engines(onnx_dir, engine_dir, batch=1, height=size, width=size, log=log)
        report["engine_build_s"] = time.perf_counter() - start
        backends = ("trt", "ort", "torch")
    flops = stage_flops(ckpt, onnx_dir, batch=1, height=size, width=size, cfg=True)
    report["latency"] = {}
    for steps in (int(s) for s in args.steps.split(",")):
        log(f"latency: {size}x{size}, batch 1, CFG, {steps} steps")
        config = BenchConfig(
            onnx_dir=onnx_dir,
            checkpoint=ckpt,
            backends=backends,
            height=size,
            width=size,
            batch=1,
            steps=steps,
            guidance=7.5,
            runs=args.runs,
            warmup=1,
            device=device,
            engine_dir=engine_dir,
        )
        result = run_benchmark(config, flops)
        report["latency"][steps] = result
        table = format_report(result)
        print(table, flush=True)
        (out / f"gpu_check_{steps}_steps.txt").write_text(table + "\n")
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    log(f"wrote {out}/gpu_check.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
