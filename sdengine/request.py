"""A validated generation request: every user-supplied setting checked once, before any model runs."""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sdengine.apg import APG, check_apg
from sdengine.composable import Parts, composable_parts, part_count, part_texts, part_weights
from sdengine.controlnet import CONTROL_MODES
from sdengine.deepcache import check_interval
from sdengine.errors import InvalidArgumentError, UnsupportedConfigError
from sdengine.freeu import FreeUScales, check_freeu
from sdengine.hires import HiresFix, hires_fix
from sdengine.images import image_array
from sdengine.mask_crop import MaskCrop
from sdengine.model_specs import Architecture
from sdengine.pag import call_weights, check_pag_scale, pag_parts
from sdengine.prompt_editing import PromptEdits, prompt_edits
from sdengine.schedulers import CustomSteps, Schedule, load_scheduler
from sdengine.schedulers.base import img2img_start
from sdengine.step_graph import unet_copies
from sdengine.torch_noise import TorchCpuGenerator
from sdengine.xl_conditioning import SizeConditioning, size_conditioning

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5
DEFAULT_STRENGTH = 0.8  # diffusers' image-to-image default
DEFAULT_INPAINT_STRENGTH = 1.0  # ... and its inpainting default
#: what decodes the final images (``GenerationRequest.decoder``)
DECODERS = ("vae", "tiny")
#: what an inpainting's masked part starts from (``GenerationRequest.masked_content``)
MASKED_CONTENTS = ("original", "latent noise", "latent nothing")
#: where the seeds' noise comes from: sdengine's own streams (one per kind of draw), or PyTorch's CPU
#: generator as diffusers' text-to-image, image-to-image and inpainting pipelines draw from it
#: (sdengine.torch_noise)
NOISE_SOURCES = ("sdengine", "torch-cpu")


@dataclass(frozen=True)
class GenerationRequest:
    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]
    steps: int
    guidance: float
    scheduler: str | None
    seed: int
    height: int
    width: int
    latents: np.ndarray | None = field(default=None, compare=False, repr=False)
    #: image-to-image: (1 or B, height, width, 3) float32 in [0, 1], and how much of the schedule to run
    image: np.ndarray | None = field(default=None, compare=False, repr=False)
    strength: float = DEFAULT_STRENGTH
    #: inpainting: (1 or B, height, width) float32, 1 where the image is repainted and 0 where it is kept
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)
    #: text embeddings from this many layers before the text encoder's last (diffusers' clip_skip)
    clip_skip: int = 0
    #: guidance rescale's factor in [0, 1] (Lin et al. 2023, sec. 3.4; diffusers' guidance_rescale)
    guidance_rescale: float = 0.0
    #: prompts of any length, encoded in windows of 75 tokens whose embeddings are concatenated
    long_prompts: bool = False
    #: the weighting syntax prompts are read in: "" (none), "compel" (``(red cat)1.3``, ``dog+``; see
    #: sdengine.prompt_weights) or "a1111" (``(red cat:1.3)``, ``[dog]``; see sdengine.prompt_weights_a1111)
    prompt_weights: str = ""
    #: ControlNet: a conditioning image per ControlNet, (ControlNets, 1 or B, height, width, 3) in [0, 1]
    control: np.ndarray | None = field(default=None, compare=False, repr=False)
    #: ... and each ControlNet's weight (diffusers' controlnet_conditioning_scale)
    control_scales: tuple[float, ...] = ()
    #: ... and the share of the schedule each ControlNet runs in, [start, end) (diffusers'
    #: control_guidance_start and control_guidance_end)
    control_starts: tuple[float, ...] = ()
    control_ends: tuple[float, ...] = ()
    #: ... and how each one's residuals are weighed (:data:`sdengine.controlnet.CONTROL_MODES`)
    control_modes: tuple[str, ...] = ()
    #: variations: the initial noise moves this far (0 to 1, along the sphere) towards the noise of
    #: ``variation_seed`` (image ``i``: ``variation_seed + i``)
    variation_seed: int | None = None
    variation_strength: float = 0.0
    #: the hires fix: a second pass, image to image at a larger size (see sdengine.hires)
    hires: HiresFix | None = None
    #: image to image from latents (B, C, h, w), as the UNet takes them, not from an image: the hires fix's
    #: second pass
    init_latents: np.ndarray | None = field(default=None, compare=False, repr=False)
    #: no negative prompt was given (each is the empty prompt): an SDXL model's negative side then reads
    #: zeros, as diffusers' ``force_zeros_for_empty_prompt`` has it
    default_negative: bool = False
    #: SDXL's size conditioning, where it is given (see sdengine.xl_conditioning)
    sizes: SizeConditioning = SizeConditioning()
    #: a refiner finishes the run: the base model makes its calls down to this share of the training
    #: timesteps, the refiner the rest (diffusers' ``denoising_end``; see sdengine.refiner)
    refiner_switch: float | None = None
    #: the refiner's part of such a run, from its ``init_latents``, which starts at this share (diffusers'
    #: ``denoising_start``)
    denoising_start: float | None = None
    #: an IP-Adapter's image prompt, (1, H, W, 3) float32 in [0, 1] at its own size, and its weight
    ip_image: np.ndarray | None = field(default=None, compare=False, repr=False)
    ip_scale: float = 1.0
    #: one of NOISE_SOURCES
    noise_source: str = "sdengine"
    #: inpainting by a UNet that takes the mask and masked image (which decides diffusers' order of draws)
    inpainting_unet: bool = False
    #: inpainting: what the masked part's latents start from (:data:`MASKED_CONTENTS`): the image's own
    #: ("original", diffusers'), the seed's noise ("latent noise") or zeros ("latent nothing"), the web UI's
    #: ``inpainting_fill`` 1, 2 and 3, before they are noised to the first step
    masked_content: str = "original"
    #: what decodes the images (:data:`DECODERS`): the model's VAE, or a tiny VAE's decoder (the preview
    #: decoder of an export made with ``--preview-vae``, or the VAE where that is a tiny one): faster, a
    #: little less faithful (the web UI's ``sd_vae_decode_method`` "TAESD")
    decoder: str = "vae"
    #: inpainting only the mask's box (:mod:`sdengine.mask_crop`): ``image`` and ``mask`` are that box,
    #: resized; the images made are laid back into the original
    mask_crop: MaskCrop | None = field(default=None, compare=False, repr=False)
    #: composable prompts (the web UI's ``AND``, :mod:`sdengine.composable`): each image's parts (text,
    #: weight); empty where every prompt is one part of weight 1
    composable: tuple[Parts, ...] = ()
    #: perturbed-attention guidance's scale (:mod:`sdengine.pag`; 0: none), and its adaptive scale
    pag_scale: float = 0.0
    pag_adaptive_scale: float = 0.0
    #: the model's UNet and VAE wrap around the image's edges, so its images tile (set by the pipeline from
    #: the model, for the record: ``sdengine export --seamless``)
    seamless: bool = False
    #: the model's UNet takes the guidance scale as an input (a latent consistency model's:
    #: :mod:`sdengine.guidance_embedding`), so it runs no classifier-free guidance, as in diffusers
    guidance_embedded: bool = False
    #: DeepCache (:mod:`sdengine.deepcache`): the whole UNet on every this many calls, its shallow branch on
    #: the cached feature between them; 1 (the default): the whole UNet throughout
    deepcache_interval: int = 1
    #: FreeU's scales (s1, s2, b1, b2; :mod:`sdengine.freeu`); None: off
    freeu: FreeUScales | None = None
    #: adaptive projected guidance's settings (:mod:`sdengine.apg`) in place of classifier-free guidance's
    #: plain combination; None: the plain one
    apg: APG | None = None
    #: the run's own timesteps or sigmas (:mod:`sdengine.schedulers.custom`; diffusers' ``timesteps`` and
    #: ``sigmas``), in place of those the scheduler spaces out; ``steps`` is their count of steps
    custom: CustomSteps | None = None

    @property
    def guided_parts(self) -> tuple[Parts, ...]:
        """The parts guidance sums (:mod:`sdengine.composable`): the composable prompts', or
        perturbed-attention guidance's two (:func:`sdengine.pag.pag_parts`); empty for plain guidance."""
        if self.pag_scale:
            return pag_parts(self.prompts, self.guidance, self.pag_scale)
        return self.composable

    @property
    def image_to_image(self) -> bool:
        """An input image (or its latents) is denoised from (image to image, and inpainting)."""
        return self.image is not None or self.init_latents is not None

    @property
    def inpainting(self) -> bool:
        return self.mask is not None

    @property
    def starts_from_noise(self) -> bool:
        """diffusers' inpainting at full strength starts from pure noise, not from the noised image."""
        return not self.image_to_image or (self.inpainting and self.strength == 1.0)

    @property
    def schedule_strength(self) -> float:
        """The share of the schedule that runs: ``strength`` for image to image, all of it otherwise."""
        return self.strength if self.image_to_image else 1.0

    @property
    def batch(self) -> int:
        return len(self.prompts)

    @property
    def classifier_free_guidance(self) -> bool:
        """As in diffusers: guidance > 1 runs the UNet on [negative, positive] and combines the two (unless
        the UNet embeds the guidance scale; perturbed-attention guidance's perturbed copy is a part beside
        them); and composable prompts always run the negative side, as the web UI does."""
        return (self.guidance > 1.0 and not self.guidance_embedded) or bool(self.composable)

    @property
    def copies(self) -> int:
        """G, the UNet batch's multiple of the images: 1 without guidance, 2 with it, and 1 + K for
        composable prompts of K parts; perturbed-attention guidance's two parts make 3 with guidance, 2
        without."""
        parts = part_count(self.guided_parts) if self.guided_parts else 0
        return unet_copies(self.classifier_free_guidance, parts)

    @property
    def part_weights(self) -> np.ndarray | None:
        """Composable prompts' weights (K, B, 1, 1, 1) (:func:`sdengine.composable.part_weights`); None for
        plain guidance."""
        return part_weights(self.guided_parts) if self.guided_parts else None

    def call_part_weights(self, schedule: Schedule) -> np.ndarray | None:
        """:attr:`part_weights`, or with perturbed-attention guidance's adaptive scale each call's of
        ``schedule`` (calls, K, B, 1, 1, 1) (:func:`sdengine.pag.call_weights`)."""
        if not self.pag_adaptive_scale:
            return self.part_weights
        adaptive = self.pag_adaptive_scale
        return call_weights(self.guidance, self.pag_scale, adaptive, schedule.timesteps, self.batch)

    @property
    def seeds(self) -> tuple[int, ...]:
        """One seed per image: ``seed``, ``seed + 1``, ... Every random draw of image ``i`` comes from
        ``seeds[i]`` alone, so any image of a batch is made again by a batch of one with its seed."""
        return self._seeds_from(self.seed)

    def _seeds_from(self, first: int) -> tuple[int, ...]:
        """``first``, ``first + 1``, ... one per image (wrapping at 2**63)."""
        return tuple((first + i) % 2**63 for i in range(self.batch))

    def _draw(self, stream: int, shape: tuple[int, ...], seeds: tuple[int, ...] | None = None) -> np.ndarray:
        """Unit normal noise (B, *shape), item ``i`` from seed ``seeds[i]`` (default: the request's) and
        ``stream`` (0: initial latents, 1: per-step noise, 2: the image's latent sample, 3: the masked
        image's latent sample, 4: the refiner's per-step noise)."""
        if self.noise_source == "torch-cpu":
            return np.stack([self._torch_draw(stream, shape, seed) for seed in seeds or self.seeds])
        keys = [seed if stream == 0 else [seed, stream] for seed in seeds or self.seeds]
        return np.stack([np.random.default_rng(k).standard_normal(shape, dtype=np.float32) for k in keys])

    def _torch_draw(self, stream: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
        """One image's draws from PyTorch's CPU generator seeded with ``seed``, in the order diffusers' text
        and image to image and inpainting pipelines draw them: the image's latent sample (image to image;
        inpainting where the noised image starts the run or a plain UNet blends it in), the initial noise
        (unless the latents are supplied), the masked image's latent sample (inpainting, whatever the UNet),
        then each noisy step's noise. Every draw before ``stream``'s is latent-sized."""
        sample = self.image is not None and not (self.starts_from_noise and self.inpainting_unet)
        order = [2] * sample + [0] * (self.latents is None) + [3] * self.inpainting
        if stream not in (*order, 1):  # make_request refuses what draws in other orders
            raise InvalidArgumentError(f"noise_source 'torch-cpu' draws no stream {stream} noise")
        generator = TorchCpuGenerator(seed)
        before = order.index(stream) if stream != 1 else len(order)
        latent = shape if stream != 1 else shape[1:]
        for _ in range(before):
            generator.randn(latent)
        if stream != 1:
            return generator.randn(shape)
        return np.stack([generator.randn(latent) for _ in range(shape[0])])

    @property
    def texts(self) -> list[str]:
        """The texts the UNet's batch reads: the negative prompts then the prompts with classifier-free
        guidance, the prompts alone without (or in either case the guided parts', first parts first)."""
        positive = part_texts(self.guided_parts) if self.guided_parts else self.prompts
        if not self.classifier_free_guidance:
            return list(positive)
        return [*self.negative_prompts, *positive]

    def prompt_edits(self, schedule: Schedule, run: Schedule) -> PromptEdits:
        """What :attr:`texts` read call by call over this pass's ``schedule``: in the AUTOMATIC1111 syntax
        they may be edited part way (:mod:`sdengine.prompt_editing`), at steps of the whole ``run`` (a base
        model's and its refiner's together: :meth:`run_schedule`); otherwise every call reads them as they
        are."""
        calls = len(schedule.timesteps)
        if self.prompt_weights != "a1111":
            return PromptEdits(self.texts, np.arange(len(self.texts))[None], np.zeros(calls, int))
        edits = prompt_edits(self.texts, run.steps_run, len(run.timesteps))
        first = max(0, len(run.timesteps) - calls) if self.denoising_start is not None else 0  # the refiner's
        return edits.calls(first, first + calls)

    def schedule(self, scheduler_config: dict[str, Any]) -> Schedule:
        """This pass's schedule for a checkpoint's scheduler config: shortened by image to image, and where a
        refiner finishes the run, the base's part of it or the refiner's."""
        scheduler = load_scheduler(self.scheduler, scheduler_config, self.custom)
        if self.denoising_start is not None:
            return scheduler.schedule(self.steps, denoising_start=self.denoising_start)
        return scheduler.schedule(self.steps, self.schedule_strength, denoising_end=self.refiner_switch)

    def run_schedule(self, scheduler_config: dict[str, Any], schedule: Schedule) -> Schedule:
        """The whole run's schedule, which a base model and its refiner share out (the base's request's,
        uncut): steps such as prompt edits and ControlNets' shares count in it. ``schedule``: this pass's
        (:meth:`schedule`), which is the whole run where no refiner shares it."""
        if self.refiner_switch is None and self.denoising_start is None:
            return schedule
        scheduler = load_scheduler(self.scheduler, scheduler_config, self.custom)
        return scheduler.schedule(self.steps, self.schedule_strength)

    def latent_shape(self, arch: Architecture) -> tuple[int, int, int, int]:
        """(B, C, h, w) of this request's latents."""
        factor = arch.vae_scale_factor
        return (self.batch, arch.latent_channels, self.height // factor, self.width // factor)

    def initial_latents(self, arch: Architecture) -> np.ndarray:
        """Unit-variance initial latents: the caller's, or drawn from the seeds (alike on every backend)."""
        shape = self.latent_shape(arch)
        if self.latents is None and self.variation_strength:
            others = self._draw(0, shape[1:], self._seeds_from(self.variation_seed))
            return slerp(self.variation_strength, self._draw(0, shape[1:]), others)
        if self.latents is None:
            return self._draw(0, shape[1:])
        if tuple(self.latents.shape) != shape:
            raise InvalidArgumentError(
                f"latents have shape {tuple(self.latents.shape)}, expected {shape} for batch {self.batch} at "
                f"{self.height}x{self.width}"
            )
        return np.asarray(self.latents, dtype=np.float32)

    def hires_pass(
        self, *, image: np.ndarray | None = None, init_latents: np.ndarray | None = None
    ) -> GenerationRequest:
        """The hires fix's second pass, image to image at the larger size from the first pass's ``image``
        (resized to it) or ``init_latents`` (upscaled to it): the same prompts, seeds and settings, its noise
        drawn from the seeds at that size; ControlNet's images resized to it (as input images are)."""
        if self.hires is None:
            raise InvalidArgumentError("this request has no hires fix")
        hires = self.hires
        control = self.control
        if control is not None:
            control = np.stack([image_array(images, hires.height, hires.width) for images in control])
        return dataclasses.replace(
            self,
            height=hires.height,
            width=hires.width,
            steps=hires.steps,
            custom=hires.custom,
            strength=hires.strength,
            latents=None,
            image=image,
            init_latents=None if init_latents is None else np.asarray(init_latents, np.float32),
            control=control,
            hires=None,
        )

    def refiner_pass(self, latents: np.ndarray) -> GenerationRequest:
        """The refiner's part of the run, from the base's final ``latents`` as they are (not noised again):
        the same prompts, seeds and settings, from the switch on, with the run's strength (so that it counts
        the same steps); no ControlNet (the refiner has none). Inpainting keeps its mask: the refiner blends
        its steps with the base's latents outside it (:meth:`Pipeline.initial_latents`)."""
        if self.refiner_switch is None:
            raise InvalidArgumentError("this request has no refiner")
        return dataclasses.replace(
            self,
            strength=self.schedule_strength,
            latents=None,
            image=None,
            init_latents=np.asarray(latents, np.float32),
            control=None,
            control_scales=(),
            control_starts=(),
            control_ends=(),
            control_modes=(),
            refiner_switch=None,
            denoising_start=self.refiner_switch,
            ip_image=None,  # the base's IP-Adapter is its own
        )

    def pixels(self) -> np.ndarray:
        """The input image as the VAE encoder takes it: (1 or B, 3, height, width) float32 in [-1, 1]."""
        if self.image is None:
            raise InvalidArgumentError("this request has no input image")
        return np.ascontiguousarray(self.image.transpose(0, 3, 1, 2) * 2 - 1, dtype=np.float32)

    def mask_pixels(self) -> np.ndarray:
        """The inpainting mask as (1 or B, 1, height, width) float32: 1 repaints, 0 keeps."""
        if self.mask is None:
            raise InvalidArgumentError("this request has no mask")
        return np.ascontiguousarray(self.mask[:, None], dtype=np.float32)

    def encoder_noise(self, shape: tuple[int, ...]) -> np.ndarray:
        """The unit noise (B, C, h, w) that samples the image's latent distribution."""
        return self._batch_draw(2, shape)

    def masked_encoder_noise(self, shape: tuple[int, ...]) -> np.ndarray:
        """The unit noise (B, C, h, w) that samples the masked image's latent distribution (inpainting)."""
        return self._batch_draw(3, shape)

    def _batch_draw(self, stream: int, shape: tuple[int, ...]) -> np.ndarray:
        if shape[0] != self.batch:
            raise ValueError(f"encoder noise for {shape[0]} images, the batch has {self.batch}")
        return self._draw(stream, shape[1:])

    def step_noise(self, schedule: Schedule, shape: tuple[int, ...]) -> np.ndarray:
        """Per-step noise (S, B, C, h, w) for stochastic schedulers (ancestral, LCM), drawn up front; zeros
        for the steps (or schedulers) that draw none."""
        noise = np.zeros((len(schedule.timesteps), *shape), np.float32)
        steps = np.flatnonzero(schedule.needs_noise)
        stream = 1 if self.denoising_start is None else 4  # the refiner's own: never the base's draws again
        if steps.size:
            noise[steps] = self._draw(stream, (steps.size, *shape[1:])).swapaxes(0, 1)
        return noise

    def parameters(self, index: int | None = None) -> dict[str, Any]:
        """What a PNG records: enough to reproduce the request, or (``index``) that one image of it alone."""
        if index is not None:
            return {
                **self.parameters(),
                "prompt": [self.prompts[index]],
                "negative_prompt": [self.negative_prompts[index]],
                "seed": self.seeds[index],
                **(
                    {"variation_seed": self._seeds_from(self.variation_seed)[index]}
                    if self.variation_strength
                    else {}
                ),
                "image_of_batch": f"{index + 1} of {self.batch}",
            }
        return {
            "prompt": list(self.prompts),
            "negative_prompt": list(self.negative_prompts),
            "steps": self.steps,
            "guidance": self.guidance,
            "scheduler": self.scheduler,
            **(self.custom.parameters() if self.custom is not None else {}),
            "seed": self.seed,
            "height": self.height,
            "width": self.width,
            "latents": "supplied" if self.latents is not None else "from seed",
            **(
                {"variation_seed": self.variation_seed, "variation_strength": self.variation_strength}
                if self.variation_strength
                else {}
            ),
            **({"image": "supplied", "strength": self.strength} if self.image is not None else {}),
            **({"mask": "supplied"} if self.inpainting else {}),
            **({"masked_content": self.masked_content} if self.masked_content != "original" else {}),
            **({"decoder": self.decoder} if self.decoder != "vae" else {}),
            **(
                {"mask_crop": self.mask_crop.padding, "mask_crop_box": list(self.mask_crop.box)}
                if self.mask_crop is not None
                else {}
            ),
            **({"noise_source": self.noise_source} if self.noise_source != "sdengine" else {}),
            **({"clip_skip": self.clip_skip} if self.clip_skip else {}),
            **({"guidance_rescale": self.guidance_rescale} if self.guidance_rescale else {}),
            **({"pag_scale": self.pag_scale} if self.pag_scale else {}),
            **({"pag_adaptive_scale": self.pag_adaptive_scale} if self.pag_adaptive_scale else {}),
            **({"deepcache_interval": self.deepcache_interval} if self.deepcache_interval > 1 else {}),
            **({"freeu": list(self.freeu)} if self.freeu is not None else {}),
            **({"apg": list(self.apg)} if self.apg is not None else {}),
            **({"seamless": True} if self.seamless else {}),
            **({"long_prompts": True} if self.long_prompts else {}),
            **({"prompt_weights": self.prompt_weights} if self.prompt_weights else {}),
            **(
                {
                    "control": "supplied",
                    "control_scale": list(self.control_scales),
                    "control_start": list(self.control_starts),
                    "control_end": list(self.control_ends),
                    **(
                        {"control_mode": list(self.control_modes)}
                        if set(self.control_modes) != {"balanced"}
                        else {}
                    ),
                }
                if self.control_scales
                else {}
            ),
            **(self.hires.parameters() if self.hires else {}),
            **({"size_conditioning": self.sizes.parameters()} if self.sizes.given else {}),
            **({"refiner_switch": self.refiner_switch} if self.refiner_switch is not None else {}),
            **(
                {"ip_adapter_image": "supplied", "ip_adapter_scale": self.ip_scale}
                if self.ip_image is not None
                else {}
            ),
        }


def make_request(
    prompt: str | Sequence[str],
    negative_prompt: str | Sequence[str] | None = None,
    *,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    scheduler: str | None = None,
    seed: int | None = None,
    height: int,
    width: int,
    batch: int | None = None,
    latents: np.ndarray | None = None,
    image: np.ndarray | None = None,
    strength: float | None = None,
    mask: np.ndarray | None = None,
    masked_content: str = "original",
    decoder: str = "vae",
    clip_skip: int = 0,
    guidance_rescale: float = 0.0,
    long_prompts: bool = False,
    prompt_weights: bool | str = False,
    control: np.ndarray | None = None,
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
    refiner_switch: float | None = None,
    ip_image: np.ndarray | None = None,
    ip_scale: float | None = None,
    noise_source: str = "sdengine",
    inpainting_unet: bool = False,
    pag_scale: float = 0.0,
    pag_adaptive_scale: float = 0.0,
    guidance_embedded: bool = False,
    deepcache_interval: int = 1,
    freeu: Sequence[float] | Mapping[str, float] | None = None,
    custom: CustomSteps | None = None,
    hires_custom: CustomSteps | None = None,
    apg: bool | Sequence[float] | Mapping[str, float] | None = None,
    size_multiple: int = 8,
    **sizes: tuple[int, int] | None,
) -> GenerationRequest:
    """Check every setting and build the request; :class:`InvalidArgumentError` names any bad value.
    ``strength`` defaults to diffusers' own: 0.8 for image to image, 1.0 for inpainting (a ``mask``).
    ``hires_*``: the hires fix (:func:`sdengine.hires.hires_fix`), text to image only. ``sizes``: SDXL's size
    conditioning (:class:`sdengine.xl_conditioning.SizeConditioning`'s fields). ``refiner_switch``: the share
    of the run after which a refiner takes over, in (0, 1) (:mod:`sdengine.refiner`). ``ip_image``
    (1, H, W, 3) and ``ip_scale`` (default 1): an IP-Adapter's image prompt and its weight
    (:mod:`sdengine.ip_adapter`). ``noise_source``: one of :data:`NOISE_SOURCES`. ``inpainting_unet``: the
    model's UNet takes the mask and masked image. ``pag_scale``: perturbed-attention guidance's scale
    (:mod:`sdengine.pag`; 0, the default: none), ``pag_adaptive_scale`` how fast it falls with the
    timestep. ``guidance_embedded``: the model's UNet takes the guidance scale as an input
    (:mod:`sdengine.guidance_embedding`). ``deepcache_interval``: DeepCache's (:mod:`sdengine.deepcache`;
    1, the default: off). ``freeu``: FreeU's scales (s1, s2, b1, b2, or a mapping of those names;
    :mod:`sdengine.freeu`; None, the default: off). ``custom``: the run's own timesteps or sigmas
    (:mod:`sdengine.schedulers.custom`), whose count of steps replaces ``steps``; ``hires_custom``: the hires
    fix's second pass's own, whose count sets its steps. ``apg``: adaptive projected
    guidance's settings (:func:`sdengine.apg.check_apg`; None, the default: classifier-free guidance's plain
    combination)."""
    unknown = sorted(set(sizes) - set(SizeConditioning.__dataclass_fields__))
    if unknown:
        raise InvalidArgumentError(f"unknown setting(s) {', '.join(unknown)}")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if batch is not None:
        if batch < 1:
            raise InvalidArgumentError(f"batch must be at least 1, got {batch}")
        if len(prompts) == 1:
            prompts = prompts * batch
        elif len(prompts) != batch:
            raise InvalidArgumentError(f"{len(prompts)} prompts given for batch {batch}")
    if not prompts:
        raise InvalidArgumentError("empty batch: give at least one prompt")
    if not all(isinstance(p, str) for p in prompts):
        raise InvalidArgumentError("prompts must be strings")
    negatives = (
        [negative_prompt or ""]
        if negative_prompt is None or isinstance(negative_prompt, str)
        else list(negative_prompt)
    )
    if len(negatives) == 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise InvalidArgumentError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
    for name, value in (("height", height), ("width", width)):
        if value < size_multiple or value % size_multiple:
            raise InvalidArgumentError(f"{name} must be a positive multiple of {size_multiple}, got {value}")
    if custom is not None:  # as in diffusers, the custom schedule's count wins over num_inference_steps
        steps = custom.steps
    if steps < 1:
        raise InvalidArgumentError(f"steps must be at least 1, got {steps}")
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, (int, np.integer)) or clip_skip < 0:
        raise InvalidArgumentError(f"clip_skip must be a whole number >= 0, got {clip_skip!r}")
    if not (isinstance(guidance_rescale, (int, float)) and 0.0 <= guidance_rescale <= 1.0):
        raise InvalidArgumentError(f"guidance_rescale must be a number in [0, 1], got {guidance_rescale!r}")
    if not math.isfinite(guidance) or guidance < 0:
        raise InvalidArgumentError(f"guidance must be a finite number >= 0, got {guidance}")
    if strength is not None and image is None:
        raise InvalidArgumentError("strength applies to image to image only: give an input image too")
    if mask is not None and image is None:
        raise InvalidArgumentError("a mask needs the image it applies to: give an input image too")
    if strength is None:
        strength = DEFAULT_STRENGTH if mask is None else DEFAULT_INPAINT_STRENGTH
    if image is not None:
        check_image(image, len(prompts), height, width)
        img2img_start(int(steps), strength)  # a strength in (0, 1] that leaves at least one step to run
    if mask is not None:
        check_mask(mask, len(prompts), height, width)
    if masked_content not in MASKED_CONTENTS:
        raise InvalidArgumentError(
            f"masked_content must be one of {', '.join(MASKED_CONTENTS)}, got {masked_content!r}"
        )
    if decoder not in DECODERS:
        raise InvalidArgumentError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if masked_content != "original" and mask is None:
        raise InvalidArgumentError(f"masked_content {masked_content!r} is inpainting's: give a mask too")
    scales, starts, ends = control_settings(
        control, control_scale, control_start, control_end, len(prompts), height, width
    )
    modes = control_modes(control_mode, len(scales))
    if seed is None:
        seed = secrets.randbits(63)
    if not 0 <= seed < 2**63:
        raise InvalidArgumentError(f"seed must be in [0, 2**63), got {seed}")
    check_variation(variation_seed, variation_strength, latents)
    hires = hires_fix(
        hires_scale,
        hires_strength,
        hires_steps,
        hires_upscale,
        height=height,
        width=width,
        first_steps=int(steps),
        multiple=size_multiple,
        custom=hires_custom,
    )
    if hires is not None and image is not None:
        raise InvalidArgumentError("the hires fix follows text to image: it takes no input image or mask")
    if hires is not None and custom is not None and hires.custom is None:
        raise InvalidArgumentError(
            f"custom {custom.kind} with the hires fix: give its second pass's own too (hires_timesteps or "
            "hires_sigmas; it has steps of its own)"
        )
    check_refiner_switch(refiner_switch, hires is not None)
    check_noise_source(
        noise_source,
        hires=hires is not None,
        refiner=refiner_switch is not None,
        image_latents=image is not None and (latents is not None or bool(variation_strength)),
    )
    ip_scale = check_image_prompt(ip_image, ip_scale)
    composable = composable_parts(prompts) if weighting_syntax(prompt_weights) == "a1111" else ()
    if composable and guidance_rescale:
        raise InvalidArgumentError(
            "guidance_rescale rescales one guided prediction; composable prompts (AND, or a part's :weight) "
            "have several: give one or the other"
        )
    pag_scale, pag_adaptive_scale = check_pag_scale(pag_scale, pag_adaptive_scale)
    if pag_scale and (composable or guidance_rescale):
        other = "composable prompts (AND, or a part's :weight)" if composable else "guidance_rescale"
        raise InvalidArgumentError(
            f"perturbed-attention guidance adds a part of its own to the guided sum: it takes no {other}"
        )
    apg = check_apg(apg)
    if apg is not None and (composable or pag_scale or guidance_rescale):
        other = (
            "composable prompts (AND, or a part's :weight)"
            if composable
            else "perturbed-attention guidance"
            if pag_scale
            else "guidance_rescale"
        )
        raise InvalidArgumentError(
            f"adaptive projected guidance replaces the plain combination: not with {other}"
        )
    if apg is not None and (guidance <= 1 or guidance_embedded):
        raise InvalidArgumentError(
            "adaptive projected guidance is classifier-free guidance's: give guidance > 1 (and a model that "
            "runs it)"
        )
    if guidance_embedded and (composable or pag_scale or guidance_rescale):
        asked = (
            "composable prompts (AND, or a part's :weight)"
            if composable
            else "perturbed-attention guidance"
            if pag_scale
            else "guidance_rescale"
        )
        raise UnsupportedConfigError(
            f"this model's UNet takes the guidance scale as an input (a latent consistency model) and runs "
            f"no classifier-free guidance: {asked} is not supported with it"
        )
    return GenerationRequest(
        prompts=tuple(prompts),
        negative_prompts=tuple(negatives),
        default_negative=negative_prompt is None,
        steps=int(steps),
        guidance=float(guidance),
        scheduler=scheduler,
        seed=int(seed),
        height=int(height),
        width=int(width),
        latents=None if latents is None else np.asarray(latents),
        image=None if image is None else np.asarray(image, dtype=np.float32),
        strength=float(strength),
        mask=None if mask is None else np.asarray(mask, dtype=np.float32),
        masked_content=masked_content,
        decoder=decoder,
        clip_skip=int(clip_skip),
        guidance_rescale=float(guidance_rescale),
        long_prompts=bool(long_prompts),
        prompt_weights=weighting_syntax(prompt_weights),
        control=None if control is None else np.asarray(control, dtype=np.float32),
        control_scales=scales,
        control_starts=starts,
        control_ends=ends,
        control_modes=modes,
        variation_seed=None if variation_seed is None else int(variation_seed),
        variation_strength=float(variation_strength),
        hires=hires,
        sizes=size_conditioning(**sizes),
        refiner_switch=None if refiner_switch is None else float(refiner_switch),
        ip_image=None if ip_image is None else np.asarray(ip_image, dtype=np.float32),
        ip_scale=ip_scale,
        noise_source=noise_source,
        inpainting_unet=inpainting_unet and mask is not None,
        composable=composable,
        pag_scale=pag_scale,
        pag_adaptive_scale=pag_adaptive_scale,
        deepcache_interval=check_interval(deepcache_interval),
        freeu=check_freeu(freeu),
        guidance_embedded=bool(guidance_embedded),
        custom=custom,
        apg=apg,
    )


def check_image_prompt(image: np.ndarray | None, scale: float | None) -> float:
    """An IP-Adapter's image prompt, one image (1, H, W, 3), and its weight, a finite number (default 1)."""
    if scale is not None and image is None:
        raise InvalidArgumentError("ip_adapter_scale weighs an image prompt: give ip_adapter_image too")
    if image is not None and (np.ndim(image) != 4 or np.shape(image)[0] != 1 or np.shape(image)[-1] != 3):
        raise InvalidArgumentError(
            f"ip_adapter_image must be one RGB image (one for the whole batch), got shape {np.shape(image)}"
        )
    if scale is None:
        return 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InvalidArgumentError(f"ip_adapter_scale must be a finite number, got {scale!r}")
    return float(scale)


def check_refiner_switch(switch: float | None, hires: bool) -> None:
    """A refiner's switch: a number in (0, 1), without the hires fix."""
    if switch is None:
        return
    if isinstance(switch, bool) or not isinstance(switch, (int, float)) or not 0.0 < switch < 1.0:
        raise InvalidArgumentError(f"refiner_switch must be a number in (0, 1), got {switch!r}")
    if hires:
        raise InvalidArgumentError("the hires fix and a refiner: use one at a time")


def check_noise_source(source: str, **others: bool) -> None:
    """PyTorch's CPU noise is drawn in the order of diffusers' text-to-image, image-to-image and inpainting
    pipelines; ``others`` (the hires fix, a refiner, an image with supplied or varied noise) draw in orders
    of their own, which it does not follow."""
    if source not in NOISE_SOURCES:
        raise InvalidArgumentError(
            f"unknown noise source {source!r}; choose one of {', '.join(NOISE_SOURCES)}"
        )
    names = {
        "hires": "the hires fix",
        "refiner": "a refiner",
        "image_latents": "image to image from supplied or varied noise",
    }
    given = [names[name] for name, on in others.items() if on]
    if source == "torch-cpu" and given:
        raise InvalidArgumentError(
            "noise source 'torch-cpu' follows diffusers' text-to-image, image-to-image and inpainting draws; "
            f"{' and '.join(given)} draw otherwise: use the default noise source"
        )


def check_variation(seed: int | None, strength: float, latents: np.ndarray | None) -> None:
    """A variation needs its seed, a strength in [0, 1] and noise drawn from seeds (not supplied latents)."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise InvalidArgumentError(f"variation_strength must be a number in [0, 1], got {strength!r}")
    if strength and seed is None:
        raise InvalidArgumentError("variation_strength needs a variation_seed to move towards")
    whole = isinstance(seed, (int, np.integer)) and not isinstance(seed, bool)
    if seed is not None and (not whole or not 0 <= seed < 2**63):
        raise InvalidArgumentError(f"variation_seed must be in [0, 2**63), got {seed!r}")
    if strength and latents is not None:
        raise InvalidArgumentError(
            "a variation moves the seed's noise: it does not apply to supplied latents"
        )


def slerp(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spherical interpolation, per batch item, from ``a`` (t = 0) to ``b`` (t = 1) (B, ...): along the great
    circle through both, so unit-variance noise stays unit-variance noise, where a straight line would
    shrink it; straight where the two are (nearly) parallel."""
    flat_a, flat_b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    cos = np.sum(flat_a * flat_b, 1) / (np.linalg.norm(flat_a, axis=1) * np.linalg.norm(flat_b, axis=1))
    omega = np.arccos(np.clip(cos, -1.0, 1.0))[:, None]
    sin = np.sin(omega)
    safe = np.where(sin > 1e-6, sin, 1.0)
    wa = np.where(sin > 1e-6, np.sin((1 - t) * omega) / safe, 1 - t)
    wb = np.where(sin > 1e-6, np.sin(t * omega) / safe, t)
    return (wa * flat_a + wb * flat_b).reshape(a.shape).astype(np.float32)


#: The prompt weighting syntaxes: compel's (``True`` stands for it) and the AUTOMATIC1111 web UI's.
WEIGHTING_SYNTAXES = ("compel", "a1111")


def weighting_syntax(prompt_weights: bool | str | None) -> str:
    """ "" for unweighted prompts, else the syntax's name; InvalidArgumentError for an unknown one."""
    if prompt_weights is True:
        return "compel"
    if prompt_weights in (False, None, ""):
        return ""
    if prompt_weights not in WEIGHTING_SYNTAXES:
        raise InvalidArgumentError(
            f"unknown prompt weighting syntax {prompt_weights!r}; choose {' or '.join(WEIGHTING_SYNTAXES)}"
        )
    return str(prompt_weights)


def control_modes(mode: str | Sequence[str], count: int) -> tuple[str, ...]:
    """Each of ``count`` ControlNets' control mode (:data:`sdengine.controlnet.CONTROL_MODES`), given once for
    all or once per ControlNet; none without ControlNets, where only the default is taken."""
    modes = [mode] if isinstance(mode, str) else list(mode)
    if not modes or not all(isinstance(m, str) and m in CONTROL_MODES for m in modes):
        raise InvalidArgumentError(
            f"control_mode must be one of {', '.join(CONTROL_MODES)} (or one per ControlNet), got {mode!r}"
        )
    if not count:
        if modes != ["balanced"]:
            raise InvalidArgumentError("control_mode applies to ControlNet only: give a control image")
        return ()
    return tuple(per_controlnet("control_mode", modes, count))


def per_controlnet(name: str, values: list[Any], count: int) -> list[Any]:
    """Setting ``name``'s ``values``, given once for all of ``count`` ControlNets or once per ControlNet, as
    one per ControlNet."""
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise InvalidArgumentError(f"{len(values)} values of {name} for {count} control images")
    return values


def control_settings(
    control: np.ndarray | None,
    scale: float | Sequence[float],
    start: float | Sequence[float],
    end: float | Sequence[float],
    batch: int,
    height: int,
    width: int,
) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """Check ControlNet conditioning images, (ControlNets, 1 or batch, height, width, 3), and return each
    ControlNet's weight, start and end (each given once for all, or once per ControlNet), as diffusers'
    ``controlnet_conditioning_scale``, ``control_guidance_start`` and ``control_guidance_end``: a ControlNet
    runs on the calls ``i`` of ``n`` with ``start <= i / n`` and ``(i + 1) / n <= end``. No images: none."""
    given = {"control_scale": scale, "control_start": start, "control_end": end}
    values = {name: [v] if isinstance(v, (int, float, np.number)) else list(v) for name, v in given.items()}
    for name, v in values.items():
        if not v or not all(isinstance(x, (int, float, np.number)) and math.isfinite(x) for x in v):
            raise InvalidArgumentError(
                f"{name} must be a finite number or one per ControlNet, got {given[name]!r}"
            )
    if control is None:
        if values != {"control_scale": [1.0], "control_start": [0.0], "control_end": [1.0]}:
            raise InvalidArgumentError(
                "control_scale, control_start and control_end apply to ControlNet only: give a control image"
            )
        return (), (), ()
    shape = tuple(np.shape(control))
    if len(shape) != 5 or shape[1] not in (1, batch) or shape[2:] != (height, width, 3) or not shape[0]:
        raise InvalidArgumentError(
            f"control images have shape {shape}, expected (ControlNets, 1 or {batch}, {height}, {width}, 3) "
            f"for batch {batch} at {height}x{width}"
        )
    values = {name: per_controlnet(name, v, shape[0]) for name, v in values.items()}
    for s, e in zip(values["control_start"], values["control_end"], strict=True):
        if not 0.0 <= s < e <= 1.0:
            raise InvalidArgumentError(
                f"a ControlNet must start before it ends, within the schedule: 0 <= start < end <= 1, got "
                f"start {s:g} and end {e:g}"
            )
    scales, starts, ends = (tuple(float(x) for x in values[n]) for n in given)
    return scales, starts, ends


def check_image(image: np.ndarray, batch: int, height: int, width: int) -> None:
    """An image-to-image input: (1 or batch, height, width, 3)."""
    shape = tuple(np.shape(image))
    if len(shape) != 4 or shape[0] not in (1, batch) or shape[1:] != (height, width, 3):
        raise InvalidArgumentError(
            f"image has shape {shape}, expected (1 or {batch}, {height}, {width}, 3) for batch {batch} at "
            f"{height}x{width}"
        )


def check_mask(mask: np.ndarray, batch: int, height: int, width: int) -> None:
    """An inpainting mask: (1 or batch, height, width), every value 0 or 1."""
    shape = tuple(np.shape(mask))
    if len(shape) != 3 or shape[0] not in (1, batch) or shape[1:] != (height, width):
        raise InvalidArgumentError(
            f"mask has shape {shape}, expected (1 or {batch}, {height}, {width}) for batch {batch} at "
            f"{height}x{width}"
        )
    if not np.isin(np.asarray(mask), (0, 1)).all():
        raise InvalidArgumentError("mask values must be 0 (keep) or 1 (repaint)")
