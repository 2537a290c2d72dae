"""The prepared GPU check: parity and per-stage latency of every available GPU backend against diffusers.

Run on a lent GPU machine by ``benchmarks/gpu_check.sh`` (which installs the carried onnxruntime-gpu wheel):

    python -m benchmarks.gpu_check [--out DIR] [--steps 50,20] [--runs 3]

1. Parity on the tiny random checkpoint: ONNX Runtime CUDA with whole-step graphs (``step``) and with its
   own graph mode (``ort``) against the same backend without graphs (a replay must give the eager latents),
   against ONNX Runtime on the CPU (fp32: text and image to image, inpainting, prompt editing, the hires fix,
   LoRA, a random ControlNet, a random IP-Adapter), and fp16 ONNX Runtime CUDA against diffusers fp16 on the
   GPU; the same for the tiny SDXL model, and it with a tiny refiner finishing its runs.
2. Latency on the SD 1.5-sized random checkpoint, fp16, 512x512, batch 1, CFG, for each step count: every
   available GPU backend against diffusers fp16 eager on the same GPU, in the same run (CUDA events for the
   denoising loop, medians over runs); then ONNX Runtime once more with its own graph mode.
Writes ``gpu_check.json`` and the tables to --out. TensorRT runs only where it is installed (engines are
built for 512x512 first, and their build time reported); the lent machines here have none.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
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
    from export.controlnet import write_random_controlnet
    from export.ip_adapter import write_random_ip_adapter
    from export.onnx_export import export_checkpoint
    from export.random_lora import write_random_lora
    from sdengine.backends.ort_cuda import OrtCudaBackend
    from sdengine.baseline import TorchPipeline
    from sdengine.demo import centre_mask, edge_map
    from sdengine.model_dir import open_onnx_dir
    from sdengine.pipeline import Pipeline
    from sdengine.tokenizer import ClipTokenizer

    ckpt = write_random_checkpoint(work / "tiny", "tiny", seed=0, overwrite=True)
    parts = ["text_encoder", "unet", "vae_decoder"]
    export_checkpoint(ckpt, work / "tiny-fp32", components=[*parts, "vae_encoder"])  # + image to image
    export_checkpoint(ckpt, work / "tiny-fp16", precision="fp16", components=parts)
    fp32, fp16 = open_onnx_dir(work / "tiny-fp32"), open_onnx_dir(work / "tiny-fp16")
    settings = dict(steps=8, seed=1, height=64, width=96, guidance=7.5)
    tok = ClipTokenizer.from_dir(fp32.tokenizer_dir)
    backends = {mode: OrtCudaBackend(fp32, graphs=mode, device=device) for mode in ("step", "ort", "none")}
    pipes = {mode: Pipeline(fp32, backend, tok) for mode, backend in backends.items()}
    cpu = Pipeline.load(fp32.root, backend="ort", device="cpu")
    results = {}
    for scheduler in ("pndm", "euler_a", "dpmpp_2m"):
        runs = {
            mode: [pipe(PROMPT, scheduler=scheduler, **{**settings, "seed": seed}) for seed in (1, 2)]
            for mode, pipe in pipes.items()  # the second seed replays the graphs captured for the first
        }
        for mode in ("step", "ort"):
            results[f"{scheduler}: {mode} graphs vs no graphs, max |latent diff|"] = float(
                max(
                    np.abs(a.latents - b.latents).max() for a, b in zip(runs[mode], runs["none"], strict=True)
                )
            )
        c1 = cpu(PROMPT, scheduler=scheduler, **settings)
        results[f"{scheduler}: CUDA vs CPU fp32, PSNR dB"] = psnr(runs["step"][0].array, c1.array)
    for mode in ("step", "ort"):
        results[f"{mode} graphs refused"] = backends[mode].graphs_refused or "no"
    image = cpu(PROMPT, **settings).array
    img2img = dict(settings, image=image, strength=0.6)
    results["image to image: CUDA vs CPU fp32, PSNR dB"] = psnr(
        pipes["step"](PROMPT, **img2img).array, cpu(PROMPT, **img2img).array
    )
    inpaint = dict(settings, image=image, mask=centre_mask(settings["height"], settings["width"]))
    results["inpainting: CUDA vs CPU fp32, PSNR dB"] = psnr(
        pipes["step"](PROMPT, **inpaint).array, cpu(PROMPT, **inpaint).array
    )
    edited = dict(settings, prompt_weights="a1111")  # each call's text embeddings from the step model
    results["prompt editing: CUDA vs CPU fp32, PSNR dB"] = psnr(
        pipes["step"]("a [red:blue:0.5] cat, [oil|watercolour]", **edited).array,
        cpu("a [red:blue:0.5] cat, [oil|watercolour]", **edited).array,
    )
    hires = dict(settings, hires_scale=1.5)  # a second shape: its own buffers and graphs
    results["hires fix: CUDA vs CPU fp32, PSNR dB"] = psnr(
        pipes["step"](PROMPT, **hires).array, cpu(PROMPT, **hires).array
    )
    lora = write_random_lora(fp32.root, work / "random-lora.safetensors")
    for pipe in (pipes["step"], cpu):  # the UNet's per-shape sessions reopen with the fused weights
        pipe.load_lora(lora, 0.8)
    results["LoRA: CUDA vs CPU fp32, PSNR dB"] = psnr(
        pipes["step"](PROMPT, **settings).array, cpu(PROMPT, **settings).array
    )
    shutil.rmtree(work / "random-controlnet", ignore_errors=True)  # a rerun writes it again
    controlnet = write_random_controlnet(ckpt, work / "random-controlnet")
    export_checkpoint(ckpt, work / "tiny-controlnet", components=parts, controlnets=[controlnet])
    controlled = open_onnx_dir(work / "tiny-controlnet")
    control = dict(settings, control_image=edge_map(image[0]), control_end=0.6)  # weights from the step model
    results["ControlNet: CUDA vs CPU fp32, PSNR dB"] = psnr(
        Pipeline(controlled, OrtCudaBackend(controlled, device=device), tok)(PROMPT, **control).array,
        Pipeline.load(controlled.root, backend="ort", device="cpu")(PROMPT, **control).array,
    )
    shutil.rmtree(work / "random-ip-adapter", ignore_errors=True)
    adapter = write_random_ip_adapter(ckpt, work / "random-ip-adapter")
    export_checkpoint(ckpt, work / "tiny-ip", components=[*parts, "image_encoder"], ip_adapter=adapter)
    prompted_dir = open_onnx_dir(work / "tiny-ip")
    prompted = dict(settings, ip_adapter_image=image[0])  # the image prompt's inputs bound into the graphs
    results["IP-Adapter: CUDA vs CPU fp32, PSNR dB"] = psnr(
        Pipeline(prompted_dir, OrtCudaBackend(prompted_dir, device=device), tok)(PROMPT, **prompted).array,
        Pipeline.load(prompted_dir.root, backend="ort", device="cpu")(PROMPT, **prompted).array,
    )
    half = Pipeline(fp16, OrtCudaBackend(fp16, device=device), tok)
    torch16 = TorchPipeline.load(ckpt, device=device)
    results["fp16 CUDA vs diffusers fp16 GPU, PSNR dB"] = psnr(
        half(PROMPT, **settings).array, torch16(PROMPT, **settings).array
    )
    drawn = dict(settings, scheduler="euler_a", noise_source="torch-cpu")  # diffusers draws its own noise
    results["torch-cpu noise: fp16 CUDA vs diffusers fp16 GPU with CPU generators, PSNR dB"] = psnr(
        half(PROMPT, **drawn).array, torch16(PROMPT, **drawn).array
    )
    results.update(xl_parity(work, settings, device))
    return results


def xl_parity(work: Path, settings: dict, device: str) -> dict[str, float]:
    """The tiny SDXL model: its added UNet inputs bound into the CUDA whole-step graphs, against the CPU
    (fp32), and fp16 against diffusers' SDXL pipeline fp16 on the GPU (its VAE in float32, as both run it);
    and with a tiny refiner finishing its runs (the base's graphs cut at the switch), against the CPU."""
    from export.checkpoint import write_random_checkpoint
    from export.onnx_export import export_checkpoint
    from sdengine.backends.ort_cuda import OrtCudaBackend
    from sdengine.baseline import TorchPipeline
    from sdengine.model_dir import open_onnx_dir
    from sdengine.pipeline import Pipeline
    from sdengine.tokenizer import ClipTokenizer

    ckpt = write_random_checkpoint(work / "tiny-xl", "tiny-xl", seed=0, overwrite=True)
    parts = ["text_encoder", "text_encoder_2", "unet", "vae_decoder"]
    export_checkpoint(ckpt, work / "tiny-xl-fp32", components=parts)
    export_checkpoint(ckpt, work / "tiny-xl-fp16", precision="fp16", components=parts)
    fp32, fp16 = open_onnx_dir(work / "tiny-xl-fp32"), open_onnx_dir(work / "tiny-xl-fp16")
    cpu = Pipeline.load(fp32.root, backend="ort", device="cpu")
    gpu = Pipeline(fp32, OrtCudaBackend(fp32, device=device), cpu.tokenizer)
    half = Pipeline(fp16, OrtCudaBackend(fp16, device=device), cpu.tokenizer)
    torch16 = TorchPipeline.load(ckpt, device=device)
    results = {
        "SDXL: CUDA vs CPU fp32, PSNR dB": psnr(gpu(PROMPT, **settings).array, cpu(PROMPT, **settings).array),
        "SDXL: fp16 CUDA vs diffusers fp16 GPU, PSNR dB": psnr(
            half(PROMPT, **settings).array, torch16(PROMPT, **settings).array
        ),
    }
    refiner_ckpt = write_random_checkpoint(
        work / "tiny-xl-refiner", "tiny-xl-refiner", seed=0, overwrite=True
    )
    export_checkpoint(refiner_ckpt, work / "tiny-xl-refiner-fp32", components=parts[1:])
    refiner = open_onnx_dir(work / "tiny-xl-refiner-fp32")
    gpu.set_refiner(
        Pipeline(
            refiner, OrtCudaBackend(refiner, device=device), ClipTokenizer.from_dir(refiner.tokenizer_dir)
        )
    )
    cpu.set_refiner(Pipeline.load(refiner.root, backend="ort", device="cpu"))
    results["SDXL with its refiner: CUDA vs CPU fp32, PSNR dB"] = psnr(
        gpu(PROMPT, **settings).array, cpu(PROMPT, **settings).array
    )
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gpu-check-out")
    p.add_argument("--work", default="/tmp/sdengine-gpu-check")
    p.add_argument(
        "--steps", default="50,20", help="step counts, the headline (50) first: a cut-short run keeps it"
    )
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
    save(report, out)

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
    config = BenchConfig(
        onnx_dir=onnx_dir,
        checkpoint=ckpt,
        backends=backends,
        height=size,
        width=size,
        batch=1,
        steps=0,
        guidance=7.5,
        runs=args.runs,
        warmup=1,
        device=device,
        engine_dir=engine_dir,
    )
    step_counts = [int(s) for s in args.steps.split(",")]
    runs = [(str(n), replace(config, steps=n)) for n in step_counts]
    # then ONNX Runtime once more, with its own graph mode (a wait for the GPU after each replay)
    runs.append(
        (
            f"{max(step_counts)}-ort-graphs",
            replace(config, backends=("ort",), graphs="ort", steps=max(step_counts)),
        )
    )
    for name, run_config in runs:
        log(f"latency {name}: {size}x{size}, batch 1, CFG, {run_config.steps} steps, {run_config.backends}")
        report["latency"][name] = result = run_benchmark(run_config, flops)
        table = format_report(result)
        print(table, flush=True)
        (out / f"gpu_check_{name.replace('-', '_')}_steps.txt").write_text(table + "\n")
        save(report, out)  # after each part, so a run cut short still leaves what it measured
    log(f"wrote {out}/gpu_check.json")
    return 0


def save(report: dict, out: Path) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
