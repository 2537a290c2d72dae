"""The one interface every backend implements; the denoising loop only ever sees this."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnx
from onnx import helper

from sdengine.deepcache import whole_calls
from sdengine.errors import InvalidArgumentError
from sdengine.model_specs import TEXT_ENCODER
from sdengine.step_graph import StepTables, build_step_model, unet_copies
from sdengine.timing import StageTimes


@dataclass(frozen=True, eq=False)
class DenoisePlan:
    """Everything a denoising run needs, as host arrays, prepared once before the loop."""

    latents: np.ndarray  # (B, C, h, w) initial latents, already scaled by the scheduler's init_noise_sigma
    #: (G * B, sequence, hidden) text embeddings, negatives first with guidance: the first call's, where
    #: prompts are edited (the tables hold every call's)
    context: np.ndarray
    tables: StepTables  # per-step coefficients, timesteps, input scales and noise
    guidance: float | None  # None: no classifier-free guidance, the UNet runs on the batch once (G == 1)
    #: the UNet's inputs that hold for the whole run besides the text embeddings (ControlNet's, by name)
    unet_constants: Mapping[str, np.ndarray] = field(default_factory=dict)
    #: DeepCache (:mod:`sdengine.deepcache`): the whole UNet on every this many calls (1: on every call)
    deepcache_interval: int = 1
    #: the whole schedule's timesteps before the run's first call (Schedule.lead_timesteps), which DeepCache's
    #: positions count from
    lead_timesteps: tuple[float, ...] = ()

    @property
    def whole_calls(self) -> tuple[bool, ...] | None:
        """DeepCache: for each call, whether it runs the whole UNet (else the shallow one); None: off."""
        if self.deepcache_interval == 1:
            return None
        timesteps = self.tables.timesteps[: self.tables.num_calls]
        return whole_calls(timesteps, self.deepcache_interval, self.lead_timesteps)

    @property
    def copies(self) -> int:
        """G: 1 without guidance, 2 with it, 1 + K with composable prompts' K parts."""
        return unet_copies(self.guidance is not None, self.tables.parts)

    def first_unet_inputs(self) -> dict[str, np.ndarray]:
        """The first UNet call's inputs besides its sample and timestep, by name: the text embeddings, the
        constant ones and the first values of those the step model gives every later call."""
        return {
            "encoder_hidden_states": self.context,
            **self.unet_constants,
            **self.tables.first_call_inputs(),
        }

    @property
    def unet_input_shape(self) -> tuple[int, ...]:
        """(G * B, C + E, h, w): the latents of every copy, and any conditioning channels after them."""
        batch, channels, height, width = self.latents.shape
        return (self.copies * batch, channels + self.tables.conditioning_channels, height, width)


@dataclass(frozen=True)
class GraphKey:
    """What a backend's per-shape state depends on (step model, device buffers, captured graphs): the shapes,
    the schedule's length and which inpainting inputs the step takes. The tables, noise, guidance scale and
    inpainting images are inputs, so they are not in it."""

    batch: int
    latent_channels: int
    latent_height: int
    latent_width: int
    num_calls: int
    guidance: bool
    blend: bool = False
    conditioning_channels: int = 0
    rescale: bool = False
    sequence: int = 77  # the text embeddings' length: 77 tokens per window of a long prompt
    unet_constants: tuple[str, ...] = ()  # the names of the plan's other constant UNet inputs
    controls: int = 0  # ControlNets in the UNet, whose weights the step model gives each call
    context_sets: int = 0  # edited prompts: the sets of text embeddings the step model gives the calls
    hidden: int = 768  # the text embeddings' width
    pooled: int = 0  # SDXL's edited prompts: the width of the pooled embeddings the step model gives
    parts: int = 0  # composable prompts: the parts guidance sums (the UNet's batch is 1 + parts copies)
    deepcache: bool = False  # DeepCache: the shallow UNet's calls too, on the whole UNet's cached feature
    apg: bool = False  # adaptive projected guidance in place of the plain combination

    @classmethod
    def of(cls, plan: DenoisePlan) -> GraphKey:
        tables = plan.tables
        return cls(
            *plan.latents.shape,
            tables.num_calls,
            plan.guidance is not None,
            tables.blend is not None,
            tables.conditioning_channels,
            tables.guidance_rescale is not None,
            plan.context.shape[1],
            tuple(sorted(plan.unet_constants)),
            tables.controls,
            tables.context_sets,
            plan.context.shape[2],
            tables.pooled_size,
            tables.parts,
            plan.deepcache_interval > 1,
            tables.apg is not None,
        )

    @property
    def copies(self) -> int:
        """UNet batch multiplier: 2 with classifier-free guidance, 1 + K with composable prompts."""
        return unet_copies(self.guidance, self.parts)

    def step_model(
        self, timestep: tuple[tuple[int, ...], type], unet_io_dtypes: tuple[type, type, type]
    ) -> onnx.ModelProto:
        """The step model for these shapes, exchanging the UNet's timestep as it declares it (shape, dtype)
        and its (sample, noise, text embeddings) dtypes: what every backend builds, each in its own
        runtime."""
        tensor_type = lambda dtype: helper.np_dtype_to_tensor_dtype(np.dtype(dtype))  # noqa: E731
        (t_shape, t_dtype), (sample_dtype, noise_dtype, context_dtype) = timestep, unet_io_dtypes
        return build_step_model(
            batch=self.batch,
            latent_shape=(self.latent_channels, self.latent_height, self.latent_width),
            num_calls=self.num_calls,
            guidance=self.guidance,
            timestep_shape=t_shape,
            timestep_dtype=tensor_type(t_dtype),
            unet_sample_dtype=tensor_type(sample_dtype),
            unet_output_dtype=tensor_type(noise_dtype),
            blend=self.blend,
            conditioning_channels=self.conditioning_channels,
            rescale=self.rescale,
            controls=self.controls,
            contexts=(self.context_sets, self.sequence, self.hidden) if self.context_sets else (),
            context_dtype=tensor_type(context_dtype),
            pooled=self.pooled,
            parts=self.parts,
            apg=self.apg,
        )


class Denoiser(Protocol):
    """One denoising run in progress; its state (latents, history, step index) lives where the backend keeps
    it (host memory on the CPU, device memory on a GPU)."""

    def step(self) -> None:
        """One whole step: the UNet on the (doubled) batch, guidance and the scheduler update."""
        ...

    def latents(self, final: bool = True) -> np.ndarray:
        """The current latents on the host (synchronises with the device, where there is one); ``final``:
        the run is over (a device loop records its GPU time), not a look part way (a preview)."""
        ...


class Backend(Protocol):
    """Runs the models of text- and image-to-image generation. Arrays in and out are host numpy arrays."""

    name: str

    def encode_text(self, input_ids: np.ndarray, clip_skip: int = 0) -> np.ndarray:
        """Token ids (B, sequence) -> text embeddings (B, sequence, hidden), float32; ``clip_skip`` > 0
        takes them that many layers before the last (through the final layer norm, see
        :func:`skipped_layers`). SDXL: the first text encoder's penultimate layer's states (see
        :func:`xl_layer`)."""
        ...

    def encode_text_2(self, input_ids: np.ndarray, clip_skip: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """SDXL's second text encoder: token ids (B, sequence) -> its penultimate layer's states (B,
        sequence, hidden 2) and its pooled, projected embeddings (B, pooled), float32, from one run."""
        ...

    def set_token_embeddings(self, rows: dict[int, np.ndarray], component: str = TEXT_ENCODER) -> None:
        """Textual inversion: give text encoder ``component``'s token-embedding table these rows (id ->
        vector), growing it where an id lies past its end. UnsupportedConfigError where the weights are
        fixed."""
        ...

    def set_weights(self, component: str, weights: dict[str, np.ndarray]) -> None:
        """LoRA: run ``component`` with these initializers (name -> array, see ``sdengine.lora``) in place of
        its model file's; an empty dict restores the file's. UnsupportedConfigError where the weights are
        fixed."""
        ...

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        """The VAE encoder (image to image): images (B, 3, H, W) in [-1, 1] -> the latent distribution's
        parameters (B, 2 * latent channels, H / 8, W / 8), means then log-variances, float32; a tiny VAE's
        (``Architecture.tiny_vae``): the latents themselves (B, latent channels, H / 8, W / 8)."""
        ...

    def denoiser(self, plan: DenoisePlan, times: StageTimes) -> Denoiser:
        """Start a denoising run; per-call timings go to ``times``."""
        ...

    def decode_latents(self, latents: np.ndarray) -> np.ndarray:
        """The VAE decoder: latents divided by the scaling factor -> images (B, 3, H, W) in about [-1, 1]."""
        ...

    def decode_preview(self, latents: np.ndarray) -> np.ndarray:
        """The tiny VAE's decoder beside the model's (``sdengine export --preview-vae``): latents divided by
        its scaling factor -> images (B, 3, H, W) in about [-1, 1]; previews only."""
        ...

    def check_safety(self, clip_input: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The safety checker (``sdengine.safety``): its CLIP input (B, 3, 224, 224) and the images
        (B, H, W, 3) in [0, 1] -> the images with each flagged one black, and the flags (B,) bool."""
        ...

    def encode_image_prompt(self, pixels: np.ndarray) -> np.ndarray:
        """An IP-Adapter's image encoder (``sdengine.ip_adapter``): its ``pixel_values`` (B, 3, S, S) ->
        the image embeddings (B, width)."""
        ...


def xl_layer(layer_states: np.ndarray, clip_skip: int) -> np.ndarray:
    """SDXL's text embeddings from a text encoder's per-layer states (B, layers + 1, sequence, hidden), as
    they are: the penultimate layer's, or ``clip_skip`` layers before it (diffusers' SDXL ``clip_skip``)."""
    layers = layer_states.shape[1] - 1
    if not 0 <= clip_skip < layers:
        raise InvalidArgumentError(
            f"clip_skip must be in [0, {layers - 1}] for this {layers}-layer text encoder, got {clip_skip}"
        )
    return np.ascontiguousarray(layer_states[:, -(clip_skip + 2)], dtype=np.float32)


def skipped_layers(layer_states: np.ndarray, clip_skip: int) -> np.ndarray:
    """The text embeddings ``clip_skip`` layers before the last, from the text encoder's per-layer states
    (B, layers + 1, sequence, hidden) after its final layer norm: diffusers' ``clip_skip`` (1 skips the last
    layer, which other tools call "clip skip 2")."""
    layers = layer_states.shape[1] - 1
    if not 0 <= clip_skip < layers:
        raise InvalidArgumentError(
            f"clip_skip must be in [0, {layers - 1}] for this {layers}-layer text encoder, got {clip_skip}"
        )
    return np.ascontiguousarray(layer_states[:, -(clip_skip + 1)], dtype=np.float32)
