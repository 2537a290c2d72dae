"""The PyTorch baseline: the same request run through diffusers' ``StableDiffusionPipeline``.

It is the reference that the engine's images are checked against and its speed is measured against. It takes
the same initial latents as the engine (drawn from the same seed), so both produce the same image. Stochastic
schedulers draw their per-step noise from torch's generator here and from numpy's in the engine, so with those
the two differ by design. Imports torch and diffusers, which the lean runtime never does.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from sdengine.denoise import Progress
from sdengine.images import to_unit_range
from sdengine.model_dir import ModelDir, open_checkpoint_dir
from sdengine.pipeline import GenerationResult, _CallMixin
from sdengine.request import GenerationRequest
from sdengine.schedulers import diffusers_scheduler_class, load_scheduler
from sdengine.timing import StageTimes


def diffusers_scheduler(name: str | None, config: dict):
    """The diffusers scheduler ``name`` stands for, built from the checkpoint's config as diffusers would."""
    import diffusers

    ours = load_scheduler(name, config)  # validates the name and the config the same way as the engine
    class_name, overrides = diffusers_scheduler_class(ours.name)
    return getattr(diffusers, class_name).from_config(config, **overrides)


def _time_module(module: torch.nn.Module, stage: str, times: StageTimes) -> list:
    start: list[int] = []

    def before(*_: object) -> None:
        start.append(time.perf_counter_ns())

    def after(*_: object) -> None:
        times.add(stage, time.perf_counter_ns() - start.pop())

    return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]


class TorchPipeline(_CallMixin):
    """diffusers' StableDiffusionPipeline behind sdengine's request/result interface."""

    name = "torch"

    def __init__(self, model_dir: ModelDir, pipe: StableDiffusionPipeline) -> None:
        self.model_dir = model_dir
        self.pipe = pipe

    @classmethod
    def load(cls, path: str | os.PathLike, *, threads: int | None = None) -> TorchPipeline:
        model_dir = open_checkpoint_dir(path)
        if threads:
            torch.set_num_threads(threads)
        pipe = StableDiffusionPipeline.from_pretrained(
            model_dir.root, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
        return cls(model_dir, pipe)

    def generate(self, request: GenerationRequest, progress: Progress | None = None) -> GenerationResult:
        pipe, times = self.pipe, StageTimes()
        pipe.scheduler = diffusers_scheduler(request.scheduler, self.model_dir.scheduler_config)
        pipe.set_progress_bar_config(disable=progress is None)
        latents = torch.from_numpy(request.initial_latents(self.model_dir.arch))
        hooks = _time_module(pipe.text_encoder, "text_encoder", times) + _time_module(
            pipe.unet, "unet", times
        )
        try:
            with times.time("total"), torch.inference_mode():
                out = pipe(
                    prompt=list(request.prompts),
                    negative_prompt=list(request.negative_prompts),
                    num_inference_steps=request.steps,
                    guidance_scale=request.guidance,
                    height=request.height,
                    width=request.width,
                    latents=latents,
                    generator=torch.Generator().manual_seed(request.seed),
                    output_type="latent",
                )
                final = out.images
                with times.time("vae_decode"):
                    decoded = pipe.vae.decode(final / pipe.vae.config.scaling_factor, return_dict=False)[0]
        finally:
            for hook in hooks:
                hook.remove()
        array = to_unit_range(decoded.float().numpy())
        return GenerationResult(array, request, times, self.name, np.asarray(final.float().numpy()))
