"""The prepared GPU check: parity and per-stage latency of every available GPU backend against diffusers.

Run on a lent GPU machine by ``benchmarks/gpu_check.sh`` (which installs the carried onnxruntime-gpu wheel):

    python -m benchmarks.gpu_check [--out DIR] [--steps 50,20] [--runs 3] [--parts core,noise,...]

1. Parity on the tiny random checkpoint: ONNX Runtime CUDA with whole-step graphs (``step``) and with its
   own graph mode (``ort``) against the same backend without graphs (a replay must give the eager latents),
   against ONNX Runtime on the CPU (fp32: text and image to image, inpainting, prompt editing, composable
   prompts, the hires fix, LoRA, a random ControlNet, a random IP-Adapter, perturbed-attention guidance),
   fp16 ONNX Runtime CUDA against diffusers fp16 on the GPU (PyTorch's CPU noise too), and the UNet fused
   for CUDA (``export --target cuda``) against plain runs, the portable export and diffusers; the same for
   the tiny SDXL model, and it with a tiny refiner.
2. Latency on the SD 1.5-sized random checkpoint, fp16, 512x512, batch 1, CFG, for each step count: the
   fused export (or the portable one) and every other available GPU backend against diffusers fp16 eager on
   the same GPU, in the same run (CUDA events for the denoising loop, medians over runs); then the portable
   export, alone and with the CUDA provider's NHWC kernels (``--cuda-option prefer_nhwc=1``), and ONNX
   Runtime once more with its own graph mode.
:data:`PARTS` names the pieces, in the order they run; the headline latency runs before the ``extras``
parity rows, so a run cut short keeps the numbers that matter most. A row or run that fails is recorded as
its one-line error and the rest goes on (exit status 1).
Writes ``gpu_check.json`` (after each part) and the tables to --out. TensorRT runs only where it is
installed (engines are built for 512x512 first, and their build time reported); the lent machines here have
none.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench import BenchConfig, format_report, run_benchmark
from benchmarks.flops import stage_flops
from benchmarks.machine import machine_info
from sdengine.backends.select import Availability, detect
from sdengine.images import psnr
from sdengine.manifest import TARGETS

PROMPT = "a photo of an astronaut riding a horse on mars"


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def recorded(run: Callable[[], Any]) -> tuple[Any, str | None]:
    """``run()``'s result, or its failure as one line (its traceback printed), so the rest of the check
    still runs in the lent machine's few minutes."""
    try:
        return run(), None
    except Exception as error:  # noqa: BLE001 - recorded, and the check goes on
        traceback.print_exc()
        return None, failure(error)


def attempt(results: dict, name: str, measure: Callable[[], float | str]) -> None:
    """Fill one row: ``measure()``'s value, or its one-line error."""
    value, error = recorded(measure)
    results[name] = value = error or value
    log(f"  {name}: {value:.4g}" if isinstance(value, float) else f"  {name}: {value}")


def half_draws() -> float:
    """How far torch's CPU ``randn`` in float16 is from its float32 draws cast to float16, from the same
    seed (diffusers' float16 pipelines draw in float16; A1111's CPU source, and sdengine's, in float32)."""
    import torch

    worst = 0.0
    for shape in ((1, 4, 8, 12), (1, 4, 64, 64)):
        a = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(1), dtype=torch.float16)
        b = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(1)).half()
        worst = max(worst, float((a.float() - b.float()).abs().max()))
    return worst


#: the seeds of a graphs-against-plain comparison: the second replays the graphs captured for the first
REPLAY_SEEDS = (1, 2)


def seeded_runs(pipe: Any, settings: dict) -> list:
    """``pipe``'s results for each of :data:`REPLAY_SEEDS`."""
    return [pipe(PROMPT, **{**settings, "seed": seed}) for seed in REPLAY_SEEDS]


def max_latent_diff(ours: list, theirs: list) -> float:
    """The largest |latent difference| between two lists of runs made alike, pair by pair."""
    return float(max(np.abs(a.latents - b.latents).max() for a, b in zip(ours, theirs, strict=True)))


def failure(error: BaseException) -> str:
    """An error as one line for the report."""
    lines = str(error).strip().splitlines()
    return f"failed: {type(error).__name__}: {lines[0] if lines else ''}"[:400]


class Parity:
    """Parity on the tiny random checkpoint, in two parts so that the headline latency runs between them:
    :meth:`core` (graph modes against plain runs, CUDA against the CPU, fp16 against diffusers) and
    :meth:`extras` (every other path). Rows land in :attr:`results` as they are measured."""

    def __init__(self, work: Path, device: str = "cuda") -> None:
        from export.checkpoint import write_random_checkpoint
        from export.onnx_export import export_checkpoint
        from sdengine.model_dir import open_onnx_dir
        from sdengine.tokenizer import ClipTokenizer

        self.work, self.device, self.results = work, device, {}
        self.ckpt = write_random_checkpoint(work / "tiny", "tiny", seed=0, overwrite=True)
        self.components = ["text_encoder", "unet", "vae_decoder"]
        export_checkpoint(self.ckpt, work / "tiny-fp32", components=[*self.components, "vae_encoder"])
        export_checkpoint(self.ckpt, work / "tiny-fp16", precision="fp16", components=self.components)
        self.fp32, self.fp16 = open_onnx_dir(work / "tiny-fp32"), open_onnx_dir(work / "tiny-fp16")
        self.settings = dict(steps=8, seed=1, height=64, width=96, guidance=7.5)
        self.tok = ClipTokenizer.from_dir(self.fp32.tokenizer_dir)

    @functools.cached_property
    def backends(self) -> dict[str, Any]:
        from sdengine.backends.ort_cuda import OrtCudaBackend

        return {
            mode: OrtCudaBackend(self.fp32, graphs=mode, device=self.device)
            for mode in ("step", "ort", "none")
        }

    @functools.cached_property
    def pipes(self) -> dict[str, Any]:
        from sdengine.pipeline import Pipeline

        return {mode: Pipeline(self.fp32, b, self.tok) for mode, b in self.backends.items()}

    @functools.cached_property
    def cpu(self) -> Any:
        from sdengine.pipeline import Pipeline

        return Pipeline.load(self.fp32.root, backend="ort", device="cpu")

    def core(self) -> None:
        results, settings, pipes = self.results, self.settings, self.pipes
        for scheduler in ("pndm", "euler_a", "dpmpp_2m"):
            runs: dict = {}

            def graphs_against_plain(mode: str, scheduler: str = scheduler, runs: dict = runs) -> float:
                for name in (mode, "none"):  # the plain runs serve both graph modes
                    if name not in runs:
                        runs[name] = seeded_runs(pipes[name], {**settings, "scheduler": scheduler})
                return max_latent_diff(runs[mode], runs["none"])

            for mode in ("step", "ort"):
                attempt(
                    results,
                    f"{scheduler}: {mode} graphs vs no graphs, max |latent diff|",
                    lambda mode=mode, f=graphs_against_plain: f(mode),
                )
            attempt(
                results,
                f"{scheduler}: CUDA vs CPU fp32, PSNR dB",
                lambda scheduler=scheduler: psnr(
                    pipes["step"](PROMPT, scheduler=scheduler, **settings).array,
                    self.cpu(PROMPT, scheduler=scheduler, **settings).array,
                ),
            )
        for mode in ("step", "ort"):
            results[f"{mode} graphs refused"] = self.backends[mode].graphs_refused or "no"
        attempt(
            results,
            "fp16 CUDA vs diffusers fp16 GPU, PSNR dB",
            lambda: psnr(self.half(PROMPT, **settings).array, self.torch16(PROMPT, **settings).array),
        )

    def noise(self) -> None:
        """PyTorch's CPU noise (``noise_source="torch-cpu"``) against diffusers fp16 with CPU generators."""
        drawn = dict(self.settings, scheduler="euler_a", noise_source="torch-cpu")  # diffusers draws its own
        attempt(
            self.results,
            "torch-cpu noise: fp16 CUDA vs diffusers fp16 GPU with CPU generators, PSNR dB",
            lambda: psnr(self.half(PROMPT, **drawn).array, self.torch16(PROMPT, **drawn).array),
        )
        attempt(self.results, "torch's CPU randn: float16 draws vs float32 draws, max |diff|", half_draws)

    @functools.cached_property
    def half(self) -> Any:
        from sdengine.backends.ort_cuda import OrtCudaBackend
        from sdengine.pipeline import Pipeline

        return Pipeline(self.fp16, OrtCudaBackend(self.fp16, device=self.device), self.tok)

    @functools.cached_property
    def torch16(self) -> Any:
        from sdengine.baseline import TorchPipeline

        return TorchPipeline.load(self.ckpt, device=self.device)

    def fused(self) -> None:
        """The UNet fused for the CUDA provider (``export --target cuda``): its whole-step graphs against
        plain runs, its images against the portable fp16 export's and diffusers fp16's. It is exported with
        perturbable layers (their attention left unfused, the rest as in the plain fused UNet), so one
        export also checks perturbed-attention guidance fused, against diffusers' PAG pipeline."""
        from export.onnx_export import export_checkpoint
        from sdengine.backends.ort_cuda import OrtCudaBackend
        from sdengine.model_dir import open_onnx_dir
        from sdengine.pipeline import Pipeline

        results, settings = self.results, self.settings
        export_checkpoint(
            self.ckpt,
            self.work / "tiny-fp16-cuda",
            precision="fp16",
            components=self.components,
            target="cuda",
            pag_layers=FUSED_PAG_LAYERS,
        )
        fused_dir = open_onnx_dir(self.work / "tiny-fp16-cuda")
        pipes = {
            mode: Pipeline(fused_dir, OrtCudaBackend(fused_dir, graphs=mode, device=self.device), self.tok)
            for mode in ("step", "none")
        }

        def graphs_against_plain() -> float:
            return max_latent_diff(seeded_runs(pipes["step"], settings), seeded_runs(pipes["none"], settings))

        attempt(results, "fused UNet: step graphs vs no graphs, max |latent diff|", graphs_against_plain)
        results["fused UNet: step graphs refused"] = pipes["step"].backend.graphs_refused or "no"
        attempt(
            results,
            "fused UNet fp16 CUDA vs portable fp16 CUDA, PSNR dB",
            lambda: psnr(pipes["step"](PROMPT, **settings).array, self.half(PROMPT, **settings).array),
        )
        attempt(
            results,
            "fused UNet fp16 CUDA vs diffusers fp16 GPU, PSNR dB",
            lambda: psnr(pipes["step"](PROMPT, **settings).array, self.torch16(PROMPT, **settings).array),
        )

        def pag_against_diffusers() -> float:
            from sdengine.baseline import TorchPipeline

            torch16 = TorchPipeline.load(self.ckpt, device=self.device, pag_layers=FUSED_PAG_LAYERS)
            guided = dict(settings, pag_scale=3.0)
            return psnr(pipes["step"](PROMPT, **guided).array, torch16(PROMPT, **guided).array)

        attempt(
            results, "fused UNet with PAG fp16 CUDA vs diffusers PAG fp16 GPU, PSNR dB", pag_against_diffusers
        )

    def extras(self) -> None:
        results, settings, pipes, cpu, work = self.results, self.settings, self.pipes, self.cpu, self.work
        image = cpu(PROMPT, **settings).array
        img2img = dict(settings, image=image, strength=0.6)
        attempt(
            results,
            "image to image: CUDA vs CPU fp32, PSNR dB",
            lambda: psnr(pipes["step"](PROMPT, **img2img).array, cpu(PROMPT, **img2img).array),
        )
        from sdengine.demo import centre_mask, edge_map

        inpaint = dict(settings, image=image, mask=centre_mask(settings["height"], settings["width"]))
        attempt(
            results,
            "inpainting: CUDA vs CPU fp32, PSNR dB",
            lambda: psnr(pipes["step"](PROMPT, **inpaint).array, cpu(PROMPT, **inpaint).array),
        )
        edited = dict(settings, prompt_weights="a1111")  # each call's text embeddings from the step model
        attempt(
            results,
            "prompt editing: CUDA vs CPU fp32, PSNR dB",
            lambda: psnr(
                pipes["step"]("a [red:blue:0.5] cat, [oil|watercolour]", **edited).array,
                cpu("a [red:blue:0.5] cat, [oil|watercolour]", **edited).array,
            ),
        )
        composed = "a red cat AND a blue hat :0.7"  # three copies of the batch, summed in the step model
        attempt(
            results,
            "composable prompts: CUDA vs CPU fp32, PSNR dB",
            lambda: psnr(pipes["step"](composed, **edited).array, cpu(composed, **edited).array),
        )
        projected = dict(settings, guidance=12.0, apg=(0.0, 15.0, -0.5))  # its average in a history buffer
        attempt(
            results,
            "adaptive projected guidance: CUDA vs CPU fp32, PSNR dB",
            lambda: psnr(pipes["step"](PROMPT, **projected).array, cpu(PROMPT, **projected).array),
        )
        aligned = dict(settings, scheduler="dpmpp_2m", sigmas="ays")  # Align Your Steps' 10 sigmas
        attempt(
            results,
            "custom sigmas (Align Your Steps): CUDA vs CPU fp32, PSNR dB",
            lambda: psnr(pipes["step"](PROMPT, **aligned).array, cpu(PROMPT, **aligned).array),
        )
        hires = dict(settings, hires_scale=1.5)  # a second shape: its own buffers and graphs
        attempt(
            results,
            "hires fix: CUDA vs CPU fp32, PSNR dB",
            lambda: psnr(pipes["step"](PROMPT, **hires).array, cpu(PROMPT, **hires).array),
        )
        attempt(results, "LoRA: CUDA vs CPU fp32, PSNR dB", self.lora)
        attempt(results, "ControlNet: CUDA vs CPU fp32, PSNR dB", lambda: self.controlnet(edge_map(image[0])))
        attempt(results, "IP-Adapter: CUDA vs CPU fp32, PSNR dB", lambda: self.ip_adapter(image[0]))
        attempt(results, "perturbed-attention guidance: CUDA vs CPU fp32, PSNR dB", self.pag)
        noised = dict(inpaint, strength=0.7, masked_content="latent noise")  # the masked part from noise
        attempt(
            results,
            "inpainting from latent noise: CUDA vs CPU fp32, PSNR dB",
            lambda: psnr(pipes["step"](PROMPT, **noised).array, cpu(PROMPT, **noised).array),
        )
        self.tiny_vae(image, results)
        attempt(results, "DeepCache, interval 3: CUDA vs CPU fp32, PSNR dB", self.deepcache)
        attempt(results, "FreeU: fp16 CUDA vs diffusers fp16 GPU (its FFT), PSNR dB", self.freeu)
        xl_parity(work, settings, self.device, results)

    def tiny_vae(self, image: np.ndarray, results: dict) -> None:
        """A random tiny VAE (TAESD's architecture) in the VAE's place and as the preview decoder: image to
        image through it, and its previews, CUDA against the CPU."""
        from export.onnx_export import export_checkpoint
        from export.tiny_vae import write_random_tiny_vae
        from sdengine.backends.ort_cuda import OrtCudaBackend
        from sdengine.model_dir import open_onnx_dir
        from sdengine.pipeline import Pipeline

        shutil.rmtree(self.work / "random-taesd", ignore_errors=True)
        tiny = write_random_tiny_vae(self.work / "random-taesd")
        parts = [*self.components, "vae_encoder", "preview_decoder"]
        export_checkpoint(self.ckpt, self.work / "tiny-taesd", components=parts, vae=tiny, preview_vae=tiny)
        tiny_dir = open_onnx_dir(self.work / "tiny-taesd")
        gpu = Pipeline(tiny_dir, OrtCudaBackend(tiny_dir, device=self.device), self.tok)
        cpu = Pipeline.load(tiny_dir.root, backend="ort", device="cpu")
        img2img = dict(self.settings, image=image, strength=0.6)
        attempt(
            results,
            "tiny VAE, image to image: CUDA vs CPU fp32, PSNR dB",
            lambda: psnr(gpu(PROMPT, **img2img).array, cpu(PROMPT, **img2img).array),
        )
        latents = cpu(PROMPT, **self.settings).latents

        def previews() -> float:
            drawn = [np.stack([np.asarray(i) for i in p.preview_images(latents, "tiny")]) for p in (gpu, cpu)]
            return psnr(drawn[0].astype(np.float32) / 255, drawn[1].astype(np.float32) / 255)

        attempt(results, "preview decoder (tiny VAE): CUDA vs CPU fp32, PSNR dB", previews)

    def lora(self) -> float:
        from export.random_lora import write_random_lora

        lora = write_random_lora(self.fp32.root, self.work / "random-lora.safetensors")
        step, cpu = self.pipes["step"], self.cpu
        for pipe in (step, cpu):  # the UNet's per-shape sessions reopen with the fused weights
            pipe.load_lora(lora, 0.8)
        return psnr(step(PROMPT, **self.settings).array, cpu(PROMPT, **self.settings).array)

    def controlnet(self, edges: np.ndarray) -> float:
        from export.controlnet import write_random_controlnet
        from export.onnx_export import export_checkpoint
        from sdengine.backends.ort_cuda import OrtCudaBackend
        from sdengine.model_dir import open_onnx_dir
        from sdengine.pipeline import Pipeline

        shutil.rmtree(self.work / "random-controlnet", ignore_errors=True)  # a rerun writes it again
        controlnet = write_random_controlnet(self.ckpt, self.work / "random-controlnet")
        export_checkpoint(
            self.ckpt, self.work / "tiny-controlnet", components=self.components, controlnets=[controlnet]
        )
        controlled = open_onnx_dir(self.work / "tiny-controlnet")
        control = dict(self.settings, control_image=edges, control_end=0.6)  # weights from the step model
        return psnr(
            Pipeline(controlled, OrtCudaBackend(controlled, device=self.device), self.tok)(
                PROMPT, **control
            ).array,
            Pipeline.load(controlled.root, backend="ort", device="cpu")(PROMPT, **control).array,
        )

    def ip_adapter(self, image: np.ndarray) -> float:
        from export.ip_adapter import write_random_ip_adapter
        from export.onnx_export import export_checkpoint
        from sdengine.backends.ort_cuda import OrtCudaBackend
        from sdengine.model_dir import open_onnx_dir
        from sdengine.pipeline import Pipeline

        shutil.rmtree(self.work / "random-ip-adapter", ignore_errors=True)
        adapter = write_random_ip_adapter(self.ckpt, self.work / "random-ip-adapter")
        export_checkpoint(
            self.ckpt,
            self.work / "tiny-ip",
            components=[*self.components, "image_encoder"],
            ip_adapter=adapter,
        )
        prompted_dir = open_onnx_dir(self.work / "tiny-ip")
        # the image prompt's inputs bound into the graphs
        prompted = dict(self.settings, ip_adapter_image=image)
        return psnr(
            Pipeline(prompted_dir, OrtCudaBackend(prompted_dir, device=self.device), self.tok)(
                PROMPT, **prompted
            ).array,
            Pipeline.load(prompted_dir.root, backend="ort", device="cpu")(PROMPT, **prompted).array,
        )

    def pag(self) -> float:
        from export.onnx_export import export_checkpoint
        from sdengine.backends.ort_cuda import OrtCudaBackend
        from sdengine.model_dir import open_onnx_dir
        from sdengine.pipeline import Pipeline

        layers = ["mid", "down_blocks.1"]  # the tiny model's middle block sees one token at 64x64
        export_checkpoint(self.ckpt, self.work / "tiny-pag", components=self.components, pag_layers=layers)
        perturbable = open_onnx_dir(self.work / "tiny-pag")
        guided = dict(self.settings, pag_scale=3.0)  # the UNet on three copies, pag_rows bound in the graphs
        return psnr(
            Pipeline(perturbable, OrtCudaBackend(perturbable, device=self.device), self.tok)(
                PROMPT, **guided
            ).array,
            Pipeline.load(perturbable.root, backend="ort", device="cpu")(PROMPT, **guided).array,
        )

    def deepcache(self) -> float:
        """A UNet cut for DeepCache: the shallow UNet's graphs between the whole one's, against the CPU."""
        from export.onnx_export import export_checkpoint
        from sdengine.backends.ort_cuda import OrtCudaBackend
        from sdengine.model_dir import open_onnx_dir
        from sdengine.pipeline import Pipeline

        export_checkpoint(self.ckpt, self.work / "tiny-deepcache", components=self.components, deepcache=0)
        cut = open_onnx_dir(self.work / "tiny-deepcache")
        cached = dict(self.settings, deepcache_interval=3)
        return psnr(
            Pipeline(cut, OrtCudaBackend(cut, device=self.device), self.tok)(PROMPT, **cached).array,
            Pipeline.load(cut.root, backend="ort", device="cpu")(PROMPT, **cached).array,
        )

    def freeu(self) -> float:
        """FreeU's scales in an fp16 export (its Fourier filter as matrix products), against diffusers'
        enable_freeu in float16 on the GPU (an FFT in float32)."""
        from export.onnx_export import export_checkpoint
        from sdengine.backends.ort_cuda import OrtCudaBackend
        from sdengine.model_dir import open_onnx_dir
        from sdengine.pipeline import Pipeline

        out = self.work / "tiny-freeu-fp16"
        export_checkpoint(self.ckpt, out, precision="fp16", components=self.components, freeu=True)
        scaled = open_onnx_dir(out)
        settings = dict(self.settings, freeu=(0.9, 0.2, 1.5, 1.6))
        return psnr(
            Pipeline(scaled, OrtCudaBackend(scaled, device=self.device), self.tok)(PROMPT, **settings).array,
            self.torch16(PROMPT, **settings).array,
        )


#: the layers the fused tiny UNet perturbs: two of its self-attention layers (the middle block's sees one
#: token at 64x64, where the perturbation changes nothing)
FUSED_PAG_LAYERS = ["down_blocks.1"]


def xl_parity(work: Path, settings: dict, device: str, results: dict) -> None:
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
    attempt(
        results,
        "SDXL: CUDA vs CPU fp32, PSNR dB",
        lambda: psnr(gpu(PROMPT, **settings).array, cpu(PROMPT, **settings).array),
    )

    def fp16_against_diffusers() -> float:
        half = Pipeline(fp16, OrtCudaBackend(fp16, device=device), cpu.tokenizer)
        torch16 = TorchPipeline.load(ckpt, device=device)
        return psnr(half(PROMPT, **settings).array, torch16(PROMPT, **settings).array)

    attempt(results, "SDXL: fp16 CUDA vs diffusers fp16 GPU, PSNR dB", fp16_against_diffusers)

    def refined() -> float:
        refiner_ckpt = write_random_checkpoint(
            work / "tiny-xl-refiner", "tiny-xl-refiner", seed=0, overwrite=True
        )
        export_checkpoint(refiner_ckpt, work / "tiny-xl-refiner-fp32", components=parts[1:])
        refiner = open_onnx_dir(work / "tiny-xl-refiner-fp32")
        tokenizer = ClipTokenizer.from_dir(refiner.tokenizer_dir)
        gpu.set_refiner(Pipeline(refiner, OrtCudaBackend(refiner, device=device), tokenizer))
        cpu.set_refiner(Pipeline.load(refiner.root, backend="ort", device="cpu"))
        return psnr(gpu(PROMPT, **settings).array, cpu(PROMPT, **settings).array)

    attempt(results, "SDXL with its refiner: CUDA vs CPU fp32, PSNR dB", refined)


def prepare(
    work: Path, preset: str, target: str = "portable", deepcache: int | None = None
) -> tuple[Path, Path, dict[str, float]]:
    """The large random checkpoint and its fp16 export for ``target`` (``portable``, or ``cuda``: the UNet
    fused for ONNX Runtime's CUDA provider; ``deepcache``: portable, cut at that DeepCache branch), each made
    once per machine. ``--prepare TARGET`` makes them in
    the background while the wheel's parts travel (they need torch, diffusers, onnx and ONNX Runtime's Python
    tools, not its GPU build), both targets at once, after one checkpoint; the check then waits for those
    processes, or makes what they did not (none ran, or one died)."""
    ckpt, onnx_dir = work / preset, work / f"{preset}-fp16{'-cuda' if target == 'cuda' else ''}"
    if deepcache is not None:
        onnx_dir = onnx_dir.with_name(f"{onnx_dir.name}-deepcache{deepcache}")

    def checkpoint() -> dict:
        from export.checkpoint import write_random_checkpoint

        log(f"{preset} random checkpoint")
        write_random_checkpoint(ckpt, preset, seed=0, overwrite=True)
        return {}

    def export() -> dict[str, float]:
        from export.onnx_export import export_checkpoint

        once(ckpt.with_name(ckpt.name + ".done.json"), checkpoint)
        log(f"{preset} fp16 export, {target}" + ("" if deepcache is None else f", DeepCache {deepcache}"))
        parts = ["text_encoder", "unet", "vae_decoder"]
        manifest = export_checkpoint(
            ckpt, onnx_dir, precision="fp16", components=parts, target=target, deepcache=deepcache
        )
        export_s = {n: r.export_seconds for n, r in manifest.components.items()}
        log(f"exported ({target}) in {sum(export_s.values()):.0f} s")
        return export_s

    return ckpt, onnx_dir, once(onnx_dir.with_name(onnx_dir.name + ".done.json"), export)


def once(done: Path, make: Callable[[], dict]) -> dict:
    """``make()``'s result, kept in ``done``: made here unless it is there, or another process (named in a
    pid file beside it) is making it, which is then waited for."""
    pid_file = done.with_name(done.name.removesuffix(".done.json") + ".pid")
    while not done.is_file() and pid_file.is_file() and alive(int(pid_file.read_text())):
        time.sleep(2)
    if done.is_file():
        return json.loads(done.read_text())
    pid_file.write_text(str(os.getpid()))
    result = make()
    done.write_text(json.dumps(result))
    pid_file.unlink(missing_ok=True)
    return result


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


#: the check's parts, in the order they run: ``core`` parity rows, ``noise`` (PyTorch's CPU noise against
#: diffusers'), ``fused`` (the CUDA-fused UNet: its parity rows, and it leads the latency runs), ``latency``
#: (every step count), ``extras`` (the other parity rows, after the headline latency), ``ort-graphs``
#: (ONNX Runtime's own graph mode, timed), ``deepcache`` (DeepCache at interval 3 on its own export, timed
#: against diffusers with the authors' helper)
PARTS = ("core", "noise", "fused", "latency", "extras", "ort-graphs", "deepcache")
#: DeepCache's timed interval and branch (the authors' setting for SD 1.5)
DEEPCACHE_INTERVAL, DEEPCACHE_BRANCH = 3, 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gpu-check-out")
    p.add_argument("--work", default="/tmp/sdengine-gpu-check")
    p.add_argument(
        "--steps", default="50,20", help="step counts, the headline (50) first: a cut-short run keeps it"
    )
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--parts", default=",".join(PARTS), help=f"a comma-separated subset of {', '.join(PARTS)}")
    p.add_argument(
        "--rehearse",
        action="store_true",
        help="run the whole script on the CPU with the tiny checkpoint (checks the script, not the GPU; the "
        "fused UNet, which only the CUDA provider runs, is left out)",
    )
    p.add_argument(
        "--prepare",
        choices=(*TARGETS, "deepcache"),
        help="only make the large random checkpoint and its fp16 export for this target (deepcache: the "
        "portable one cut for DeepCache), then exit",
    )
    args = p.parse_args(argv)
    device = "cpu" if args.rehearse else "cuda"
    out, work = Path(args.out), Path(args.work)
    preset, size = ("tiny", 64) if args.rehearse else ("sd15", 512)
    parts = set(args.parts.split(","))
    unknown = parts - set(PARTS)
    if unknown:
        p.error(f"unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    if args.rehearse:
        parts.discard("fused")
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    if args.prepare == "deepcache":
        prepare(work, preset, deepcache=DEEPCACHE_BRANCH)
        return 0
    if args.prepare:
        prepare(work, preset, args.prepare)
        return 0
    info = machine_info()
    has = detect()
    log(f"machine: {info['gpus']}; available: {has}")
    if not has.ort_cuda and not args.rehearse:
        print("gpu_check: ONNX Runtime cannot run on CUDA here (install the onnxruntime-gpu wheel first)")
        return 2
    report: dict = {"machine": info, "availability": vars(has), "latency": {}, "parts": sorted(parts)}

    def guarded(what: str, run: Callable[[], object]) -> object:
        log(what)
        value, error = recorded(run)
        if error:
            report.setdefault("failed", {})[what] = error
        save(report, out)
        return value

    check = None
    if parts & {"core", "noise", "fused", "extras"}:
        check = guarded("parity on the tiny checkpoint: its exports", lambda: Parity(work, device))
        if check is not None:
            report["parity"] = check.results
    if check is not None and "core" in parts:
        guarded("parity: graphs, CUDA against the CPU, fp16 against diffusers", check.core)
    if check is not None and "noise" in parts:
        guarded("parity: PyTorch's CPU noise", check.noise)
    if check is not None and "fused" in parts:
        guarded("parity: the UNet fused for CUDA", check.fused)
    extras_ran: list[bool] = []

    def extras() -> None:  # after the headline latency, or at the end where none ran
        if check is not None and "extras" in parts and not extras_ran:
            extras_ran.append(True)
            guarded("parity: the other paths", check.extras)

    if parts & {"latency", "ort-graphs", "deepcache"}:
        guarded(
            "latency", lambda: latencies(args, parts, work, preset, size, device, has, report, out, extras)
        )
    extras()
    log(f"wrote {out}/gpu_check.json")
    failed = (
        "failed" in report
        or any(str(v).startswith("failed") for v in report.get("parity", {}).values())
        or any("failed" in r for r in report["latency"].values())
    )
    return 1 if failed else 0


def latencies(
    args: argparse.Namespace,
    parts: set[str],
    work: Path,
    preset: str,
    size: int,
    device: str,
    has: Availability,
    report: dict,
    out: Path,
    after_headline: Callable[[], None],
) -> None:
    """The latency runs, the headline first (the fused UNet's, where it is in ``parts``), then
    ``after_headline`` (the other parity rows), then the rest."""
    ckpt, onnx_dir, report["export_s"] = prepare(work, preset)
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
    runs = []
    if "latency" in parts:
        if "fused" in parts:
            _, fused_dir, report["export_s_fused"] = prepare(work, preset, "cuda")
            fused = replace(config, onnx_dir=fused_dir)
            runs += [(f"{n}-fused", replace(fused, steps=n)) for n in step_counts]
            runs.append((str(step_counts[0]), replace(config, backends=("ort",), steps=step_counts[0])))
        else:
            runs += [(str(n), replace(config, steps=n)) for n in step_counts]
        if not args.rehearse:  # the portable export with the CUDA provider's NHWC kernels (a CUDA option)
            nhwc = replace(config, backends=("ort",), steps=step_counts[0], cuda_options=("prefer_nhwc=1",))
            runs.append((f"{step_counts[0]}-nhwc", nhwc))
    if "ort-graphs" in parts:  # ONNX Runtime's own graph mode (a wait for the GPU after each replay)
        n = max(step_counts)
        runs.append((f"{n}-ort-graphs", replace(config, backends=("ort",), graphs="ort", steps=n)))
    if "deepcache" in parts:  # its own export, made when its turn comes; diffusers with the authors' helper
        _, cut_dir, report["export_s_deepcache"] = prepare(work, preset, deepcache=DEEPCACHE_BRANCH)
        cut = replace(config, onnx_dir=cut_dir, engine_dir=None, backends=("ort", "torch"))
        cut = replace(cut, deepcache_interval=DEEPCACHE_INTERVAL, deepcache=DEEPCACHE_BRANCH)
        n = step_counts[0]
        runs.append((f"{n}-deepcache{DEEPCACHE_INTERVAL}", replace(cut, steps=n)))
    for index, (name, run_config) in enumerate(runs):
        log(f"latency {name}: {size}x{size}, batch 1, CFG, {run_config.steps} steps, {run_config.backends}")

        def measure(run_config: BenchConfig = run_config) -> tuple[dict, str]:
            whole = run_config.deepcache_interval == 1  # FLOPs per call hold for whole UNet calls only
            result = run_benchmark(run_config, flops if whole else {})
            return result, format_report(result)

        outcome, error = recorded(measure)
        if error:
            report["latency"][name] = {"failed": error}
        else:
            report["latency"][name], table = outcome
            print(table, flush=True)
            (out / f"gpu_check_{name.replace('-', '_')}_steps.txt").write_text(table + "\n")
        save(report, out)  # after each run, so a check cut short still leaves what it measured
        if index == 0:
            after_headline()


def save(report: dict, out: Path) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
