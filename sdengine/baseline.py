"""The PyTorch baseline: the same request run through diffusers' ``StableDiffusionPipeline`` (and its
``StableDiffusionImg2ImgPipeline`` for image to image).

It is the reference that the engine's images are checked against and its speed is measured against. It takes
the same initial latents as the engine (drawn from the same seed), so both produce the same image; for image
to image, diffusers' two draws (the sample of the image's latent distribution, and the noise added to it)
are replaced by the engine's. Stochastic schedulers draw their per-step noise from torch's generator here and
from numpy's in the engine, so with those the two differ by design. Imports torch and diffusers, which the
lean runtime never does.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from unittest import mock

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from sdengine.denoise import Progress
from sdengine.images import to_unit_range
from sdengine.model_dir import ModelDir, open_checkpoint_dir, weights_variant
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


class ModuleTimer:
    """Times each call of a module through forward hooks: wall clock on the CPU, CUDA events on the GPU
    (no syncs added; the event pairs are read once the run is over)."""

    def __init__(self, module: torch.nn.Module, stage: str, cuda: bool) -> None:
        self.stage, self.cuda, self.marks = stage, cuda, []
        self.hooks = [module.register_forward_pre_hook(self._mark), module.register_forward_hook(self._mark)]

    def _mark(self, *_: object) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter_ns())

    def close(self, times: StageTimes) -> None:
        for hook in self.hooks:
            hook.remove()
        for start, end in zip(self.marks[::2], self.marks[1::2], strict=True):
            times.add(self.stage, int(start.elapsed_time(end) * 1e6) if self.cuda else end - start)


class TorchPipeline(_CallMixin):
    """diffusers' StableDiffusionPipeline behind sdengine's request/result interface."""

    name = "torch"

    def __init__(self, model_dir: ModelDir, pipe: StableDiffusionPipeline, device: str = "cpu") -> None:
        self.model_dir = model_dir
        self.pipe = pipe
        self.device = device
        self._img2img = None

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, device: str = "cpu", threads: int | None = None
    ) -> TorchPipeline:
        """diffusers' pipeline in float32 on the CPU, float16 on a GPU (its usual eager setting)."""
        model_dir = open_checkpoint_dir(path)
        if threads:
            torch.set_num_threads(threads)
        dtype = torch.float16 if device == "cuda" else torch.float32
        pipe = StableDiffusionPipeline.from_pretrained(
            model_dir.root,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            torch_dtype=dtype,
            variant=weights_variant(model_dir.root / "unet"),
        )
        return cls(model_dir, pipe.to(device), device)

    def generate(self, request: GenerationRequest, progress: Progress | None = None) -> GenerationResult:
        pipe, times = self.pipe, StageTimes()
        pipe.scheduler = diffusers_scheduler(request.scheduler, self.model_dir.scheduler_config)
        pipe.set_progress_bar_config(disable=progress is None)
        latents = torch.from_numpy(request.initial_latents(self.model_dir.arch)).to(
            self.device, pipe.unet.dtype
        )
        inputs: dict = {"latents": latents}
        draws: contextlib.AbstractContextManager = contextlib.nullcontext()
        if request.image_to_image:
            pipe, draws = self.image_to_image(), same_draws(request.encoder_noise, lambda _: latents)
            pipe.scheduler = diffusers_scheduler(request.scheduler, self.model_dir.scheduler_config)
            copies = request.batch // len(request.image)  # diffusers wants one image per prompt
            inputs = {"image": np.concatenate([request.image] * copies), "strength": request.strength}
        cuda = self.device == "cuda"
        timers = [ModuleTimer(pipe.text_encoder, "text_encoder", cuda), ModuleTimer(pipe.unet, "unet", cuda)]
        try:
            with times.time("total"), torch.inference_mode(), draws:
                with times.time("denoise"):
                    out = pipe(
                        prompt=list(request.prompts),
                        negative_prompt=list(request.negative_prompts),
                        num_inference_steps=request.steps,
                        guidance_scale=request.guidance,
                        height=request.height,
                        width=request.width,
                        generator=torch.Generator(self.device).manual_seed(request.seed),
                        output_type="latent",
                        **inputs,
                    )
                    final = out.images
                    if cuda:
                        torch.cuda.synchronize()
                with times.time("vae_decode"):
                    decoded = pipe.vae.decode(final / pipe.vae.config.scaling_factor, return_dict=False)[0]
                    if cuda:
                        torch.cuda.synchronize()
        finally:
            for timer in timers:
                timer.close(times)
        array = to_unit_range(decoded.float().cpu().numpy())
        return GenerationResult(array, request, times, self.name, final.float().cpu().numpy())

    def image_to_image(self):
        """diffusers' image-to-image pipeline on the same modules (made once)."""
        if self._img2img is None:
            from diffusers import StableDiffusionImg2ImgPipeline

            self._img2img = StableDiffusionImg2ImgPipeline(
                **self.pipe.components, requires_safety_checker=False
            )
            self._img2img.set_progress_bar_config(disable=True)
        return self._img2img


@contextlib.contextmanager
def same_draws(
    encoder_noise: Callable[[tuple[int, ...]], object], added_noise: Callable[[tuple[int, ...]], object]
) -> Iterator[None]:
    """Within the block, diffusers' image to image samples the image's latent distribution with
    ``encoder_noise(shape)`` and noises the result with ``added_noise(shape)``: the engine's draws."""
    from diffusers.models.autoencoders import vae
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as img2img

    def replace(draw: Callable[[tuple[int, ...]], object]) -> Callable[..., torch.Tensor]:
        def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None) -> torch.Tensor:
            value = torch.as_tensor(draw(tuple(shape)))
            assert tuple(value.shape) == tuple(shape), (tuple(value.shape), tuple(shape))
            return value.to(device=device, dtype=dtype)

        return randn_tensor

    with (
        mock.patch.object(vae, "randn_tensor", replace(encoder_noise)),
        mock.patch.object(img2img, "randn_tensor", replace(added_noise)),
    ):
        yield
