"""Text to image, image to image and inpainting: tokenize, encode, denoise, decode — on any backend, from one
loaded model directory."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from sdengine.apg import apg_input
from sdengine.backends.base import Backend, DenoisePlan
from sdengine.backends.ort import OrtBackend
from sdengine.backends.select import Choice, choose, detect, model_kind
from sdengine.controlnet import control_images, control_mode_weights, control_schedule
from sdengine.denoise import Preview, Progress, Stop, denoise
from sdengine.errors import InvalidArgumentError, UnsupportedConfigError
from sdengine.freeu import freeu_input
from sdengine.guidance_embedding import guidance_embedding
from sdengine.hires import upscale_latents
from sdengine.images import ImageInput, MaskInput, image_array, image_size, mask_array, to_pil, to_unit_range
from sdengine.ip_adapter import ip_pixels, ip_unet_inputs
from sdengine.latent_preview import approximate_images, check_preview_method
from sdengine.lora import LoraFile, fused_weights, read_lora
from sdengine.mask_crop import MaskCrop
from sdengine.model_dir import ModelDir, open_onnx_dir, optional_json
from sdengine.model_specs import (
    CONTROL_WEIGHTS,
    FREEU,
    PAG_ROWS,
    PREVIEW_DECODER,
    SAFETY_CHECKER,
    TEXT_EMBEDS,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    TIMESTEP_COND,
    UNET,
)
from sdengine.pag import perturbed_rows
from sdengine.prompt_weights import parse_weighted, weighted_embeddings
from sdengine.prompt_weights_a1111 import a1111_embeddings, a1111_windows, parse_a1111
from sdengine.refiner import DEFAULT_REFINER_SWITCH, check_refiner
from sdengine.request import DEFAULT_GUIDANCE, DEFAULT_STEPS, GenerationRequest, make_request
from sdengine.safety import PREPROCESSOR_CONFIG, clip_pixels
from sdengine.schedulers import Schedule, custom_steps
from sdengine.step_graph import Blend, step_tables
from sdengine.textual_inversion import read_embedding, read_xl_embedding, vector_tokens
from sdengine.timing import StageTimes
from sdengine.tokenizer import ClipTokenizer
from sdengine.vae_tiling import check_tileable, needs_tiles, run_tiled
from sdengine.xl_conditioning import xl_unet_inputs, zero_negatives


@dataclass
class GenerationResult:
    """Images as float arrays (B, H, W, 3) in [0, 1] and as PIL, the request, and per-stage timings;
    ``nsfw``: the safety checker's flag for each image (flagged ones are black), None where none ran."""

    array: np.ndarray
    request: GenerationRequest
    times: StageTimes
    backend: str
    latents: np.ndarray = field(repr=False)
    nsfw: list[bool] | None = None

    @property
    def images(self) -> list[Image.Image]:
        return to_pil(self.array)


class ImageGenerator(Protocol):
    """What every loaded pipeline offers, whatever runs it."""

    model_dir: ModelDir
    choice: Choice | None
    refiner: ImageGenerator | None

    def generate(
        self,
        request: GenerationRequest,
        progress: Progress | None = None,
        preview: Preview | None = None,
        stop: Stop | None = None,
    ) -> GenerationResult: ...

    def preview_images(self, latents: np.ndarray, method: str = "full") -> list[Image.Image]: ...

    def load_textual_inversion(self, path: str | os.PathLike, token: str | None = None) -> str: ...

    def load_lora(self, path: str | os.PathLike, scale: float = 1.0) -> int: ...

    def set_refiner(self, refiner: ImageGenerator | None) -> None: ...


class _CallMixin:
    model_dir: ModelDir
    choice: Choice | None = None
    #: the model that finishes every run from the switch on (:mod:`sdengine.refiner`), if one is set
    refiner: _CallMixin | None = None

    def set_refiner(self, refiner: ImageGenerator | None) -> None:
        """Let ``refiner`` (a loaded pipeline on the same backend, whose latents are this model's) finish
        every run from ``refiner_switch`` on; None: no refiner."""
        if refiner is not None:
            check_refiner(self, refiner)
        self.refiner = refiner  # type: ignore[assignment]  # check_refiner: this class's own

    def preview_images(self, latents: np.ndarray, method: str = "full") -> list[Image.Image]:
        """Latents as a preview's callback gets them -> images (no safety check: they are not the result),
        by ``method`` (:mod:`sdengine.latent_preview`): ``full`` through the VAE decoder, ``approx`` by the
        fixed linear mix of the latents' channels, at their size, ``tiny`` through the preview decoder."""
        method = check_preview_method(method, self.tiny_previews)
        if method == "approx":
            return approximate_images(latents, self.model_dir.arch.xl)
        if method == "tiny":
            return to_pil(self.tiny_preview_images(latents))
        return to_pil(self.decode_images(latents))  # type: ignore[attr-defined]  # each pipeline's own

    @property
    def tiny_previews(self) -> bool:
        """The model has a preview decoder, a tiny VAE's, for ``tiny`` previews."""
        return False

    @property
    def tiny_decoder(self) -> bool:
        """A tiny VAE's decoder can make the images (``decoder="tiny"``): the preview decoder, or the VAE."""
        return self.tiny_previews or self.model_dir.arch.tiny_vae

    def final_images(self, request: GenerationRequest, latents: np.ndarray) -> np.ndarray:
        """``request``'s images of ``latents`` (B, H, W, 3) in [0, 1], by the decoder it asks for."""
        if request.decoder == "tiny" and self.tiny_previews:
            return self.tiny_preview_images(latents)
        return self.decode_images(latents)

    def tiny_preview_images(self, latents: np.ndarray) -> np.ndarray:
        """Latents as the UNet sees them -> images (B, H, W, 3) in [0, 1], through the preview decoder."""
        raise NotImplementedError

    @property
    def controlnets(self) -> int:
        """How many ControlNets condition the UNet (each takes a control image)."""
        return self.model_dir.arch.controlnets

    @property
    def ip_adapter(self) -> bool:
        """The UNet holds an IP-Adapter, and so takes an image prompt."""
        return self.model_dir.arch.ip_adapter

    @property
    def seamless(self) -> bool:
        """The UNet and VAE wrap around the image's edges: every image made tiles."""
        return self.model_dir.seamless

    @property
    def pag(self) -> bool:
        """The UNet can perturb its self-attention, and so run perturbed-attention guidance
        (:mod:`sdengine.pag`)."""
        return self.model_dir.arch.pag

    @property
    def freeu(self) -> bool:
        """The UNet takes FreeU's scales (:mod:`sdengine.freeu`)."""
        return self.model_dir.arch.freeu

    def generate(
        self,
        request: GenerationRequest,
        progress: Progress | None = None,
        preview: Preview | None = None,
        stop: Stop | None = None,
    ) -> GenerationResult:
        raise NotImplementedError

    def decode_images(self, latents: np.ndarray) -> np.ndarray:
        """Latents as the UNet sees them -> images (B, H, W, 3) in [0, 1], through the pipeline's VAE."""
        raise NotImplementedError

    def final_model(self, request: GenerationRequest) -> _CallMixin:
        """The pipeline whose VAE decodes ``request``'s result: its refiner's, where one finishes it."""
        return self.refiner if request.refiner_switch is not None and self.refiner is not None else self

    def upscale_latents(self, latents: np.ndarray, height: int, width: int) -> np.ndarray:
        """The hires fix's latent upscaler (:func:`sdengine.hires.upscale_latents`), to latents of an image of
        ``height`` x ``width`` pixels."""
        factor = self.model_dir.arch.vae_scale_factor
        return upscale_latents(latents, height // factor, width // factor)

    def denoised(
        self,
        request: GenerationRequest,
        times: StageTimes,
        progress: Progress | None = None,
        preview: Preview | None = None,
        stop: Stop | None = None,
    ) -> Any:
        raise NotImplementedError

    def host_latents(self, latents: Any) -> np.ndarray:
        """:meth:`denoised`'s latents as a host array."""
        return latents

    def denoised_passes(
        self,
        request: GenerationRequest,
        times: StageTimes,
        progress: Progress | None = None,
        preview: Preview | None = None,
        stop: Stop | None = None,
    ) -> Any:
        """The final latents of ``request``: one pass of :meth:`denoised`, then the refiner's part of the run
        or the hires fix's second pass where it has one (not once ``stop`` has answered True)."""
        latents = self.denoised(request, times, progress, preview, stop)
        if request.refiner_switch is not None and not (stop and stop()):
            assert self.refiner is not None, "request() gives a switch only with a refiner"
            refined = request.refiner_pass(self.host_latents(latents))
            if preview is not None:
                preview = preview.shifted(len(request.schedule(self.model_dir.scheduler_config).timesteps))
            return self.refiner.denoised(refined, times, progress, preview, stop)
        if request.hires is not None and not (stop and stop()):
            second, preview = self.second_pass(request, self.host_latents(latents), times, preview)
            latents = self.denoised(second, times, progress, preview, stop)
        return latents

    def second_pass(
        self, request: GenerationRequest, latents: np.ndarray, times: StageTimes, preview: Preview | None
    ) -> tuple[GenerationRequest, Preview | None]:
        """The hires fix's second pass after a first that ended with ``latents``: its request, from them
        upscaled or from their images resized (:mod:`sdengine.hires`), and the preview, which counts its
        calls on from the first pass's."""
        hires = request.hires
        assert hires is not None
        if hires.upscale == "latent":
            second = request.hires_pass(init_latents=self.upscale_latents(latents, hires.height, hires.width))
        else:
            with times.time("vae_decode"):
                images = self.final_images(request, latents)
            second = request.hires_pass(image=image_array(images, hires.height, hires.width))
        calls = len(request.schedule(self.model_dir.scheduler_config).timesteps)
        return second, None if preview is None else preview.shifted(calls)

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
        image: ImageInput | None = None,
        strength: float | None = None,
        mask: MaskInput | None = None,
        mask_crop: int | None = None,
        masked_content: str = "original",
        decoder: str = "vae",
        clip_skip: int = 0,
        guidance_rescale: float = 0.0,
        long_prompts: bool = False,
        prompt_weights: bool | str = False,
        control_image: ImageInput | Sequence[ImageInput] | None = None,
        control_scale: float | Sequence[float] = 1.0,
        control_start: float | Sequence[float] = 0.0,
        control_end: float | Sequence[float] = 1.0,
        control_mode: str | Sequence[str] = "balanced",
        variation_seed: int | None = None,
        variation_strength: float = 0.0,
        hires_scale: float | None = None,
        hires_strength: float | None = None,
        hires_steps: int | None = None,
        hires_upscale: str | None = None,
        original_size: tuple[int, int] | None = None,
        crop_top_left: tuple[int, int] | None = None,
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crop_top_left: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None,
        refiner_switch: float | None = None,
        ip_adapter_image: ImageInput | None = None,
        ip_adapter_scale: float | None = None,
        noise_source: str = "sdengine",
        pag_scale: float = 0.0,
        pag_adaptive_scale: float = 0.0,
        deepcache_interval: int = 1,
        freeu: Sequence[float] | Mapping[str, float] | None = None,
        timesteps: str | Sequence[float] | None = None,
        sigmas: str | Sequence[float] | None = None,
        hires_timesteps: str | Sequence[float] | None = None,
        hires_sigmas: str | Sequence[float] | None = None,
        apg: bool | Sequence[float] | Mapping[str, float] | None = None,
    ) -> GenerationRequest:
        """A checked request. Height and width default to the model's native size, or with an input ``image``
        (image to image) to its size rounded down to a multiple of 8, as diffusers does; the image is resized
        to the size asked for. ``strength``: how much of the schedule runs on the noised image, in (0, 1]
        (default 0.8, or 1.0 with a mask); it needs an ``image``. ``mask`` (inpainting): white repaints,
        black keeps the image; resized like the image. ``mask_crop`` (inpainting; diffusers'
        ``padding_mask_crop``): repaint only the mask's bounding box grown by that many pixels, at the size
        asked for (default: the model's native size), and lay the result back into the original image,
        whose size the images then have (one image and one mask, the same size; :mod:`sdengine.mask_crop`).
        ``masked_content`` (inpainting): what the masked part's latents start from before they are noised
        to the first step: ``original``, the image's (diffusers'); ``latent noise``, the seed's noise;
        ``latent nothing``, zeros (the web UI's "Masked content" 1, 2 and 3); at strength 1 every run starts
        from noise alone. ``decoder``: ``vae`` (the model's), or ``tiny``: a tiny VAE's decoder makes the
        images (and a hires fix's first-pass image), the preview decoder of an export made with
        ``--preview-vae`` or the model's VAE where that is a tiny one: many times faster, a little less
        faithful (the web UI's "VAE type for decode": TAESD).
        ``clip_skip``: text embeddings from that many layers before the text encoder's last, for positive
        and negative prompts alike (diffusers' numbering: 1 skips the last layer). ``guidance_rescale`` in
        [0, 1]: rescale the guided prediction towards the conditional one's standard deviation (Lin et al.
        2023, sec. 3.4), for zero-terminal-SNR models.
        ``long_prompts``: prompts past the text encoder's 77 tokens are read whole, in windows of 75 tokens
        encoded one by one and concatenated (:meth:`ClipTokenizer.chunks`), not cut off. ``prompt_weights``:
        prompts in compel's weighting syntax (``True`` or ``"compel"``: ``(red cat)1.3``, ``dog+``;
        :mod:`sdengine.prompt_weights`) or the AUTOMATIC1111 web UI's (``"a1111"``: ``(red cat:1.3)``,
        ``[dog]``, ``BREAK``; :mod:`sdengine.prompt_weights_a1111`).
        ``control_image``: ControlNet's conditioning image (one image, or one per batch item), or with several
        ControlNets a list of those, one per ControlNet; resized like ``image``, and where given it sets the
        default size, as in diffusers' ControlNet pipelines. ``control_scale``: each ControlNet's weight;
        ``control_start``, ``control_end``: the share of the schedule each runs in, [start, end) within [0, 1]
        (diffusers' ``control_guidance_start``/``_end``); ``control_mode``: how its residuals are weighed
        (``balanced``; ``guess``, diffusers' ``guess_mode``; ``prompt`` and ``control``, the web UI
        extension's "My prompt is more important" and "ControlNet is more important":
        :data:`sdengine.controlnet.CONTROL_MODES`); each one for all, or one per ControlNet.
        ``variation_seed``, ``variation_strength``: the seed's initial noise moved that far (0 to 1, along
        the sphere) towards ``variation_seed``'s, for images like the seed's (image ``i`` of a batch: seed
        ``seed + i``'s towards ``variation_seed + i``'s). ``hires_scale`` (text to image): the hires fix, a
        second pass at that many times the size, image to image from the first pass enlarged
        (``hires_upscale`` "latent", its latents, or "image", its images), ``hires_strength`` of
        ``hires_steps`` steps (defaults 0.7 of the first pass's steps; see :mod:`sdengine.hires`).
        ``original_size``, ``crop_top_left``, ``target_size`` and their ``negative_`` counterparts (SDXL):
        the size conditioning, (height, width) and (top, left) pairs, as diffusers' SDXL pipelines take them
        (defaults: the image's size, (0, 0), and the positive ones; see :mod:`sdengine.xl_conditioning`).
        ``refiner_switch`` (with a refiner set): the share of the run, in (0, 1), after which the refiner
        takes over (default 0.8; see :mod:`sdengine.refiner`). ``ip_adapter_image`` (a model exported with an
        IP-Adapter): an image prompt, one for the whole batch, and ``ip_adapter_scale`` its weight (default
        1; see :mod:`sdengine.ip_adapter`). ``noise_source``: ``"sdengine"`` (the default: a stream of its
        own per kind of draw) or ``"torch-cpu"``: the noise PyTorch's CPU generator gives diffusers' text and
        image to image and inpainting with ``generator=[torch.Generator("cpu").manual_seed(seed + i) ...]``,
        and the web UI with its "CPU" random source, so the same seed makes the same image there and here
        (:mod:`sdengine.torch_noise`). ``pag_scale`` (a model exported with ``--pag-layers``):
        perturbed-attention guidance's scale, 0 (the default) for none, and ``pag_adaptive_scale`` how fast
        it falls with the timestep (diffusers'; :mod:`sdengine.pag`). ``deepcache_interval`` (a model
        exported with ``--deepcache``): the whole UNet on every that many calls, its shallow branch between
        (:mod:`sdengine.deepcache`). ``freeu`` (a model exported with ``--freeu``): FreeU's scales
        ``(s1, s2, b1, b2)``, as diffusers' ``enable_freeu`` takes them (:mod:`sdengine.freeu`).
        ``timesteps`` or ``sigmas``: the run's own, in place of those the scheduler spaces out, as diffusers'
        pipelines take them (the noisiest first; sigmas end with the one the run ends at, 0 but for
        ``euler``): timesteps for ``euler``, ``heun``, ``dpmpp_2m`` and ``dpmpp_2m_sde``, sigmas for those
        and ``euler_a``, ``dpm2``, ``lms``, ``unipc`` (:mod:`sdengine.schedulers.custom`); their count sets
        ``steps``. ``"ays"``: Align Your Steps' 10-step schedule for the model
        (SD 1.x/2.x or SDXL; :mod:`sdengine.schedulers.custom`). ``hires_timesteps`` or ``hires_sigmas``: the
        hires fix's second pass's own (with a custom first pass, it needs them), whose count sets its steps,
        of which ``hires_strength`` run. ``apg``: adaptive projected guidance in place
        of classifier-free guidance's plain combination, as diffusers' ``AdaptiveProjectedGuidance`` runs it:
        ``True`` (its defaults), ``(eta, norm_threshold, momentum)`` or a mapping of those names
        (:mod:`sdengine.apg`)."""
        sizes = {
            "original_size": original_size,
            "crop_top_left": crop_top_left,
            "target_size": target_size,
            "negative_original_size": negative_original_size,
            "negative_crop_top_left": negative_crop_top_left,
            "negative_target_size": negative_target_size,
        }
        given = [name for name, value in sizes.items() if value is not None]
        if given and not self.model_dir.arch.xl:
            raise UnsupportedConfigError(f"{', '.join(given)}: SDXL's size conditioning; this model has none")
        if ip_adapter_image is not None and not self.ip_adapter:
            raise InvalidArgumentError(
                "an image prompt needs an IP-Adapter: export the model with one (sdengine export "
                "--ip-adapter FILE)"
            )
        if pag_scale and not self.pag:
            raise InvalidArgumentError(
                "perturbed-attention guidance needs a UNet that can perturb its self-attention: export the "
                "model with it (sdengine export --pag-layers mid)"
            )
        if pag_scale and self.refiner is not None:
            raise UnsupportedConfigError("perturbed-attention guidance with a refiner is not supported")
        if freeu is not None and not self.freeu:
            raise InvalidArgumentError(
                "FreeU needs a UNet that takes its scales: export the model with it (sdengine export --freeu)"
            )
        if freeu is not None and self.refiner is not None:
            raise UnsupportedConfigError("FreeU with a refiner is not supported")
        if apg is not None and apg is not False and self.refiner is not None:
            raise UnsupportedConfigError("adaptive projected guidance with a refiner is not supported")
        if deepcache_interval != 1 and not self.model_dir.arch.deepcache:
            raise InvalidArgumentError(
                "deepcache_interval needs a UNet cut for DeepCache: export the model with it (sdengine "
                "export --deepcache 0)"
            )
        if deepcache_interval != 1 and self.refiner is not None:
            raise UnsupportedConfigError("DeepCache with a refiner is not supported")
        if self.refiner is None and refiner_switch is not None:
            raise InvalidArgumentError("refiner_switch needs a refiner: load one (refiner=DIR)")
        if self.refiner is not None and refiner_switch is None:
            refiner_switch = DEFAULT_REFINER_SWITCH
        multiple = self.model_dir.arch.vae_scale_factor
        crop = None
        if mask_crop is not None:
            if image is None or mask is None:
                raise InvalidArgumentError("mask_crop repaints the mask's box: give an image and a mask")
            height = self.model_dir.default_image_size if height is None else height
            width = self.model_dir.default_image_size if width is None else width
            crop = MaskCrop.around(image, mask, mask_crop, width, height)
            image, mask = crop.inputs(width, height)
        controls = self._control_images(control_image)
        default = (self.model_dir.default_image_size,) * 2
        first = controls[0] if controls else image
        if first is not None:
            default = tuple(max(multiple, d // multiple * multiple) for d in image_size(first))
        height = default[0] if height is None else height
        width = default[1] if width is None else width
        request = make_request(
            prompt,
            negative_prompt,
            steps=steps,
            guidance=guidance,
            scheduler=scheduler,
            seed=seed,
            height=height,
            width=width,
            batch=batch,
            latents=latents,
            image=None if image is None else image_array(image, height, width),
            strength=strength,
            # without an image, make_request refuses the mask before reading it
            mask=mask if mask is None or image is None else mask_array(mask, height, width),
            masked_content=masked_content,
            decoder=decoder,
            clip_skip=clip_skip,
            guidance_rescale=guidance_rescale,
            long_prompts=long_prompts,
            prompt_weights=prompt_weights,
            control=None if controls is None else self._control_array(controls, height, width),
            control_scale=control_scale,
            control_start=control_start,
            control_end=control_end,
            control_mode=control_mode,
            variation_seed=variation_seed,
            variation_strength=variation_strength,
            hires_scale=hires_scale,
            hires_strength=hires_strength,
            hires_steps=hires_steps,
            hires_upscale=hires_upscale,
            refiner_switch=refiner_switch,
            ip_image=None
            if ip_adapter_image is None
            else image_array(ip_adapter_image, *image_size(ip_adapter_image)),
            ip_scale=ip_adapter_scale,
            noise_source=noise_source,
            pag_scale=pag_scale,
            pag_adaptive_scale=pag_adaptive_scale,
            deepcache_interval=deepcache_interval,
            freeu=freeu,
            custom=custom_steps(timesteps, sigmas, xl=self.model_dir.arch.xl),
            hires_custom=custom_steps(hires_timesteps, hires_sigmas, xl=self.model_dir.arch.xl),
            apg=apg,
            inpainting_unet=self.model_dir.arch.inpainting_unet,
            guidance_embedded=bool(self.model_dir.arch.guidance_embedding),
            size_multiple=multiple,
            **sizes,
        )
        if request.decoder == "tiny" and not self.final_model(request).tiny_decoder:
            raise InvalidArgumentError(
                "decoder tiny needs a tiny VAE's decoder: export the model with --preview-vae DIR (a tiny "
                "VAE, AutoencoderTiny), or with --vae of one"
            )
        if crop is not None:
            request = dataclasses.replace(request, mask_crop=crop)
        if self.seamless:
            request = dataclasses.replace(request, seamless=True)
        if self.model_dir.arch.aesthetic and not request.image_to_image:
            raise UnsupportedConfigError("SDXL's refiner refines images: give it one (image to image)")
        if self.refiner is not None and request.inpainting and self.model_dir.arch.inpainting_unet:
            raise UnsupportedConfigError(
                "an inpainting model's run cannot be handed to a refiner: its latents outside the mask are "
                "still noisy at the switch (a plain model, which blends the image back in, can)"
            )
        if self.refiner is not None:  # both parts make a call (each raises InvalidArgumentError if not)
            request.schedule(self.model_dir.scheduler_config)
            request.refiner_pass(np.zeros(0)).schedule(self.refiner.model_dir.scheduler_config)
        return request

    def _control_images(self, control: ImageInput | Sequence[ImageInput] | None) -> list[ImageInput] | None:
        """One image input per ControlNet; InvalidArgumentError where the count is not the model's."""
        count = self.controlnets
        if control is None:
            if count:
                raise InvalidArgumentError(
                    f"this model's UNet is conditioned by {count} ControlNet(s): give a control image to each"
                )
            return None
        if not count:
            raise InvalidArgumentError(
                "a control image needs a ControlNet: export the checkpoint with one (sdengine export "
                "--controlnet DIR)"
            )
        if count == 1:
            return [control]
        if not isinstance(control, (list, tuple)) or len(control) != count:
            raise InvalidArgumentError(
                f"this model has {count} ControlNets: give a list of {count} control images"
            )
        return list(control)

    @staticmethod
    def _control_array(controls: list[ImageInput], height: int, width: int) -> np.ndarray:
        """(ControlNets, 1 or B, height, width, 3) in [0, 1]; every ControlNet's images, batched alike."""
        arrays = [image_array(c, height, width) for c in controls]
        if len({len(a) for a in arrays}) > 1:
            raise InvalidArgumentError("give every ControlNet the same number of control images")
        return np.stack(arrays)

    def __call__(
        self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, **settings: Any
    ) -> GenerationResult:
        progress, stop = settings.pop("progress", None), settings.pop("stop", None)
        callback, every = settings.pop("preview", None), settings.pop("preview_every", 1)
        preview = None if callback is None else Preview(callback, every)
        return self.generate(self.request(prompt, negative_prompt, **settings), progress, preview, stop)


class Pipeline(_CallMixin):
    """The lean runtime: load once, call many times. ``Pipeline.load(onnx_dir)("a photo of a cat")``."""

    def __init__(
        self,
        model_dir: ModelDir,
        backend: Backend,
        tokenizer: ClipTokenizer,
        *,
        vae_tiling: bool = False,
        safety_checker: bool = True,
    ) -> None:
        """``safety_checker``: run the export's safety checker, where it has one, on every image."""
        self.model_dir = model_dir
        self.backend = backend
        self.tokenizer = tokenizer
        #: SDXL's second text encoder's tokenizer (which pads with "!"); the refiner's only one
        self.tokenizer_2: ClipTokenizer | None = None
        if model_dir.arch.xl:
            first = model_dir.arch.first_text_encoder
            self.tokenizer_2 = ClipTokenizer.from_dir(model_dir.tokenizer_2_dir) if first else tokenizer
        if vae_tiling:
            check_tileable(model_dir.arch)
        self.vae_tiling = vae_tiling
        self.safety_checker = safety_checker and model_dir.onnx_path(SAFETY_CHECKER).is_file()
        # its image processor's settings, read once
        self._clip_config = optional_json(model_dir.root / PREPROCESSOR_CONFIG) if self.safety_checker else {}
        # one generation at a time: a backend's per-shape buffers, stream and graphs serve every run
        self._lock = threading.Lock()
        self._loras: list[tuple[LoraFile, float]] = []  # fused into the backend's weights, in load order

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        backend: str = "auto",
        device: str | None = None,
        threads: int | None = None,
        optimized_cache: bool = False,
        graphs: str = "step",
        vae_tiling: bool = False,
        controlnets: Sequence[str | os.PathLike] = (),
        safety_checker: bool = True,
        refiner: str | os.PathLike | None = None,
        ip_adapter: str | os.PathLike | None = None,
        vae: str | os.PathLike | None = None,
        cuda_options: Mapping[str, object] | None = None,
        pag_layers: Sequence[str] | None = None,
        seamless: bool = False,
        preview_vae: str | os.PathLike | None = None,
        deepcache: int | None = None,
    ) -> ImageGenerator:
        """Load a model directory: an ONNX export (``ort``), a TensorRT engine directory (``trt``) or a
        diffusers checkpoint (``torch``). ``auto`` picks by directory and hardware; ``.choice`` says which.
        ``optimized_cache``: on the CPU, keep ONNX Runtime's optimised graphs per machine for fast starts.
        ``graphs`` (GPU): ``step`` captures each whole denoising step as one CUDA graph; ``ort`` uses ONNX
        Runtime's own graph mode (ONNX Runtime on CUDA only); ``none`` runs without graphs. ``vae_tiling``:
        the VAE runs images larger than its training size in overlapping tiles, as diffusers'
        ``enable_vae_tiling()`` does (see ``sdengine.vae_tiling``), so its memory stays that of one tile.
        ``controlnets``: ControlNet directories, for a diffusers checkpoint (``torch``); an export holds its
        ControlNets inside its UNet (``sdengine export --controlnet``). ``safety_checker``: run the model's
        safety checker, where it has one (SD 1.x checkpoints do), on every image, as diffusers does: a
        flagged image comes out black and ``GenerationResult.nsfw`` says which. ``refiner``: a model
        directory of the same kind, loaded the same way, that finishes every run (:mod:`sdengine.refiner`;
        SDXL's refiner for SDXL base). ``ip_adapter``: an IP-Adapter weights file (its image encoder in
        ``image_encoder/`` beside it), for a diffusers checkpoint (``torch``); an export holds its IP-Adapter
        inside its UNet (``sdengine export --ip-adapter``). ``vae``: another VAE for a diffusers checkpoint
        (``torch``; :mod:`export.vae_override`); an export holds its VAE (``sdengine export --vae``).
        ``cuda_options``: more options for ONNX Runtime's CUDA provider, such as ``{"prefer_nhwc": "1"}``
        (ONNX Runtime on CUDA only; :mod:`sdengine.backends.cuda_options`). ``pag_layers``: where
        perturbed-attention guidance perturbs the UNet's self-attention, for a diffusers checkpoint
        (``torch``; default ``mid``); an export holds its own (``sdengine export --pag-layers``).
        ``seamless``: the UNet's and VAE's convolutions wrap around the edges, so the images tile, for a
        diffusers checkpoint (``torch``); an export is seamless or not (``sdengine export --seamless``).
        ``preview_vae``: a tiny VAE whose decoder draws ``tiny`` previews, for a diffusers checkpoint
        (``torch``); an export holds one or not (``sdengine export --preview-vae``). ``deepcache``: the
        DeepCache branch that requests with a ``deepcache_interval`` run at, for a diffusers checkpoint
        (``torch``: the authors' ``DeepCacheSDHelper``); an export holds its own (``sdengine export
        --deepcache``)."""
        kind = model_kind(path)
        gpu_matters = device != "cpu"  # an explicit CPU run needs no CUDA probe
        has = detect(torch_cuda=gpu_matters and kind == "checkpoint", ort_cuda=gpu_matters)
        choice = choose(backend, device, kind, has)
        torch_only = {  # what an export holds, and so only a diffusers checkpoint takes at load
            "ControlNets are traced into an export's UNet (sdengine export --controlnet DIR)": controlnets,
            "an IP-Adapter is traced into an export's UNet (sdengine export --ip-adapter FILE)": ip_adapter,
            "an export holds its VAE (sdengine export --vae)": vae,
            "an export's UNet holds its perturbed-attention guidance layers (sdengine export --pag-layers)": (
                pag_layers
            ),
            "an export is seamless or not (sdengine export --seamless)": seamless,
            "an export holds its preview decoder (sdengine export --preview-vae)": preview_vae,
            "an export's UNet is cut for DeepCache or not (sdengine export --deepcache)": (
                deepcache is not None
            ),
        }
        for what, given in torch_only.items():
            if given not in (None, False, (), []) and choice.backend != "torch":
                raise InvalidArgumentError(
                    f"{what}: export the checkpoint so and load that export; only the torch backend takes "
                    "it at load"
                )
        if cuda_options and (choice.backend, choice.device) != ("ort", "cuda"):
            raise InvalidArgumentError(
                "CUDA provider options are ONNX Runtime's: they need the ort backend on cuda, and this run "
                f"is {choice.backend} on {choice.device}"
            )
        if choice.backend == "torch":
            from sdengine.baseline import TorchPipeline

            if vae is not None:
                from export.vae_override import checkpoint_with_vae

                path = checkpoint_with_vae(path, vae)

            pipeline: ImageGenerator = TorchPipeline.load(
                path,
                device=choice.device,
                threads=threads,
                vae_tiling=vae_tiling,
                controlnets=controlnets,
                safety_checker=safety_checker,
                ip_adapter=ip_adapter,
                pag_layers=pag_layers,
                seamless=seamless,
                preview_vae=preview_vae,
                deepcache=deepcache,
            )
        elif choice.backend == "trt":
            from sdengine.backends.trt import TrtBackend

            trt_backend = TrtBackend.load(path, graphs=graphs)
            model_dir = trt_backend.model_dir
            tokenizer = ClipTokenizer.from_dir(model_dir.tokenizer_dir)
            pipeline = cls(
                model_dir, trt_backend, tokenizer, vae_tiling=vae_tiling, safety_checker=safety_checker
            )
        else:
            model_dir = open_onnx_dir(path)
            tokenizer = ClipTokenizer.from_dir(model_dir.tokenizer_dir)
            if choice.device == "cuda":
                from sdengine.backends.ort_cuda import OrtCudaBackend

                ort_backend: Backend = OrtCudaBackend(
                    model_dir, threads=threads, graphs=graphs, cuda_options=cuda_options
                )
            else:
                ort_backend = OrtBackend(model_dir, threads=threads, optimized_cache=optimized_cache)
            pipeline = cls(
                model_dir, ort_backend, tokenizer, vae_tiling=vae_tiling, safety_checker=safety_checker
            )
        pipeline.choice = choice
        if refiner is not None:
            settings = {"threads": threads, "graphs": graphs, "optimized_cache": optimized_cache}
            settings |= {"backend": choice.backend, "device": choice.device, "vae_tiling": vae_tiling}
            settings |= {"safety_checker": False}  # the base's checks the images
            settings |= {"cuda_options": cuda_options}
            pipeline.set_refiner(cls.load(refiner, **settings))
        return pipeline

    def generate(
        self,
        request: GenerationRequest,
        progress: Progress | None = None,
        preview: Preview | None = None,
        stop: Stop | None = None,
    ) -> GenerationResult:
        """Run ``request``. Safe to call from several threads: generations on one pipeline take turns.
        ``preview``: look at the latents part way (:class:`Preview`; :meth:`preview_images` decodes them).
        ``stop``: asked between two steps; once it answers True (say, from another thread) the generation
        ends with the images of the latents so far (the hires fix's second pass does not start)."""
        times = StageTimes()
        # a refiner's backend serves this run too: it takes its turn as well
        final = self.final_model(request)
        with (
            self._lock,
            final._lock if final is not self else contextlib.nullcontext(),
            times.time("total"),
        ):
            latents = self.denoised_passes(request, times, progress, preview, stop)
            with times.time("vae_decode"):
                images, nsfw = final.final_images(request, latents), None
            if self.safety_checker:
                with times.time("safety_checker"):
                    images, nsfw = self.check_safety(images)
            if request.mask_crop is not None:  # after the safety check, as diffusers orders them
                images = request.mask_crop.paste(images)
        return GenerationResult(images, request, times, self.backend.name, latents, nsfw)

    def denoised(
        self,
        request: GenerationRequest,
        times: StageTimes,
        progress: Progress | None = None,
        preview: Preview | None = None,
        stop: Stop | None = None,
    ) -> np.ndarray:
        """One pass of ``request``: its prompts encoded, its first latents made and denoised; the final
        latents."""
        schedule = request.schedule(self.model_dir.scheduler_config)
        run = request.run_schedule(self.model_dir.scheduler_config, schedule)
        cfg = request.classifier_free_guidance
        edits = request.prompt_edits(schedule, run)
        contexts, pooled = self.encode_prompts(edits.texts, request, times)
        contexts = contexts[edits.rows]  # (sets, G * B, ...)
        unet_constants = {}
        if pooled is not None:  # SDXL: its added conditioning
            pooled = pooled[edits.rows]  # (sets, G * B, pooled)
            if cfg and request.default_negative and self.model_dir.zero_negative:
                contexts, pooled = zero_negatives(contexts, pooled, request.batch)
            arch = self.model_dir.arch
            unet_constants = xl_unet_inputs(
                pooled[0], request.height, request.width, request.sizes, request.copies, cfg, arch.aesthetic
            )
        latents, inputs = self.initial_latents(request, schedule, times)
        if edits.edited:  # every call's text embeddings, which the step model hands the UNet
            inputs.update(contexts=contexts, context_index=edits.call_rows)
            if pooled is not None:  # ... and SDXL's pooled ones
                inputs["pooled"] = pooled
                del unet_constants[TEXT_EMBEDS]
        if cfg and request.guidance_rescale:  # as diffusers: with classifier-free guidance only
            inputs["guidance_rescale"] = request.guidance_rescale
        if cfg and request.apg is not None:  # adaptive projected guidance's settings
            inputs["apg"] = apg_input(request.apg)
        if request.guided_parts:  # the weights of composable prompts' parts (or PAG's)
            inputs["part_weights"] = request.call_part_weights(schedule)
        if self.model_dir.arch.pag:  # which rows' self-attention is perturbed: none without PAG
            unet_constants[PAG_ROWS] = perturbed_rows(request.copies, request.batch, bool(request.pag_scale))
        if self.model_dir.arch.freeu:  # FreeU's scales: those that turn it off without any
            unet_constants[FREEU] = freeu_input(request.freeu)
        if self.model_dir.arch.guidance_embedding:  # the guidance scale, as the UNet takes it
            unet_constants[TIMESTEP_COND] = guidance_embedding(
                request.guidance, request.copies * request.batch, self.model_dir.arch.guidance_embedding
            )
        if self.model_dir.arch.ip_adapter:  # the image prompt's embeddings, or none (scale 0)
            unet_constants.update(self.image_prompt_inputs(request, times))
        if request.control is not None:
            unet_constants.update(control_images(request.control, request.batch, request.copies))
            if self.model_dir.arch.control_residuals:  # each row's weight of each residual: the modes
                unet_constants[CONTROL_WEIGHTS] = control_mode_weights(
                    request.control_modes,
                    self.model_dir.arch.control_residuals,
                    request.batch,
                    request.copies,
                    cfg,
                )
            elif set(request.control_modes) != {"balanced"}:
                raise UnsupportedConfigError(
                    f"{self.model_dir.root}'s UNet was exported before control modes: export it again to "
                    f"run {', '.join(sorted(set(request.control_modes) - {'balanced'}))}"
                )
            inputs["control_scales"] = control_schedule(  # their shares of the whole run
                request.control_scales,
                request.control_starts,
                request.control_ends,
                len(run.timesteps),
            )[: len(schedule.timesteps)]
        plan = DenoisePlan(
            latents=latents,
            context=contexts[0],
            tables=step_tables(schedule, request.step_noise(schedule, latents.shape), **inputs),
            guidance=request.guidance if cfg else None,
            unet_constants=unet_constants,
            deepcache_interval=request.deepcache_interval,
            lead_timesteps=schedule.lead_timesteps,
        )
        with times.time("denoise"):
            return denoise(self.backend, plan, times, progress, preview, stop)

    def image_prompt_inputs(self, request: GenerationRequest, times: StageTimes) -> dict[str, np.ndarray]:
        """The UNet's IP-Adapter inputs (:func:`sdengine.ip_adapter.ip_unet_inputs`): the image prompt
        through the image encoder, where the request has one."""
        arch, embeds, negative = self.model_dir.arch, None, None
        if request.ip_image is not None:
            pixels = ip_pixels(request.ip_image, arch.ip_image_size)
            with times.time("image_encoder"):
                if arch.ip_image_tokens:  # the negative side: the encoder's states of an all-zero input
                    both = np.concatenate([np.zeros_like(pixels), pixels])
                    negative, embeds = np.split(self.backend.encode_image_prompt(both), 2)
                else:
                    embeds = self.backend.encode_image_prompt(pixels)
        return ip_unet_inputs(
            embeds,
            negative,
            request.batch,
            request.copies,
            request.ip_scale,
            arch.ip_embeds_shape,
            request.classifier_free_guidance,
        )

    def decode_images(self, latents: np.ndarray) -> np.ndarray:
        """Latents as the UNet sees them -> images (B, H, W, 3) in [0, 1], through the VAE decoder."""
        return to_unit_range(self.decode(latents / np.float32(self.model_dir.vae_scaling_factor)))

    @property
    def tiny_previews(self) -> bool:
        return self.model_dir.onnx_path(PREVIEW_DECODER).is_file()

    def tiny_preview_images(self, latents: np.ndarray) -> np.ndarray:
        return to_unit_range(self.backend.decode_preview(latents / self._preview_scaling_factor))

    @functools.cached_property
    def _preview_scaling_factor(self) -> np.float32:
        """The preview decoder's VAE scaling factor (its config's; TAESD's is 1), read once."""
        config = optional_json(self.model_dir.root / PREVIEW_DECODER / "config.json")
        return np.float32(config.get("scaling_factor", 1.0))

    def check_safety(self, images: np.ndarray) -> tuple[np.ndarray, list[bool]]:
        """The safety checker on images (B, H, W, 3) in [0, 1]: them with each flagged one black, and the
        flags."""
        checked, flags = self.backend.check_safety(clip_pixels(images, self._clip_config), images)
        return checked, [bool(f) for f in flags]

    def encode_prompts(
        self, texts: Sequence[str], request: GenerationRequest, times: StageTimes
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Text embeddings (len(texts), sequence, hidden): plain, in windows of 75 tokens side by side in the
        sequence (``long_prompts``), or weighted (``prompt_weights``, tokenized as it is encoded); every text
        gets as many windows as the longest, the empty prompt's filling the rest. And SDXL's pooled text
        embeddings (len(texts), pooled), None for other models."""
        if self.tokenizer_2 is not None:
            return self._encode_xl(texts, request, times)
        return self._encode(texts, request, times), None

    def _encode_xl(
        self, texts: Sequence[str], request: GenerationRequest, times: StageTimes
    ) -> tuple[np.ndarray, np.ndarray]:
        """SDXL: each text encoder's states from its own tokenizer's ids, side by side in the hidden axis,
        (in windows, or weighted, as :meth:`_encode` makes them for each), and the second's pooled
        embeddings of each text's first window (:meth:`_pooled_ids`; weights do not apply to them)."""
        tok_2, skip = self.tokenizer_2, request.clip_skip
        assert tok_2 is not None
        both = self.model_dir.arch.first_text_encoder  # not the refiner, whose text is the second's alone
        if not (request.long_prompts or request.prompt_weights):  # both of the second's from one run
            with times.time("tokenize"):
                ids_2 = tok_2(texts)
            with times.time("text_encoder"):
                second, pooled = self.backend.encode_text_2(ids_2, skip)
            if not both:
                return second, pooled
            with times.time("tokenize"):
                ids = self.tokenizer(texts)
            with times.time("text_encoder"):
                first = self.backend.encode_text(ids, skip)
            return np.concatenate([first, second], axis=-1), pooled
        second = self._encode(
            texts, request, times, tok_2, lambda ids, s: self.backend.encode_text_2(ids, s)[0]
        )
        with times.time("text_encoder"):
            pooled = self.backend.encode_text_2(self._pooled_ids(texts, request), skip)[1]
        if not both:
            return second, pooled
        first = self._encode(texts, request, times, self.tokenizer, self.backend.encode_text)
        if first.shape[1] != second.shape[1]:  # pragma: no cover - SDXL's two tokenizers share a vocabulary
            raise UnsupportedConfigError("SDXL's two tokenizers split this prompt into different windows")
        return np.concatenate([first, second], axis=-1), pooled

    def _pooled_ids(self, texts: Sequence[str], request: GenerationRequest) -> np.ndarray:
        """The ids SDXL's pooled embeddings are read from: in the AUTOMATIC1111 syntax, each text's first
        window as the web UI fills it; otherwise the text as it is, cut to one window (as compel and
        diffusers read it)."""
        tok = self.tokenizer_2
        assert tok is not None
        if request.prompt_weights != "a1111":
            return tok.chunks(texts)[:, 0]  # the first window: the text cut to one window, without a warning
        specials, comma = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id), tok.content_ids(",")[0]
        return np.stack(
            [
                a1111_windows(parse_a1111(t), tok.content_ids, specials, comma, tok.max_length - 2)[0][0]
                for t in texts
            ]
        )

    def _encode(
        self,
        texts: Sequence[str],
        request: GenerationRequest,
        times: StageTimes,
        tokenizer: ClipTokenizer | None = None,
        encoder: Callable[[np.ndarray, int], np.ndarray] | None = None,
    ) -> np.ndarray:
        """:meth:`encode_prompts`' text embeddings, with ``tokenizer`` and ``encoder`` (ids, clip_skip) ->
        states (default: the first text encoder's)."""
        tokenizer, encoder = tokenizer or self.tokenizer, encoder or self.backend.encode_text
        encode = lambda ids: encoder(ids, request.clip_skip)  # noqa: E731
        if request.prompt_weights:
            with times.time("text_encoder"):
                return self._weighted(texts, request.prompt_weights, request.long_prompts, encode, tokenizer)
        with times.time("tokenize"):
            ids = tokenizer.chunks(texts) if request.long_prompts else tokenizer(texts)[:, None]
        with times.time("text_encoder"):
            windows = encode(ids.reshape(-1, ids.shape[-1]))  # each window on its own, then side by side
        return windows.reshape(len(texts), -1, windows.shape[-1])

    def _weighted(
        self,
        texts: Sequence[str],
        syntax: str,
        long: bool,
        encode: Callable[[np.ndarray], np.ndarray],
        tok: ClipTokenizer,
    ) -> np.ndarray:
        specials, window = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id), tok.max_length - 2
        empty = encode(tok([""]))[0]
        if syntax == "a1111":
            comma = tok.content_ids(",")[0]
            embeds = [
                a1111_embeddings(parse_a1111(t), tok.content_ids, encode, specials, comma, window, long)
                for t in texts
            ]
        else:
            embeds = [
                weighted_embeddings(parse_weighted(t), tok.content_ids, encode, specials, window, long, empty)
                for t in texts
            ]
        longest = max(len(e) for e in embeds)
        return np.stack([np.concatenate([e, *[empty] * ((longest - len(e)) // len(empty))]) for e in embeds])

    def load_textual_inversion(self, path: str | os.PathLike, token: str | None = None) -> str:
        """Add a textual inversion embedding (a safetensors file in diffusers' or A1111's format; for SDXL,
        one with ``clip_l`` and ``clip_g`` vectors, one set for each text encoder) as a prompt token:
        ``token``, or the name the file gives. Returns the token. As diffusers does, an n-vector embedding
        adds ``token``, ``token_1`` ... ``token_{n-1}``, and a prompt naming ``token`` reads all n (see
        ``sdengine.textual_inversion``)."""
        with self._lock:
            if self.tokenizer_2 is None:
                token, vectors = read_embedding(path, token)
                self._add_tokens(token, [(self.tokenizer, TEXT_ENCODER, vectors)])
                return token
            token, first, second = read_xl_embedding(path, token)
            arch = self.model_dir.arch
            widths = (arch.text_hidden_size - arch.text_hidden_size_2, arch.text_hidden_size_2)
            if second.shape[1] != widths[1] or (arch.first_text_encoder and first.shape[1] != widths[0]):
                raise InvalidArgumentError(
                    f"{path}: vectors of widths {first.shape[1]} and {second.shape[1]} for text encoders of "
                    f"widths {widths[0]} and {widths[1]}: the embedding was made for another model"
                )
            parts = [(self.tokenizer_2, TEXT_ENCODER_2, second)]  # the refiner reads clip_g alone
            if arch.first_text_encoder:
                parts.insert(0, (self.tokenizer, TEXT_ENCODER, first))
            self._add_tokens(token, parts)
            return token

    def _add_tokens(self, token: str, parts: list[tuple[ClipTokenizer, str, np.ndarray]]) -> None:
        """Give each (tokenizer, its text encoder, vectors) the embedding's tokens: the text encoders first,
        so that a refusal there leaves the tokenizers as they were."""
        tokens = vector_tokens(token, len(parts[0][2]))
        ids = [tokenizer.next_ids(tokens) for tokenizer, _, _ in parts]
        for (_, component, vectors), new_ids in zip(parts, ids, strict=True):
            self.backend.set_token_embeddings(dict(zip(new_ids, vectors, strict=True)), component)
        for (tokenizer, _, _), new_ids in zip(parts, ids, strict=True):
            if tokenizer.add_tokens(tokens) != new_ids:  # pragma: no cover - tokenizers assigns ids in order
                raise AssertionError("the tokenizer gave the new tokens other ids than expected")

    def load_lora(self, path: str | os.PathLike, scale: float = 1.0) -> int:
        """Fuse a LoRA (a safetensors file in diffusers', PEFT's or kohya's layout) into the UNet and text
        encoder (SDXL's two) with weight ``scale``, on top of those loaded before, as diffusers'
        ``load_lora_weights`` then ``fuse_lora(lora_scale=scale)`` does. The model files are left alone: the
        fused weights are computed from them and replace theirs in the reopened sessions. Returns how many
        layers it updates. ONNX Runtime only: a TensorRT engine holds its weights (``sdengine export --lora``
        fuses them there)."""
        with self._lock:
            lora = self._read_lora(path)
            self._set_loras([*self._loras, (lora, float(scale))])
            return len(lora.layers)

    def unload_loras(self) -> None:
        """Back to the model files' own weights."""
        with self._lock:
            self._set_loras([])

    @property
    def loras(self) -> list[tuple[Path, float]]:
        """The LoRAs fused now: (file, weight), in the order they were fused."""
        return [(lora.path, scale) for lora, scale in self._loras]

    def set_loras(self, loras: Sequence[tuple[str | os.PathLike, float]]) -> None:
        """Run with exactly these (file, weight) LoRAs, fused in this order from the model files' weights
        (what the HTTP API's ``<lora:NAME:WEIGHT>`` tags ask for, generation by generation). The set fused
        already costs nothing; another reopens the sessions of the components either set updates."""
        with self._lock:
            wanted = [(Path(path).resolve(), float(scale)) for path, scale in loras]
            if wanted == [(path.resolve(), scale) for path, scale in self.loras]:
                return
            self._set_loras([(self._read_lora(path), scale) for path, scale in wanted])

    def _read_lora(self, path: str | os.PathLike) -> LoraFile:
        """A LoRA file for this model; InvalidArgumentError where it updates a component the model has not
        (an SDXL LoRA on a model with one text encoder)."""
        lora = read_lora(path)
        missing = sorted(lora.components() - set(self.model_dir.arch.components()))
        if missing:
            raise InvalidArgumentError(f"{path} updates {', '.join(missing)}, which this model does not have")
        if self.model_dir.cuda_fused and UNET in lora.components():
            raise InvalidArgumentError(
                f"{self.model_dir.root}'s UNet is fused for CUDA (export --target cuda), its attention "
                "weights packed: fuse the LoRA at export instead (sdengine export --lora FILE:WEIGHT)"
            )
        return lora

    def _set_loras(self, loras: list[tuple[LoraFile, float]]) -> None:
        """Every component any LoRA (then or now) updates gets the fusion of all of ``loras`` from its file's
        weights, so loading one after another never compounds rounding, and unloading restores the file's."""
        components = sorted({c for lora, _ in [*self._loras, *loras] for c in lora.components()})
        weights = {c: self._fused(c, loras) for c in components}  # a bad file stops here, before any change
        done = []
        try:
            for component in components:
                self.backend.set_weights(component, weights[component])
                done.append(component)
        except BaseException:
            for component in done:  # back to what the others still run with
                self.backend.set_weights(component, self._fused(component, self._loras))
            raise
        self._loras = loras

    def _fused(self, component: str, loras: list[tuple[LoraFile, float]]) -> dict[str, np.ndarray]:
        path = self.model_dir.onnx_path(component)  # none in an engine directory, whose backend refuses
        return fused_weights(path, component, loras) if loras and path.is_file() else {}

    def initial_latents(
        self, request: GenerationRequest, schedule: Schedule, times: StageTimes
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """The first latents, and the step's inpainting inputs (keywords of :func:`step_tables`).

        Text to image: the seed's unit noise at the scheduler's initial sigma. Image to image: the image's
        latents (VAE encoder, sampled) noised to the first timestep that runs, as the scheduler's
        ``add_noise`` does, with the same unit noise. A refiner's part of a run: the base's latents.
        Inpainting, as diffusers' inpainting pipeline, starts from pure noise at strength 1."""
        arch = self.model_dir.arch
        noise = request.initial_latents(arch)
        if not request.image_to_image:
            return noise * np.float32(schedule.init_noise_sigma), {}
        if request.denoising_start is not None:  # a refiner's part: the base's latents, noisy as they are
            start = np.array(request.init_latents, np.float32)
            if not request.inpainting:
                return start, {}
            # diffusers' SDXL inpainting from latents: they are also the image blended in outside the mask
            # (where the base's last step left the image's own latents), noised by the seed's noise
            return start, {"blend": Blend(self.latent_mask(request, noise), start, noise)}
        if request.init_latents is not None:  # the hires fix's second pass: latents, not an image
            image_scale, noise_scale = schedule.image_noise
            return (image_scale * request.init_latents + noise_scale * noise).astype(np.float32), {}
        with times.time("vae_encode"):
            pixels, image_latents = request.pixels(), None
            if not request.starts_from_noise or (request.inpainting and not arch.inpainting_unet):
                image_latents = self.encode(pixels, request.batch, request.encoder_noise)
            inpainting = (
                self.inpainting_inputs(request, pixels, noise, image_latents) if request.inpainting else {}
            )
        if request.starts_from_noise:
            return noise * np.float32(schedule.init_noise_sigma), inpainting
        mask = self.latent_mask(request, noise) if request.inpainting else None
        start = masked_start(image_latents, mask, noise, request.masked_content)
        image_scale, noise_scale = schedule.image_noise
        return (image_scale * start + noise_scale * noise).astype(np.float32), inpainting

    def inpainting_inputs(
        self,
        request: GenerationRequest,
        pixels: np.ndarray,
        noise: np.ndarray,
        image_latents: np.ndarray | None,
    ) -> dict[str, Any]:
        """The step's inpainting inputs. An inpainting UNet gets the mask and the masked image's latents
        beside the latents in every call; a plain UNet's result is blended, after every step, with the image
        noised (by the initial ``noise``) to the next timestep, outside the mask."""
        mask, latent_mask = request.mask_pixels(), self.latent_mask(request, noise)
        if not self.model_dir.arch.inpainting_unet:
            assert image_latents is not None
            return {"blend": Blend(latent_mask, image_latents, noise)}
        masked = self.encode(pixels * (mask < 0.5), request.batch, request.masked_encoder_noise)
        conditioning = np.concatenate([latent_mask, masked], axis=1)
        return {"unet_conditioning": np.concatenate([conditioning] * request.copies)}

    def latent_mask(self, request: GenerationRequest, noise: np.ndarray) -> np.ndarray:
        """The inpainting mask at the latents' size (B, 1, h, w): nearest-neighbour downsampling, as torch's
        ``interpolate``, the top-left pixel of each block."""
        factor = self.model_dir.arch.vae_scale_factor
        mask = request.mask_pixels()[:, :, ::factor, ::factor]
        return np.broadcast_to(mask, (request.batch, 1, *noise.shape[2:]))

    def encode(
        self, pixels: np.ndarray, batch: int, unit_noise: Callable[[tuple[int, ...]], np.ndarray]
    ) -> np.ndarray:
        """Images (1 or ``batch``, 3, H, W) in [-1, 1] -> a sample of their latents per batch item (a tiny
        VAE's latents themselves), scaled as the UNet takes them. One image for the whole batch is encoded
        once and sampled once per item (as ``batch`` copies would be)."""
        tile = self.model_dir.vae_sample_size
        if self.vae_tiling and needs_tiles(pixels, tile):
            parameters = run_tiled(
                self.backend.encode_image, pixels, tile, tile // self.model_dir.arch.vae_scale_factor
            )
        else:
            parameters = self.backend.encode_image(pixels)
        parameters = np.concatenate([parameters] * (batch // len(parameters)))
        if self.model_dir.arch.tiny_vae:  # its encoder gives the latents, drawing no noise (as in diffusers)
            return parameters.astype(np.float32) * self.model_dir.vae_scaling_factor
        return sample_latents(parameters, unit_noise) * self.model_dir.vae_scaling_factor

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """The VAE decoder on latents already divided by the scaling factor; in tiles with ``vae_tiling``."""
        tile = self.model_dir.vae_sample_size // self.model_dir.arch.vae_scale_factor
        if self.vae_tiling and needs_tiles(latents, tile):
            return run_tiled(self.backend.decode_latents, latents, tile, self.model_dir.vae_sample_size)
        return self.backend.decode_latents(latents)


def masked_start(
    image_latents: np.ndarray, mask: np.ndarray | None, noise: np.ndarray, content: str
) -> np.ndarray:
    """The latents image to image starts from before they are noised: the image's, with the part ``mask``
    (latent-sized, 1 where repainted) replaced by the seed's unit ``noise`` ("latent noise") or zeros
    ("latent nothing"), as the web UI's ``inpainting_fill`` 2 and 3 replace it; "original" keeps it."""
    if content == "original" or mask is None:
        return image_latents
    fill = noise if content == "latent noise" else np.zeros_like(image_latents)
    return (image_latents * (1 - mask) + fill * mask).astype(np.float32)


def sample_latents(parameters: np.ndarray, unit_noise: Callable[[tuple[int, ...]], np.ndarray]) -> np.ndarray:
    """A sample of the VAE encoder's diagonal Gaussian, whose (B, 2C, h, w) parameters are C means then C
    log-variances (clamped to [-30, 20], as diffusers does): mean + exp(logvar / 2) * unit noise."""
    mean, logvar = np.split(parameters.astype(np.float32), 2, axis=1)
    std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
    return mean + std * unit_noise(mean.shape)
