"""Text to image: tokenize, encode, denoise, decode — on any backend, from one loaded model directory."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image

from sdengine.backends.base import Backend, DenoisePlan
from sdengine.backends.ort import OrtBackend
from sdengine.backends.select import Choice, choose, detect, model_kind
from sdengine.denoise import Progress, denoise
from sdengine.images import to_pil, to_unit_range
from sdengine.model_dir import ModelDir, open_onnx_dir
from sdengine.request import DEFAULT_GUIDANCE, DEFAULT_STEPS, GenerationRequest, make_request
from sdengine.schedulers import load_scheduler
from sdengine.step_graph import step_tables
from sdengine.timing import StageTimes
from sdengine.tokenizer import ClipTokenizer


@dataclass
class GenerationResult:
    """Images as float arrays (B, H, W, 3) in [0, 1] and as PIL, the request, and per-stage timings."""

    array: np.ndarray
    request: GenerationRequest
    times: StageTimes
    backend: str
    latents: np.ndarray = field(repr=False)

    @property
    def images(self) -> list[Image.Image]:
        return to_pil(self.array)


class ImageGenerator(Protocol):
    """What every loaded pipeline offers, whatever runs it."""

    model_dir: ModelDir
    choice: Choice | None

    def generate(self, request: GenerationRequest, progress: Progress | None = None) -> GenerationResult: ...


class _CallMixin:
    model_dir: ModelDir
    choice: Choice | None = None

    def generate(self, request: GenerationRequest, progress: Progress | None = None) -> GenerationResult:
        raise NotImplementedError

    def request(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        *,
        steps: int = DEFAULT_STEPS,
        guidance: float = DEFAULT_GUIDANCE,
        scheduler: str | None = None,
        seed: int | None = None,
        height: int | None = None,
        width: int | None = None,
        batch: int | None = None,
        latents: np.ndarray | None = None,
    ) -> GenerationRequest:
        """A checked request; height and width default to the model's native size."""
        size = self.model_dir.default_image_size
        return make_request(
            prompt,
            negative_prompt,
            steps=steps,
            guidance=guidance,
            scheduler=scheduler,
            seed=seed,
            height=size if height is None else height,
            width=size if width is None else width,
            batch=batch,
            latents=latents,
            size_multiple=self.model_dir.arch.vae_scale_factor,
        )

    def __call__(
        self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, **settings: Any
    ) -> GenerationResult:
        progress = settings.pop("progress", None)
        return self.generate(self.request(prompt, negative_prompt, **settings), progress)


class Pipeline(_CallMixin):
    """The lean runtime: load once, call many times. ``Pipeline.load(onnx_dir)("a photo of a cat")``."""

    def __init__(self, model_dir: ModelDir, backend: Backend, tokenizer: ClipTokenizer) -> None:
        self.model_dir = model_dir
        self.backend = backend
        self.tokenizer = tokenizer

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        backend: str = "auto",
        device: str | None = None,
        threads: int | None = None,
        optimized_cache: bool = False,
    ) -> ImageGenerator:
        """Load a model directory: an ONNX export (``ort``), a TensorRT engine directory (``trt``) or a
        diffusers checkpoint (``torch``). ``auto`` picks by directory and hardware; ``.choice`` says which.
        ``optimized_cache``: on the CPU, keep ONNX Runtime's optimised graphs per machine for fast starts."""
        kind = model_kind(path)
        gpu_matters = device != "cpu"  # an explicit CPU run needs no CUDA probe
        has = detect(torch_cuda=gpu_matters and kind == "checkpoint", ort_cuda=gpu_matters)
        choice = choose(backend, device, kind, has)
        if choice.backend == "torch":
            from sdengine.baseline import TorchPipeline

            pipeline: ImageGenerator = TorchPipeline.load(path, device=choice.device, threads=threads)
        elif choice.backend == "trt":
            from sdengine.backends.trt import TrtBackend

            trt_backend = TrtBackend.load(path)
            model_dir = trt_backend.model_dir
            pipeline = cls(model_dir, trt_backend, ClipTokenizer.from_dir(model_dir.tokenizer_dir))
        else:
            model_dir = open_onnx_dir(path)
            tokenizer = ClipTokenizer.from_dir(model_dir.tokenizer_dir)
            if choice.device == "cuda":
                from sdengine.backends.ort_cuda import OrtCudaBackend

                ort_backend: Backend = OrtCudaBackend(model_dir, threads=threads)
            else:
                ort_backend = OrtBackend(model_dir, threads=threads, optimized_cache=optimized_cache)
            pipeline = cls(model_dir, ort_backend, tokenizer)
        pipeline.choice = choice
        return pipeline

    def generate(self, request: GenerationRequest, progress: Progress | None = None) -> GenerationResult:
        arch = self.model_dir.arch
        times = StageTimes()
        with times.time("total"):
            schedule = load_scheduler(request.scheduler, self.model_dir.scheduler_config).schedule(
                request.steps
            )
            cfg = request.classifier_free_guidance
            with times.time("tokenize"):
                ids = self.tokenizer(
                    [*request.negative_prompts, *request.prompts] if cfg else request.prompts
                )
            with times.time("text_encoder"):
                context = self.backend.encode_text(ids)
            latents = request.initial_latents(arch) * np.float32(schedule.init_noise_sigma)
            plan = DenoisePlan(
                latents=latents,
                context=context,
                tables=step_tables(schedule, request.step_noise(schedule, latents.shape)),
                guidance=request.guidance if cfg else None,
            )
            with times.time("denoise"):
                latents = denoise(self.backend, plan, times, progress)
            with times.time("vae_decode"):
                decoded = self.backend.decode_latents(latents / np.float32(self.model_dir.vae_scaling_factor))
        return GenerationResult(to_unit_range(decoded), request, times, self.backend.name, latents)
