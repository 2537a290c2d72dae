"""The PyTorch baseline: the same request run through diffusers' ``StableDiffusionPipeline`` (and its
``StableDiffusionImg2ImgPipeline`` for image to image, ``StableDiffusionInpaintPipeline`` for inpainting).

It is the reference that the engine's images are checked against and its speed is measured against. It takes
the same initial latents as the engine (drawn from the same seed), so both produce the same image; for image
to image and inpainting, diffusers' draws (the samples of the image's and the masked image's latent
distributions, and the noise added to the image) are replaced by the engine's, and so is the per-step noise
of stochastic schedulers (Euler ancestral, LCM, DPM++ 2M SDE): every random draw of a run is the engine's,
so those compare as exactly as the others. Imports torch and diffusers, which the lean runtime never does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from sdengine.apg import APG
from sdengine.deepcache import CacheBranch
from sdengine.denoise import Preview, Progress, Stop
from sdengine.errors import BackendUnavailableError, UnsupportedConfigError
from sdengine.freeu import FreeUScales
from sdengine.images import image_array, to_pil, to_unit_range
from sdengine.model_dir import ModelDir, open_checkpoint_dir, weights_variant
from sdengine.pag import DEFAULT_PAG_LAYERS
from sdengine.pipeline import GenerationResult, _CallMixin
from sdengine.prompt_editing import PromptEdits
from sdengine.request import GenerationRequest
from sdengine.schedulers import CustomSteps, diffusers_scheduler_class, load_scheduler
from sdengine.timing import StageTimes
from sdengine.vae_tiling import check_tileable


def diffusers_scheduler(name: str | None, config: dict, custom: CustomSteps | None = None):
    """The diffusers scheduler ``name`` stands for, built from the checkpoint's config as diffusers would;
    with ``custom`` sigmas its class's ``set_timesteps`` does not take, set to give them
    (:func:`sigmas_in_place`)."""
    import diffusers

    ours = load_scheduler(name, config, custom)  # validates the name and the config as the engine does
    class_name, overrides = diffusers_scheduler_class(ours.name)
    scheduler = getattr(diffusers, class_name).from_config(config, **overrides)
    if custom is not None and not diffusers_takes(scheduler, custom.kind):
        return sigmas_in_place(scheduler, custom.values)
    return scheduler


def diffusers_takes(scheduler: Any, kind: str) -> bool:
    """Whether a diffusers scheduler's ``set_timesteps`` takes custom ``kind`` ("timesteps" or "sigmas") for
    the schedulers sdengine runs them with: timesteps all of them, sigmas Euler's alone (UniPC's takes them
    for flow-matching models only)."""
    return kind == "timesteps" or type(scheduler).__name__ == "EulerDiscreteScheduler"


def sigmas_in_place(scheduler: Any, sigmas: Sequence[float]) -> Any:
    """``scheduler`` (a diffusers scheduler, changed in place) made to run ``sigmas`` (ending in 0) when its
    ``set_timesteps`` is asked for ``len(sigmas) - 1`` steps: diffusers' own code, with the sigmas put where
    its classes take them from. A class with Karras sigmas gets them in the place of those (its Karras path
    then derives the timesteps and every other table from them, as sdengine's schedulers do with custom
    sigmas); Euler ancestral, which has none, gets them after its ``set_timesteps``, with the timesteps at
    their log-sigma positions (its Euler sibling's ``_sigma_to_t``)."""
    import diffusers

    body = np.array(sigmas[:-1], dtype=np.float64)
    # (the class's arguments, not its config, which may hold keys the class does not take)
    if "use_karras_sigmas" in inspect.signature(type(scheduler).__init__).parameters:
        scheduler.register_to_config(
            use_karras_sigmas=True, use_exponential_sigmas=False, use_beta_sigmas=False
        )
        scheduler._convert_to_karras = lambda *_, **__: body.copy()
        return scheduler
    original = scheduler.set_timesteps

    def set_timesteps(num_inference_steps: int, device: Any = None) -> None:
        original(num_inference_steps, device)
        abar = scheduler.alphas_cumprod.numpy().astype(np.float64)
        log_sigmas = np.log(((1 - abar) / abar) ** 0.5)
        to_t = diffusers.EulerDiscreteScheduler._sigma_to_t
        timesteps = np.array([to_t(scheduler, sigma, log_sigmas) for sigma in body], dtype=np.float32)
        scheduler.timesteps = torch.from_numpy(timesteps).to(device)
        scheduler.sigmas = torch.tensor(np.asarray(sigmas, np.float32)).to(device)

    scheduler.set_timesteps = set_timesteps
    return scheduler


def custom_arguments(pipe: Any, request: GenerationRequest) -> dict[str, list[float]]:
    """The request's custom timesteps or sigmas as ``pipe`` takes them (``timesteps=`` or ``sigmas=``),
    none where its scheduler gives them itself (:func:`sigmas_in_place`); UnsupportedConfigError for a
    pipeline that takes none (diffusers' ControlNet image to image and inpainting)."""
    custom = request.custom
    assert custom is not None
    if not diffusers_takes(pipe.scheduler, custom.kind):
        return {}
    if custom.kind not in inspect.signature(pipe.__call__).parameters:
        raise UnsupportedConfigError(
            f"the torch backend: diffusers' {type(pipe).__name__} takes no custom {custom.kind}"
        )
    return custom.parameters()


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
        # (a call cut short by an exception leaves its start unmatched: not timed, and not in its way)
        for start, end in zip(self.marks[::2], self.marks[1::2], strict=False):
            times.add(self.stage, int(start.elapsed_time(end) * 1e6) if self.cuda else end - start)


class TorchPipeline(_CallMixin):
    """diffusers' StableDiffusionPipeline behind sdengine's request/result interface."""

    name = "torch"

    def __init__(
        self,
        model_dir: ModelDir,
        pipe: StableDiffusionPipeline,
        device: str = "cpu",
        controlnet: torch.nn.Module | None = None,
        pag_layers: Sequence[str] = DEFAULT_PAG_LAYERS,
    ) -> None:
        """``controlnet``: a diffusers ``ControlNetModel`` or ``MultiControlNetModel``, run by diffusers'
        ControlNet pipelines. ``pag_layers``: where diffusers' PAG pipelines perturb the self-attention
        (their ``pag_applied_layers``) when a request asks for perturbed-attention guidance."""
        self.model_dir = model_dir
        self.pipe = pipe
        self.device = device
        self.controlnet = controlnet
        self.pag_layers = tuple(pag_layers)
        self._image_pipelines: dict[tuple[str, tuple[str, ...]], Any] = {}
        self._loras = 0  # LoRAs fused so far (each is loaded under its own adapter name)
        #: a tiny VAE (diffusers' ``AutoencoderTiny``) whose decoder draws ``tiny`` previews, if loaded
        self.preview_vae: torch.nn.Module | None = None
        #: the DeepCache branch requests with a ``deepcache_interval`` run at (None: none)
        self.deepcache_branch: int | None = None

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        device: str = "cpu",
        threads: int | None = None,
        vae_tiling: bool = False,
        controlnets: Sequence[str | os.PathLike] = (),
        safety_checker: bool = True,
        ip_adapter: str | os.PathLike | None = None,
        pag_layers: Sequence[str] | None = None,
        seamless: bool = False,
        preview_vae: str | os.PathLike | None = None,
        deepcache: int | None = None,
    ) -> TorchPipeline:
        """diffusers' pipeline in float32 on the CPU, float16 on a GPU (its usual eager setting);
        ``vae_tiling``: its VAE's ``enable_tiling()``; ``controlnets``: ControlNet directories, each then
        taking a control image, run by diffusers' ControlNet pipelines; ``safety_checker``: the checkpoint's,
        where it has one, as diffusers loads and runs it by default; ``ip_adapter``: an IP-Adapter weights
        file, loaded by diffusers' ``load_ip_adapter`` with the image encoder beside it; ``pag_layers``: where
        diffusers' PAG pipelines perturb the self-attention when a request asks for it (default ``mid``;
        layers given are checked here, the default at the first such request); ``seamless``: the
        UNet's and VAE's convolutions wrap around the edges (``export.seamless``), so the images tile.
        ``preview_vae``: a tiny VAE folder (``AutoencoderTiny``) whose decoder draws ``tiny`` previews, as
        an export's ``--preview-vae`` does. ``deepcache``: the DeepCache branch that requests with a
        ``deepcache_interval`` run at, by the authors' ``DeepCacheSDHelper`` (checked here)."""
        model_dir = open_checkpoint_dir(path)
        if vae_tiling:
            check_tileable(model_dir.arch)
        if threads:
            torch.set_num_threads(threads)
        dtype = torch.float16 if device == "cuda" else torch.float32
        variant = weights_variant(model_dir.root / "unet")
        if model_dir.arch.xl:  # the refiner is an image-to-image pipeline
            import diffusers

            kind = "Img2Img" if model_dir.arch.aesthetic else ""
            pipe = getattr(diffusers, f"StableDiffusionXL{kind}Pipeline").from_pretrained(
                model_dir.root, torch_dtype=dtype, variant=variant
            )
        else:
            checker = safety_checker and (model_dir.root / "safety_checker" / "config.json").is_file()
            without = {} if checker else {"safety_checker": None, "feature_extractor": None}
            pipe = StableDiffusionPipeline.from_pretrained(
                model_dir.root, **without, requires_safety_checker=False, torch_dtype=dtype, variant=variant
            )
        if vae_tiling:
            pipe.vae.enable_tiling()
        if pag_layers is not None:
            from export.pag import check_pag_layers

            check_pag_layers(pipe.unet, pag_layers)
        if seamless:
            from export.seamless import make_seamless

            make_seamless(pipe.unet)
            make_seamless(pipe.vae)
        if ip_adapter is not None:
            from export.ip_adapter import ENCODER_FOLDER, check_ip_adapter

            file = Path(ip_adapter).resolve()
            check_ip_adapter(model_dir.root, file)
            pipe.load_ip_adapter(
                str(file.parent), subfolder="", weight_name=file.name, image_encoder_folder=ENCODER_FOLDER
            )
            pipe.image_encoder.to(dtype)
        controlnet = None
        if controlnets:
            from diffusers import MultiControlNetModel

            from export.controlnet import check_controlnets, controlnet_directory, load_controlnets

            paths = [controlnet_directory(Path(p), model_dir.root) for p in controlnets]  # files converted
            check_controlnets(model_dir.root, model_dir.arch, paths)
            nets = load_controlnets(paths, dtype)
            controlnet = (nets[0] if len(nets) == 1 else MultiControlNetModel(nets)).to(device)
        model_dir = dataclasses.replace(model_dir, seamless=seamless)  # for the record (request.seamless)
        if deepcache is not None:
            from export.deepcache import branch_shape, check_controlled_branch

            shape = branch_shape(pipe.unet, CacheBranch(deepcache))
            check_controlled_branch(shape, CacheBranch(deepcache), bool(controlnets))
            arch = dataclasses.replace(
                model_dir.arch, deepcache_channels=shape.channels, deepcache_downscale=shape.downscale
            )
            model_dir = dataclasses.replace(model_dir, arch=arch)
        layers = DEFAULT_PAG_LAYERS if pag_layers is None else pag_layers
        loaded = cls(model_dir, pipe.to(device), device, controlnet, layers)
        loaded.deepcache_branch = deepcache
        if preview_vae is not None:
            from diffusers import AutoencoderTiny

            from export.seamless import make_seamless
            from export.vae_override import preview_vae_source

            source = preview_vae_source(preview_vae, model_dir.root)
            tiny = AutoencoderTiny.from_pretrained(source, torch_dtype=dtype)
            if seamless:
                make_seamless(tiny)
            loaded.preview_vae = tiny.to(device).eval()
        return loaded

    @property
    def tiny_previews(self) -> bool:
        return self.preview_vae is not None

    def tiny_preview_images(self, latents: np.ndarray) -> np.ndarray:
        """Latents as the UNet sees them -> images (B, H, W, 3) in [0, 1], through the tiny VAE's decoder."""
        with torch.inference_mode():
            decoded = self.decode_tiny(torch.from_numpy(latents).to(self.device))
        return to_unit_range(decoded.float().cpu().numpy())

    def decode_tiny(self, latents: torch.Tensor) -> torch.Tensor:
        """The preview VAE's decoder on latents as the UNet sees them (divided by its scaling factor here)."""
        vae = self.preview_vae
        assert vae is not None, "request() asks for the tiny decoder only where there is one"
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]

    @property
    def controlnets(self) -> int:
        if self.controlnet is None:
            return 0
        return len(getattr(self.controlnet, "nets", [self.controlnet]))

    @property
    def ip_adapter(self) -> bool:
        return getattr(self.pipe, "image_encoder", None) is not None

    @property
    def pag(self) -> bool:
        """diffusers perturbs any UNet's self-attention at run time."""
        return True

    @property
    def freeu(self) -> bool:
        """diffusers' ``enable_freeu`` runs FreeU on any UNet."""
        return True

    def generate(
        self,
        request: GenerationRequest,
        progress: Progress | None = None,
        preview: Preview | None = None,
        stop: Stop | None = None,
    ) -> GenerationResult:
        if request.composable:
            raise UnsupportedConfigError(
                "composable prompts (the web UI's AND, or a part's :weight) run on the ort and trt backends; "
                "diffusers' pipelines guide one prompt"
            )
        if request.masked_content != "original" and not request.starts_from_noise:
            raise UnsupportedConfigError(
                f"masked content {request.masked_content!r} (the web UI's latent fills) runs on the ort and "
                "trt backends: diffusers' inpainting pipelines start from the image's own latents"
            )
        if set(request.control_modes) - {"balanced"} and set(request.control_modes) != {"guess"}:
            raise UnsupportedConfigError(
                "on the torch backend all ControlNets run balanced or all in guess mode (diffusers' "
                "guess_mode): the web UI's control modes, and modes mixed, run on the ort and trt backends"
            )
        times, cuda = StageTimes(), self.device == "cuda"
        with times.time("total"):
            final = self.denoised_passes(request, times, progress, preview, stop)
            with times.time("vae_decode"), torch.inference_mode():
                model = self.final_model(request)
                tiny = request.decoder == "tiny" and model.tiny_previews
                decoded = model.decode_tiny(final) if tiny else model.decode(final)
                if cuda:
                    torch.cuda.synchronize()
        nsfw = None
        if (
            getattr(self.pipe, "safety_checker", None) is not None
        ):  # SDXL's pipelines have none  # diffusers' own check; flagged images come out black
            with times.time("safety_checker"), torch.inference_mode():
                decoded, nsfw = self.pipe.run_safety_checker(decoded, self.device, decoded.dtype)
            nsfw = [bool(f) for f in nsfw]
        array = to_unit_range(decoded.float().cpu().numpy())
        if nsfw:
            array[np.asarray(nsfw)] = 0.0  # diffusers does not denormalise a flagged image: black
        if request.mask_crop is not None:  # laid back into the original by diffusers' own overlay
            crop, overlay = request.mask_crop, self.pipe.image_processor.apply_overlay
            laid = [overlay(crop.mask, crop.original, image, crop.box) for image in to_pil(array)]
            array = image_array(laid, crop.original.height, crop.original.width)
        return GenerationResult(array, request, times, self.name, self.host_latents(final), nsfw)

    def denoised(
        self,
        request: GenerationRequest,
        times: StageTimes,
        progress: Progress | None = None,
        preview: Preview | None = None,
        stop: Stop | None = None,
    ) -> torch.Tensor:
        """One pass of ``request`` through diffusers' pipeline for it, with the engine's draws: the final
        latents."""
        pipe = self.pipe
        pipe.scheduler = diffusers_scheduler(
            request.scheduler, self.model_dir.scheduler_config, request.custom
        )
        pipe.set_progress_bar_config(disable=True)  # ``progress`` wraps the calls instead (step_end_callback)
        latents = torch.from_numpy(request.initial_latents(self.model_dir.arch)).to(
            self.device, pipe.unet.dtype
        )
        inputs: dict = {"latents": latents}
        draws: contextlib.AbstractContextManager = contextlib.nullcontext()
        xl = self.model_dir.arch.xl
        control = request.control is not None
        pag = bool(request.pag_scale)
        if pag and (request.prompt_weights or self.model_dir.arch.aesthetic):
            raise UnsupportedConfigError(
                "the torch backend's perturbed-attention guidance (diffusers' PAG pipelines) takes no prompt "
                "weights or refiner model here"
            )
        if (
            pag
            and control
            and request.image_to_image
            and not self.model_dir.arch.xl
            and not request.inpainting
        ):
            raise UnsupportedConfigError("diffusers has no SD 1.x/2.x ControlNet PAG image-to-image pipeline")
        if pag:
            pipe = self.image_pipeline("", control, pag=True)
        if request.inpainting and request.denoising_start is not None:  # a refiner's part: latents in
            pipe = self.image_pipeline("Inpaint", control, pag)
            draws = same_draws([], lambda _: latents, type(pipe).__module__)  # no image to encode
            inputs = {
                "image": torch.from_numpy(request.init_latents),
                "mask_image": per_prompt(request.mask, request.batch)[..., None],
                "strength": request.strength,
                "denoising_start": request.denoising_start,
            }
        elif request.inpainting:
            pipe = self.image_pipeline("Inpaint", control, pag)
            encoded = [request.masked_encoder_noise]  # diffusers encodes the image first where it needs it
            if not request.starts_from_noise or not self.model_dir.arch.inpainting_unet:
                encoded.insert(0, request.encoder_noise)
            draws = same_draws(self.encoder_draws(encoded), lambda _: latents, type(pipe).__module__)
            inputs = {
                "image": per_prompt(request.image, request.batch),
                "mask_image": per_prompt(request.mask, request.batch)[..., None],
                "strength": request.strength,
            }
        elif request.init_latents is not None:  # the hires fix's second pass, or a refiner's part: latents
            pipe = self.image_pipeline("Img2Img", control, pag)
            draws = same_draws([], lambda _: latents, type(pipe).__module__)
            inputs = {"image": torch.from_numpy(request.init_latents), "strength": request.strength}
            if request.denoising_start is not None:  # as they are, not noised again
                inputs["denoising_start"] = request.denoising_start
        elif request.image_to_image:
            pipe = self.image_pipeline("Img2Img", control, pag)
            draws = same_draws(
                self.encoder_draws([request.encoder_noise]), lambda _: latents, type(pipe).__module__
            )
            inputs = {"image": per_prompt(request.image, request.batch), "strength": request.strength}
        elif control:
            pipe = self.image_pipeline("", control, pag)
            inputs = {"latents": latents}
        if control:
            images = [per_prompt(c, request.batch) for c in request.control]
            inputs["image" if "image" not in inputs else "control_image"] = (
                images if len(images) > 1 else images[0]
            )
            one = len(request.control_scales) == 1  # a single ControlNet takes single values
            for name, values in (
                ("controlnet_conditioning_scale", request.control_scales),
                ("control_guidance_start", request.control_starts),
                ("control_guidance_end", request.control_ends),
            ):
                inputs[name] = values[0] if one else list(values)
            if set(request.control_modes) == {"guess"}:
                inputs["guess_mode"] = True
        if pag:
            inputs.update(pag_scale=request.pag_scale, pag_adaptive_scale=request.pag_adaptive_scale)
        if pipe is not self.pipe:
            pipe.scheduler = diffusers_scheduler(
                request.scheduler, self.model_dir.scheduler_config, request.custom
            )
        if xl:
            inputs.update(xl_size_arguments(request))
        if request.guidance_rescale:  # the pipelines that take it: SDXL's but its ControlNet ones, SD's plain
            if "guidance_rescale" not in inspect.signature(pipe.__call__).parameters:
                raise UnsupportedConfigError(f"diffusers' {type(pipe).__name__} has no guidance_rescale")
            inputs["guidance_rescale"] = request.guidance_rescale
        if request.custom is not None:
            inputs.update(custom_arguments(pipe, request))
        if self.ip_adapter:
            inputs.update(self.image_prompt(request))
        if request.refiner_switch is not None:
            if not xl or control:
                raise UnsupportedConfigError(
                    "only diffusers' SDXL pipelines without ControlNet hand a run over to a refiner"
                )
            inputs["denoising_end"] = request.refiner_switch
        schedule = request.schedule(self.model_dir.scheduler_config)
        edits = request.prompt_edits(
            schedule, request.run_schedule(self.model_dir.scheduler_config, schedule)
        )
        step_noise = request.step_noise(schedule, request.latent_shape(self.model_dir.arch))
        generator: Any = torch.Generator(self.device).manual_seed(request.seed)  # unread: the draws are ours
        if request.noise_source == "torch-cpu":  # diffusers' own draws, from one CPU generator per image
            generator = [torch.Generator("cpu").manual_seed(seed) for seed in request.seeds]
            draws = contextlib.nullcontext()  # none of the engine's
            if request.variation_strength:  # the seed's initial latents are drawn, then moved
                for g in generator:
                    torch.randn(latents.shape[1:], generator=g)
            elif request.latents is None:
                inputs.pop("latents", None)  # diffusers draws them (image to image takes none)
        else:
            draws = stacked(draws, same_step_noise(pipe.scheduler, step_noise))
        # no negative prompt: None, which an SDXL pipeline reads as zeros (force_zeros_for_empty_prompt)
        negatives = None if request.default_negative else list(request.negative_prompts)
        prompts: dict = {"prompt": list(request.prompts), "negative_prompt": negatives}
        cuda = self.device == "cuda"
        encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
        timers = [ModuleTimer(e, "text_encoder", cuda) for e in encoders] + [
            ModuleTimer(pipe.unet, "unet", cuda)
        ]
        try:
            with (
                torch.inference_mode(),
                draws,
                self.deep_cache(pipe, request.deepcache_interval),
                free_u(pipe, request.freeu, deepcache=request.deepcache_interval > 1),
                adaptive_projected(pipe, request.apg, request.guidance),
            ):
                call_embeds = None  # every call's prompt embeddings (the UNet's batch), where they change
                if xl:
                    if request.prompt_weights == "compel":
                        prompts = self.xl_compel_embeddings(pipe, request)
                    elif request.prompt_weights == "a1111":
                        prompts, call_embeds = self.xl_edited_embeddings(pipe, request, edits)
                    elif request.clip_skip or request.long_prompts:
                        prompts = self.xl_embeddings(pipe, request)
                elif request.prompt_weights == "a1111":
                    prompts, call_embeds = self.edited_embeddings(pipe, request, edits)
                elif request.clip_skip or request.long_prompts or request.prompt_weights:
                    prompts = self.embeddings(pipe, request)
                with times.time("denoise"):
                    out = pipe(
                        **prompts,
                        **self.step_end_callback(preview, len(step_noise), call_embeds, stop, progress),
                        num_inference_steps=request.steps,
                        guidance_scale=request.guidance,
                        **sized(pipe, request),
                        generator=generator,
                        output_type="latent",
                        **inputs,
                    )
                    if cuda:
                        torch.cuda.synchronize()
        finally:
            for timer in timers:
                timer.close(times)
        return out.images

    @contextlib.contextmanager
    def deep_cache(self, pipe: Any, interval: int) -> Iterator[None]:
        """DeepCache on ``pipe``'s UNet for one run, by the authors' ``DeepCacheSDHelper`` (their package,
        ``DeepCache``), at this pipeline's branch; interval 1: nothing."""
        if interval == 1:
            yield
            return
        if self.deepcache_branch is None:  # (the request's check refuses it first)
            raise UnsupportedConfigError("deepcache_interval needs a DeepCache branch: load with deepcache=0")
        try:
            from DeepCache import DeepCacheSDHelper
        except ImportError:
            raise BackendUnavailableError(
                "the torch baseline runs DeepCache by the authors' package: pip install DeepCache"
            ) from None
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=self.deepcache_branch)
        helper.enable()
        try:
            yield
        finally:
            helper.disable()

    @staticmethod
    def step_end_callback(
        preview: Preview | None,
        num_calls: int,
        call_embeds: list[dict[str, torch.Tensor]] | None = None,
        stop: Stop | None = None,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """diffusers' ``callback_on_step_end`` arguments that hand ``preview`` the latents after its calls,
        give each call after the first its prompt embeddings from ``call_embeds`` (edited prompts), skip
        the calls after ``stop`` answers True (diffusers' own ``interrupt``, which keeps the latents so
        far), and step ``progress`` (the engine's loop wrapper) through the calls as the engine's loop
        does: its first call is asked for now, before the loop starts, and each next one after a call."""
        if preview is None and call_embeds is None and stop is None and progress is None:
            return {}
        ticks = iter(progress(range(num_calls))) if progress is not None else None
        if ticks is not None:
            next(ticks, None)

        def on_step_end(pipe: Any, i: int, t: Any, tensors: dict[str, torch.Tensor]) -> dict:
            if ticks is not None:
                next(ticks, None)  # a wrapper that raises stops the run here, between two calls
            if stop is not None and i + 1 < num_calls and stop():
                pipe._interrupt = True  # noqa: SLF001 - the flag diffusers' loop reads
            if preview is not None and preview.due(i + 1, num_calls):
                preview.callback(i + 1, tensors["latents"].float().cpu().numpy())
            if call_embeds is not None and i + 1 < num_calls:
                return dict(call_embeds[i + 1])  # the next call's (both halves with guidance)
            return {}

        return {"callback_on_step_end": on_step_end, "callback_on_step_end_tensor_inputs": ["latents"]}

    def image_prompt(self, request: GenerationRequest) -> dict[str, Any]:
        """diffusers' IP-Adapter arguments: the image prompt at its weight; without one, zero embeddings at
        weight 0 (diffusers' loaded adapter wants one or the other)."""
        if request.ip_image is not None:
            self.pipe.set_ip_adapter_scale(request.ip_scale)
            return {"ip_adapter_image": to_pil(request.ip_image)[0]}
        from diffusers.models.embeddings import ImageProjection

        self.pipe.set_ip_adapter_scale(0.0)
        config = self.pipe.image_encoder.config
        shape: tuple[int, ...] = (config.projection_dim,)  # the plain kind's: the projected embedding
        if not isinstance(self.pipe.unet.encoder_hid_proj.image_projection_layers[0], ImageProjection):
            shape = ((config.image_size // config.patch_size) ** 2 + 1, config.hidden_size)  # every token's
        copies = 2 if request.classifier_free_guidance else 1
        zeros = torch.zeros(copies * request.batch, 1, *shape, dtype=self.pipe.unet.dtype, device=self.device)
        return {"ip_adapter_image_embeds": [zeros]}

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """diffusers' VAE decoder on latents as the UNet sees them (divided by the scaling factor here); a VAE
        that overflows float16 (SDXL's ``force_upcast``) in float32, as diffusers' SDXL pipelines run it."""
        vae = self.pipe.vae
        if vae.dtype == torch.float16 and vae.config.get("force_upcast", False):
            vae.to(torch.float32)
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]

    def host_latents(self, latents: torch.Tensor) -> np.ndarray:
        return latents.float().cpu().numpy()

    def decode_images(self, latents: np.ndarray) -> np.ndarray:
        """Latents as the UNet sees them -> images (B, H, W, 3) in [0, 1], through diffusers' VAE."""
        with torch.inference_mode():
            decoded = self.decode(torch.from_numpy(latents).to(self.device, self.pipe.vae.dtype))
        return to_unit_range(decoded.float().cpu().numpy())

    def encoder_draws(self, draws: list[Callable[[tuple[int, ...]], object]]) -> list:
        """The noise draws diffusers' VAE makes for the images it encodes: one per encoding, none where a
        tiny VAE's encoder gives the latents themselves."""
        return [] if self.model_dir.arch.tiny_vae else draws

    def upscale_latents(self, latents: np.ndarray, height: int, width: int) -> np.ndarray:
        """The hires fix's latent upscaler, torch's own bilinear ``interpolate``."""
        size = (height // self.model_dir.arch.vae_scale_factor, width // self.model_dir.arch.vae_scale_factor)
        upscaled = torch.nn.functional.interpolate(torch.from_numpy(latents), size=size, mode="bilinear")
        return upscaled.numpy()

    def load_textual_inversion(self, path: str | os.PathLike, token: str | None = None) -> str:
        """diffusers' own ``load_textual_inversion`` (its image pipelines share the tokenizer and encoder);
        SDXL's ``clip_l`` and ``clip_g`` vectors into each text encoder with its tokenizer, as diffusers'
        documentation loads them."""
        from sdengine.textual_inversion import read_embedding, read_xl_embedding

        pipe = self.pipe
        if not self.model_dir.arch.xl:
            token = read_embedding(path, token)[0]  # the same checks and token name as the engine
            pipe.load_textual_inversion(str(path), token=token)
            return token
        token, first, second = read_xl_embedding(path, token)
        for vectors, encoder, tokenizer in (
            (first, pipe.text_encoder, pipe.tokenizer),
            (second, pipe.text_encoder_2, pipe.tokenizer_2),
        ):
            if encoder is None:  # the refiner's first
                continue
            pipe.load_textual_inversion(
                torch.from_numpy(vectors), token=token, text_encoder=encoder, tokenizer=tokenizer
            )
        return token

    def load_lora(self, path: str | os.PathLike, scale: float = 1.0) -> int:
        """diffusers' ``load_lora_weights`` then ``fuse_lora(lora_scale=scale)`` (which needs peft)."""
        from sdengine.lora import read_lora

        layers = len(read_lora(path).layers)  # the same checks as the engine
        try:
            import peft  # noqa: F401
        except ImportError:
            raise BackendUnavailableError(
                "LoRA on the torch backend needs peft (pip install peft), which diffusers loads LoRA with"
            ) from None
        name = f"sdengine_{self._loras}"
        self.pipe.load_lora_weights(str(path), adapter_name=name)
        self.pipe.fuse_lora(lora_scale=scale, adapter_names=[name])
        self.pipe.unload_lora_weights()  # the fused weights stay
        self._loras += 1
        return layers

    def embeddings(self, pipe, request: GenerationRequest) -> dict[str, torch.Tensor]:
        """Prompt embeddings with ``clip_skip`` and ``long_prompts``, made as diffusers' ``encode_prompt``
        makes them (the hidden states ``clip_skip + 1`` from the end, through the final layer norm), for the
        negative prompts too; with ``long_prompts``, from windows of 75 tokens (:func:`token_windows`).

        Not through ``encode_prompt`` itself: diffusers 0.42 skips layers for the positive prompts only,
        which puts the two sides of classifier-free guidance on different layers, its clip_skip path reads
        ``text_encoder.text_model``, which transformers 5 no longer has, and it cuts long prompts off."""
        if request.prompt_weights == "compel":
            return self.weighted_embeddings(pipe, request)
        encoder = pipe.text_encoder
        norm = getattr(encoder, "text_model", encoder).final_layer_norm
        texts = [
            pipe.maybe_convert_prompt(t, pipe.tokenizer) for t in request.negative_prompts + request.prompts
        ]
        if request.long_prompts:
            ids = token_windows(pipe.tokenizer, texts)
        else:
            max_length = pipe.tokenizer.model_max_length
            ids = pipe.tokenizer(
                texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
            ).input_ids[:, None]
        states = encoder(ids.flatten(0, 1).to(self.device), output_hidden_states=True).hidden_states
        embeds = norm(states[-(request.clip_skip + 1)])
        embeds = embeds.reshape(len(texts), -1, embeds.shape[-1])
        return {"negative_prompt_embeds": embeds[: request.batch], "prompt_embeds": embeds[request.batch :]}

    def xl_embeddings(self, pipe, request: GenerationRequest) -> dict[str, torch.Tensor]:
        """SDXL's prompt embeddings (:meth:`xl_states`) of the negative prompts and the prompts, as diffusers'
        arguments."""
        embeds, pooled = self.xl_states(pipe, request, list(request.negative_prompts + request.prompts))
        return self.xl_prompts(pipe, request, embeds, pooled)

    def xl_edited_embeddings(
        self, pipe, request: GenerationRequest, edits: PromptEdits
    ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]] | None]:
        """SDXL's prompt embeddings in the AUTOMATIC1111 web UI's syntax: the first call's (diffusers'
        arguments) and, where prompts are edited part way, every call's text and pooled embeddings as the
        UNet takes them (``prompt_embeds`` and ``add_text_embeds`` in diffusers' loop)."""
        embeds, pooled = self.xl_states(pipe, request, edits.texts)
        rows = torch.from_numpy(edits.rows)
        sets, pooled_sets, batch = embeds[rows], pooled[rows], request.batch  # (sets, G * B, ...)
        first = int(edits.call_rows[0])  # the set the first call reads (a refiner's may be a later one)
        if not request.classifier_free_guidance:
            prompts = {"prompt_embeds": sets[first], "pooled_prompt_embeds": pooled_sets[first]}
        else:
            if request.default_negative and pipe.config.force_zeros_for_empty_prompt:
                sets, pooled_sets = sets.clone(), pooled_sets.clone()
                sets[:, :batch], pooled_sets[:, :batch] = 0.0, 0.0
            prompts = {
                "prompt_embeds": sets[first][batch:],
                "negative_prompt_embeds": sets[first][:batch],
                "pooled_prompt_embeds": pooled_sets[first][batch:],
                "negative_pooled_prompt_embeds": pooled_sets[first][:batch],
            }
        if not edits.edited:
            return prompts, None
        return prompts, [
            {"prompt_embeds": sets[k], "add_text_embeds": pooled_sets[k]} for k in edits.call_rows
        ]

    def xl_states(
        self, pipe, request: GenerationRequest, texts: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's text embeddings (len(texts), sequence, hidden) and pooled embeddings (len(texts), pooled)
        with ``clip_skip`` for the negative prompts too (diffusers' SDXL ``encode_prompt`` skips layers for
        the positive prompts alone), ``long_prompts`` (windows of 75 tokens, :func:`token_windows`) and
        weights in the AUTOMATIC1111 web UI's syntax (as :meth:`a1111_embeddings`, for each encoder): each
        encoder's states ``clip_skip + 2`` from the end, side by side, and the second's pooled embeddings of
        each text's first window."""
        from sdengine.prompt_weights_a1111 import a1111_windows, parse_a1111

        states = []
        pairs = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
        for tok, encoder in [(t, e) for t, e in pairs if e is not None]:  # the refiner has the second alone

            def encode(ids: Any, encoder: Any = encoder) -> torch.Tensor:
                out = encoder(torch.as_tensor(ids).to(self.device), output_hidden_states=True)
                return out.hidden_states[-(request.clip_skip + 2)]

            if request.prompt_weights == "a1111":
                states.append(a1111_states(pipe, tok, lambda ids, e=encode: e(ids).double(), texts, request))
                continue
            converted = [pipe.maybe_convert_prompt(t, tok) for t in texts]  # textual inversion's tokens
            if request.long_prompts:
                ids = token_windows(tok, converted)
            else:
                ids = tok(
                    converted,
                    padding="max_length",
                    max_length=tok.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids[:, None]
            embeds = encode(ids.flatten(0, 1))
            states.append(embeds.reshape(len(texts), -1, embeds.shape[-1]))
        tok = pipe.tokenizer_2
        converted = [pipe.maybe_convert_prompt(t, tok) for t in texts]
        if request.prompt_weights == "a1111":  # the first window as the web UI fills it
            specials = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
            comma = tok.convert_tokens_to_ids(",</w>")
            content = lambda text: tok(text, add_special_tokens=False, truncation=False).input_ids  # noqa: E731
            windows = [
                a1111_windows(parse_a1111(t), content, specials, comma, tok.model_max_length - 2)
                for t in converted
            ]
            pooled_ids = torch.from_numpy(np.stack([ids[0] for ids, _ in windows]))
        else:
            pooled_ids = token_windows(tok, converted)[:, 0]
        pooled = pipe.text_encoder_2(pooled_ids.to(self.device))[0]  # the projected, pooled embeddings
        return torch.cat(states, dim=-1).to(pipe.unet.dtype), pooled

    def xl_compel_embeddings(self, pipe, request: GenerationRequest) -> dict[str, torch.Tensor]:
        """SDXL's weighted prompt embeddings from compel, as diffusers' documentation makes them with it: both
        tokenizers and encoders, their penultimate states not normalised, the second's pooled embeddings;
        windows and downweighting as :meth:`weighted_embeddings`."""
        from compel import ReturnedEmbeddingsType

        pairs = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
        pairs = [(t, e) for t, e in pairs if e is not None]  # the refiner has the second alone
        compel = self.compel(
            pipe,
            request,
            tokenizer=[t for t, _ in pairs],
            text_encoder=[e for _, e in pairs],
            returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
            requires_pooled=[False] * (len(pairs) - 1) + [True],
        )
        out = [compel(text) for text in request.negative_prompts + request.prompts]
        embeds = torch.cat(compel.pad_conditioning_tensors_to_same_length([e for e, _ in out]))
        return self.xl_prompts(pipe, request, embeds, torch.cat([p for _, p in out]))

    @staticmethod
    def xl_prompts(
        pipe, request: GenerationRequest, embeds: torch.Tensor, pooled: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """diffusers' SDXL arguments from the embeddings and pooled embeddings of the negative prompts then
        the prompts: zeros for the negative side where no negative prompt is given, as diffusers makes
        them."""
        batch = request.batch
        negative, negative_pooled = embeds[:batch], pooled[:batch]
        if request.default_negative and pipe.config.force_zeros_for_empty_prompt:
            negative, negative_pooled = torch.zeros_like(negative), torch.zeros_like(negative_pooled)
        return {
            "prompt_embeds": embeds[batch:],
            "negative_prompt_embeds": negative,
            "pooled_prompt_embeds": pooled[batch:],
            "negative_pooled_prompt_embeds": negative_pooled,
        }

    def edited_embeddings(
        self, pipe, request: GenerationRequest, edits: PromptEdits
    ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]] | None]:
        """Prompt embeddings in the AUTOMATIC1111 web UI's syntax: the first call's (diffusers' arguments),
        and where the prompts are edited part way (:mod:`sdengine.prompt_editing`) every call's, as the UNet
        takes them (negatives then prompts with classifier-free guidance)."""
        sets = self.a1111_embeddings(pipe, request, edits.texts)[torch.from_numpy(edits.rows)]
        batch, first = request.batch, sets[int(edits.call_rows[0])]  # the first call's set
        if request.classifier_free_guidance:
            prompts = {"negative_prompt_embeds": first[:batch], "prompt_embeds": first[batch:]}
        else:
            prompts = {"prompt_embeds": first}
        return prompts, [{"prompt_embeds": sets[k]} for k in edits.call_rows] if edits.edited else None

    def a1111_embeddings(self, pipe, request: GenerationRequest, texts: list[str]) -> torch.Tensor:
        """Text embeddings (len(texts), sequence, hidden) in the AUTOMATIC1111 web UI's weighting syntax,
        with transformers' tokenizer and the torch text encoder: the windows as
        :func:`sdengine.prompt_weights_a1111.a1111_windows` fills them, each window's embeddings multiplied
        by its weights and rescaled to its own mean; shorter texts get the empty prompt's window as often as
        they are short."""
        encoder = pipe.text_encoder
        norm = getattr(encoder, "text_model", encoder).final_layer_norm

        def encode(ids: np.ndarray) -> torch.Tensor:
            states = encoder(torch.from_numpy(ids).to(self.device), output_hidden_states=True).hidden_states
            return norm(states[-(request.clip_skip + 1)]).double()

        return a1111_states(pipe, pipe.tokenizer, encode, texts, request).to(pipe.unet.dtype)

    def weighted_embeddings(self, pipe, request: GenerationRequest) -> dict[str, torch.Tensor]:
        """Weighted prompt embeddings from compel, the library diffusers' documentation weights prompts with
        (:meth:`compel`)."""
        compel = self.compel(pipe, request, tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
        embeds = [compel(text) for text in request.negative_prompts + request.prompts]
        embeds = torch.cat(compel.pad_conditioning_tensors_to_same_length(embeds))
        return {"negative_prompt_embeds": embeds[: request.batch], "prompt_embeds": embeds[request.batch :]}

    def compel(self, pipe, request: GenerationRequest, **encoders: Any) -> Any:
        """compel on ``encoders`` (its tokenizer and text encoder arguments), weighting as the engine does:
        windows split where they fill (``SplitLongTextMode.BRUTAL``), fragments below weight 1 blended out by
        encoding the prompt without them (``DownweightMode.REMOVE``), and textual inversion's multi-vector
        tokens spelled out as diffusers and the engine read them."""
        try:
            from compel import Compel, DiffusersTextualInversionManager, DownweightMode
            from compel.embeddings_provider import SplitLongTextMode
        except ImportError:
            raise BackendUnavailableError(
                "prompt weights on the torch backend need compel (pip install compel)"
            ) from None
        if request.clip_skip:
            raise UnsupportedConfigError(
                "the torch backend weights prompts with compel, which has no clip_skip"
            )
        return Compel(
            **encoders,
            truncate_long_prompts=not request.long_prompts,
            split_long_text_mode=SplitLongTextMode.BRUTAL,
            downweight_mode=DownweightMode.REMOVE,
            device=self.device,
            # (compel's manager reads pipe.tokenizer: the refiner's is its second, its only one)
            textual_inversion_manager=DiffusersTextualInversionManager(
                pipe
                if pipe.tokenizer is not None
                else SimpleNamespace(
                    tokenizer=pipe.tokenizer_2, maybe_convert_prompt=pipe.maybe_convert_prompt
                )
            ),
        )

    def image_pipeline(self, kind: str, control: bool = False, pag: bool = False):
        """diffusers' image-to-image (``kind`` "Img2Img") or inpainting ("Inpaint") pipeline, or with
        ``control`` its ControlNet pipeline of that kind ("" for text to image), or with ``pag`` its PAG
        pipeline of that kind (perturbing :attr:`pag_layers`), on the same modules (made once each)."""
        xl = self.model_dir.arch.xl
        pag_name = "PAG" if pag else ""
        class_name = (
            f"StableDiffusion{'XL' if xl else ''}{'ControlNet' if control else ''}{pag_name}{kind}Pipeline"
        )
        key = (class_name, self.pag_layers if pag else ())
        if key not in self._image_pipelines:
            import diffusers

            if pag:  # diffusers' PAG pipelines would refuse them mid-run
                from export.pag import check_pag_layers

                check_pag_layers(self.pipe.unet, self.pag_layers)

            extra: dict[str, Any] = {"controlnet": self.controlnet} if control else {}
            if pag:
                extra["pag_applied_layers"] = list(self.pag_layers)
            if not xl:
                extra["requires_safety_checker"] = False
            else:  # the loaded pipeline's settings (the refiner's: no zeros, an aesthetic score)
                extra["force_zeros_for_empty_prompt"] = self.pipe.config.force_zeros_for_empty_prompt
                if self.model_dir.arch.aesthetic:
                    extra["requires_aesthetics_score"] = True
            pipe = getattr(diffusers, class_name)(**self.pipe.components, **extra)
            pipe.set_progress_bar_config(disable=True)
            self._image_pipelines[key] = pipe
        return self._image_pipelines[key]


def sized(pipe: Any, request: GenerationRequest) -> dict[str, int]:
    """``height`` and ``width`` for a pipeline that takes them: its image-to-image pipelines size the output
    by the image, and the PAG ones refuse the keywords."""
    parameters = inspect.signature(pipe.__call__).parameters
    takes = "height" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    return {"height": request.height, "width": request.width} if takes else {}


def xl_size_arguments(request: GenerationRequest) -> dict[str, tuple[int, int]]:
    """diffusers' SDXL size-conditioning arguments for ``request``: its own, or the image's size and crop
    corner (0, 0); the negative ones where any is given (diffusers reads them only when both negative sizes
    are given)."""
    sizes, image = request.sizes, (request.height, request.width)
    arguments = {
        "original_size": sizes.original_size or image,
        "crops_coords_top_left": sizes.crop_top_left,
        "target_size": sizes.target_size or image,
    }
    negatives = (sizes.negative_original_size, sizes.negative_crop_top_left, sizes.negative_target_size)
    if any(v is not None for v in negatives):
        arguments |= {
            "negative_original_size": negatives[0] or arguments["original_size"],
            "negative_crops_coords_top_left": negatives[1] or arguments["crops_coords_top_left"],
            "negative_target_size": negatives[2] or arguments["target_size"],
        }
    return arguments


def a1111_states(
    pipe, tok, encode: Callable[[np.ndarray], torch.Tensor], texts: list[str], request: GenerationRequest
) -> torch.Tensor:
    """Text embeddings (len(texts), sequence, hidden), float64, in the AUTOMATIC1111 web UI's weighting
    syntax with transformers' tokenizer ``tok`` and ``encode`` (ids -> states): the windows as
    :func:`sdengine.prompt_weights_a1111.a1111_windows` fills them, each window's states multiplied by its
    weights and rescaled to its own mean; shorter texts get the empty prompt's window as often as they are
    short."""
    from sdengine.prompt_weights_a1111 import a1111_windows, parse_a1111

    specials = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    comma = tok.convert_tokens_to_ids(",</w>")  # the web UI's comma token

    def content(text: str) -> list[int]:
        return tok(text, add_special_tokens=False, truncation=False).input_ids

    embeds = []
    for text in texts:
        fragments = parse_a1111(pipe.maybe_convert_prompt(text, tok))
        ids, weights = a1111_windows(fragments, content, specials, comma, tok.model_max_length - 2)
        if not request.long_prompts:
            ids, weights = ids[:1], weights[:1]
        z = encode(ids)
        mean = z.mean(dim=(1, 2), keepdim=True)
        z = z * torch.from_numpy(weights).to(z)[..., None]
        embeds.append((z * mean / z.mean(dim=(1, 2), keepdim=True)).flatten(0, 1))
    empty = encode(
        tok("", padding="max_length", max_length=tok.model_max_length, return_tensors="np").input_ids
    )[0]
    longest = max(len(e) for e in embeds)
    return torch.stack([torch.cat([e, *[empty] * ((longest - len(e)) // len(empty))]) for e in embeds])


def token_windows(tokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids (len(texts), windows, 77) with transformers' tokenizer: each text's tokens in windows of 75,
    each with BOS, EOS and padding, and the empty text's window where a text needs fewer than the longest."""
    size = tokenizer.model_max_length - 2
    content = [tokenizer(t, add_special_tokens=False, truncation=False).input_ids for t in texts]
    windows = [[ids[i : i + size] for i in range(0, len(ids), size)] or [[]] for ids in content]
    count = max(len(w) for w in windows)

    def row(ids: list[int]) -> list[int]:
        return [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (
            size - len(ids)
        )

    return torch.tensor([[row(w) for w in ws] + [row([])] * (count - len(ws)) for ws in windows])


@contextlib.contextmanager
def free_u(pipe: Any, scales: FreeUScales | None, deepcache: bool = False) -> Iterator[None]:
    """FreeU on ``pipe``'s UNet for one run, by diffusers' ``enable_freeu`` (None: nothing).

    ``deepcache``: the authors' DeepCache helper runs too. diffusers' ``apply_freeu`` scales the backbone's
    hidden states in place, and on the helper's shallow calls those are the layer outputs it cached: each
    call would scale the cache again, compounding (by b**k on the k-th call since the last whole one). Its
    hidden states are then copied before diffusers' own ``apply_freeu`` scales them, so each call scales
    the cached feature once, as a run without the helper scales the fresh one."""
    if scales is None:
        yield
        return
    from diffusers.models.unets import unet_2d_blocks

    original = unet_2d_blocks.apply_freeu

    def apply_freeu_on_a_copy(index: int, hidden: Any, skip: Any, **freeu: float) -> Any:
        return original(index, hidden.clone(), skip, **freeu)

    s1, s2, b1, b2 = scales
    pipe.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)
    if deepcache:
        unet_2d_blocks.apply_freeu = apply_freeu_on_a_copy
    try:
        yield
    finally:
        unet_2d_blocks.apply_freeu = original
        pipe.disable_freeu()


@contextlib.contextmanager
def adaptive_projected(pipe: Any, settings: APG | None, guidance: float) -> Iterator[None]:
    """Adaptive projected guidance in ``pipe`` for one run, by diffusers' own ``normalized_guidance`` and
    ``MomentumBuffer`` (its ``AdaptiveProjectedGuidance`` guider's; None: nothing).

    diffusers' standard pipelines take no guider, so the UNet's output is changed before the pipeline
    combines it: its conditional half becomes ``uncond + (apg - uncond) / g``, which the pipeline's
    ``uncond + g (cond - uncond)`` turns into diffusers' APG prediction (rounding apart). The momentum's
    running average starts afresh with each pipeline call, as the guider's does at step 0."""
    if settings is None:
        yield
        return
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

    unet = pipe.unet
    forward = unet.forward
    buffer = MomentumBuffer(settings.momentum) if settings.momentum else None

    def guided(*args: Any, **kwargs: Any) -> Any:
        out = forward(*args, **kwargs)
        noise = out[0] if isinstance(out, tuple) else out.sample
        uncond, cond = noise.chunk(2)
        pred = normalized_guidance(cond, uncond, guidance, buffer, settings.eta, settings.norm_threshold)
        noise = torch.cat([uncond, uncond + (pred - uncond) / guidance])
        return (noise, *out[1:]) if isinstance(out, tuple) else type(out)(sample=noise)

    with mock.patch.object(unet, "forward", guided):
        yield


def per_prompt(images: np.ndarray, batch: int) -> np.ndarray:
    """One image (or mask) per prompt, as diffusers wants them: a single one repeated for the batch."""
    return np.concatenate([images] * (batch // len(images)))


@contextlib.contextmanager
def same_draws(
    encoder_noise: list[Callable[[tuple[int, ...]], object]],
    added_noise: Callable[[tuple[int, ...]], object],
    pipeline_module: str,
) -> Iterator[None]:
    """Within the block, diffusers' image pipeline (in module ``pipeline_module``) samples its latent
    distributions with ``encoder_noise[0](shape)``, ``encoder_noise[1](shape)``..., in the order it encodes,
    and noises the image with ``added_noise(shape)``: the engine's draws."""
    import importlib

    from diffusers.models.autoencoders import vae

    pipeline = importlib.import_module(pipeline_module)
    encodings = iter(encoder_noise)

    def next_encoding(shape: tuple[int, ...]) -> object:
        draw = next(encodings, None)
        if draw is None:
            raise AssertionError("diffusers encoded more images than the engine's draws expect")
        return draw(shape)

    def replace(draw: Callable[[tuple[int, ...]], object]) -> Callable[..., torch.Tensor]:
        def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None) -> torch.Tensor:
            value = torch.as_tensor(draw(tuple(shape)))
            assert tuple(value.shape) == tuple(shape), (tuple(value.shape), tuple(shape))
            return value.to(device=device, dtype=dtype)

        return randn_tensor

    with (
        mock.patch.object(vae, "randn_tensor", replace(next_encoding)),
        mock.patch.object(pipeline, "randn_tensor", replace(added_noise)),
    ):
        yield
    if next(encodings, None) is not None:
        raise AssertionError("diffusers encoded fewer images than the engine's draws expect")


@contextlib.contextmanager
def stacked(*managers: contextlib.AbstractContextManager) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for manager in managers:
            stack.enter_context(manager)
        yield


@contextlib.contextmanager
def same_step_noise(scheduler: object, noise: np.ndarray) -> Iterator[None]:
    """Within the block, a stochastic diffusers scheduler's per-step draw is the engine's noise for the call
    it is making: ``noise[step_index - begin_index]`` (image to image starts at a later index)."""
    import sys

    module = sys.modules[type(scheduler).__module__]
    if not hasattr(module, "randn_tensor"):  # a scheduler that never draws
        yield
        return

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None) -> torch.Tensor:
        call = scheduler.step_index - (scheduler.begin_index or 0)
        value = torch.from_numpy(noise[call])
        assert tuple(value.shape) == tuple(shape), (tuple(value.shape), tuple(shape))
        return value.to(device=device, dtype=dtype)

    with mock.patch.object(module, "randn_tensor", randn_tensor):
        yield
