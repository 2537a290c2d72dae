"""One input/output spec per exported model.

Each model that sdengine exports or runs declares its tensors here once: name, dtype and dimensions, where
a dimension is either a fixed size or the name of a size chosen at run time. Export arguments, ONNX dynamic
axes, sample inputs, engine profiles and buffer allocation all derive from these specs, so a name or a shape
is never restated elsewhere.

Names and layout follow the ONNX Stable Diffusion layout of Hugging Face Optimum (``unet/model.onnx``, with
``sample``/``timestep``/``encoder_hidden_states`` -> ``out_sample`` and so on), so exports of either tool load
in the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

Dim = int | str

TEXT_ENCODER = "text_encoder"
#: SDXL's second text encoder (OpenCLIP ViT-bigG with its projection)
TEXT_ENCODER_2 = "text_encoder_2"
UNET = "unet"
VAE_DECODER = "vae_decoder"
VAE_ENCODER = "vae_encoder"
#: The models of an SD 1.x/2.x export (SDXL's add TEXT_ENCODER_2; see :meth:`Architecture.components`).
COMPONENTS: tuple[str, ...] = (TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER)
#: DeepCache's shallow UNet (``sdengine export --deepcache``; ``sdengine.deepcache``): the layers its branch
#: keeps, run on the feature the whole UNet cached (which that UNet then gives as its second output).
UNET_SHALLOW = "unet_shallow"
DEEPCACHE_FEATURE = "deepcache_feature"
#: Every model an engine may be built for.
ENGINE_COMPONENTS: tuple[str, ...] = (
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    UNET,
    UNET_SHALLOW,
    VAE_DECODER,
    VAE_ENCODER,
)
#: The safety checker of checkpoints that have one: exported with them, run by ONNX Runtime on every backend.
SAFETY_CHECKER = "safety_checker"
#: An IP-Adapter's CLIP image encoder (``sdengine.ip_adapter``): exported with it, run by ONNX Runtime on
#: every backend, once per generation.
IMAGE_ENCODER = "image_encoder"
#: A tiny VAE's decoder beside the model's own VAE (``sdengine export --preview-vae``): it draws previews part
#: way through a run (``sdengine.latent_preview``'s ``tiny``), run by ONNX Runtime on every backend.
PREVIEW_DECODER = "preview_decoder"
#: What an export may hold.
EXPORTABLE: tuple[str, ...] = (*ENGINE_COMPONENTS, SAFETY_CHECKER, IMAGE_ENCODER, PREVIEW_DECODER)
#: The text encoder's per-layer output that ``clip_skip`` reads (absent from other tools' exports).
LAYER_STATES = "normed_hidden_states"
#: SDXL's text encoders: every layer's states as they are (SDXL reads the penultimate layer's, not through
#: the final layer norm), stacked (batch, layers + 1, sequence, hidden)
HIDDEN_STATES = "hidden_states"
#: SDXL's UNet inputs besides the text embeddings: the second text encoder's pooled, projected embeddings and
#: the six size conditioning numbers (original height and width, crop top and left, target height and width)
TEXT_EMBEDS = "text_embeds"
TIME_IDS = "time_ids"
#: The UNet's inputs when ControlNets are exported with it (see ``sdengine.controlnet``): every ControlNet's
#: conditioning image side by side in the channels, and each one's weight.
CONTROLNET_COND = "controlnet_cond"
CONDITIONING_SCALE = "conditioning_scale"
#: ... and each row's weight of each ControlNet's residuals, one by one (``sdengine.controlnet``'s control
#: modes: diffusers' guess mode, the web UI extension's control modes)
CONTROL_WEIGHTS = "control_weights"
#: The UNet's inputs when an IP-Adapter is exported with it: the image encoder's projected embeddings of the
#: image prompt (zeros on the negative side), and the weight of its attention.
IMAGE_EMBEDS = "image_embeds"
IP_ADAPTER_SCALE = "ip_adapter_scale"
#: Perturbed-attention guidance (``sdengine.pag``): the UNet rows whose chosen self-attention is the identity.
PAG_ROWS = "pag_rows"
#: FreeU (``sdengine.freeu``): its scales (s1, s2, b1, b2), which the UNet's deepest up blocks apply
FREEU = "freeu"
#: A guidance-embedded UNet's input (an LCM-distilled one; ``sdengine.guidance_embedding``): the guidance
#: scale as a sinusoidal embedding, diffusers' ``timestep_cond`` (and Optimum's input name)
TIMESTEP_COND = "timestep_cond"
#: The UNet's inputs that are numbers per image or per run, not images or sequences: what is computed from
#: them alone stays float32 in an fp16 export (``export.fp16``)
CONDITIONING_INPUTS: tuple[str, ...] = (
    "timestep",
    TEXT_EMBEDS,
    TIME_IDS,
    CONDITIONING_SCALE,
    CONTROL_WEIGHTS,
    IP_ADAPTER_SCALE,
    PAG_ROWS,
    TIMESTEP_COND,
    FREEU,
)
#: diffusers' class of a tiny VAE (TAESD's architecture, ``Architecture.tiny_vae``) and of the usual one
TINY_VAE_CLASS = "AutoencoderTiny"
VAE_CLASSES: tuple[str, ...] = ("AutoencoderKL", TINY_VAE_CLASS)
#: Components the text-to-image runtime needs (an SDXL model's second text encoder too; see
#: :meth:`Architecture.required_components`); the VAE encoder is exported for image-to-image use.
REQUIRED_COMPONENTS: tuple[str, ...] = (TEXT_ENCODER, UNET, VAE_DECODER)


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor with a dtype and fixed or symbolic dimensions."""

    name: str
    dtype: str
    dims: tuple[Dim, ...]

    def shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        """The concrete shape for the run-time sizes in ``sizes`` (symbolic dims looked up by name)."""
        return tuple(d if isinstance(d, int) else int(sizes[d]) for d in self.dims)

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.dims) if isinstance(d, str)}

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)


@dataclass(frozen=True)
class ModelSpec:
    """The inputs and outputs of one exported model, in call order."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: t.dynamic_axes for t in (*self.inputs, *self.outputs) if t.dynamic_axes}

    def input_shapes(self, sizes: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        return {t.name: t.shape(sizes) for t in self.inputs}

    def output_shapes(self, sizes: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        return {t.name: t.shape(sizes) for t in self.outputs}


@dataclass(frozen=True)
class Architecture:
    """The few numbers of an SD 1.x/2.x or SDXL model that fix its tensor shapes."""

    latent_channels: int = 4
    text_hidden_size: int = 768
    text_max_length: int = 77
    vae_scale_factor: int = 8
    #: UNet input channels after the latents: 0, or 1 + latent_channels for an inpainting UNet (the mask and
    #: the masked image's latents)
    conditioning_channels: int = 0
    #: ControlNets exported inside the UNet: each adds 3 channels of conditioning image and a weight
    controlnets: int = 0
    #: the residuals each of them adds (13 for SD 1.x/2.x, 10 for SDXL), which the UNet weighs row by row
    #: (``control_weights``); 0 in exports from before it took them
    control_residuals: int = 0
    #: the safety checker's CLIP image size
    safety_image_size: int = 224
    #: SDXL: the second text encoder's width (its states follow the first's in ``text_hidden_size``) and its
    #: pooled embeddings' width; 0 for SD 1.x/2.x, which have one text encoder
    text_hidden_size_2: int = 0
    pooled_size: int = 0
    #: SDXL: the size conditioning numbers the UNet takes (``time_ids``): 6 for the base model, 5 for the
    #: refiner (original size, crop corner, aesthetic score)
    time_ids: int = 6
    #: an IP-Adapter exported with the UNet: the width of its image encoder's embeddings (0: none), the
    #: square image size the encoder takes, and the tokens per image it gives (0: one projected embedding, the
    #: plain IP-Adapter's; the encoder's patches and class token, read from its penultimate layer, for the
    #: Plus kind)
    ip_image_embeds: int = 0
    ip_image_size: int = 224
    ip_image_tokens: int = 0
    #: perturbed-attention guidance's layers traced into the UNet (``sdengine.pag``): it takes ``pag_rows``
    pag: bool = False
    #: the width of a guidance-embedded UNet's ``timestep_cond`` (its config's ``time_cond_proj_dim``; 0:
    #: none): it takes the guidance scale as an input and runs no classifier-free guidance
    #: (``sdengine.guidance_embedding``)
    guidance_embedding: int = 0
    #: a tiny VAE (diffusers' ``AutoencoderTiny``, TAESD's architecture; ``export.vae_override``): its encoder
    #: gives the latents themselves, not a distribution's parameters
    tiny_vae: bool = False
    #: DeepCache (``sdengine.deepcache``): the cached feature's channels (0: no shallow UNet) and the latents'
    #: size over its size
    deepcache_channels: int = 0
    deepcache_downscale: int = 1
    #: FreeU traced into the UNet (``sdengine.freeu``): it takes the scales as its input ``freeu``
    freeu: bool = False

    @property
    def deepcache(self) -> bool:
        return self.deepcache_channels > 0

    @property
    def ip_adapter(self) -> bool:
        return self.ip_image_embeds > 0

    @property
    def xl(self) -> bool:
        """The UNet's added conditioning (pooled text, sizes) and OpenCLIP's text encoder: SDXL."""
        return self.pooled_size > 0

    @property
    def first_text_encoder(self) -> bool:
        """CLIP ViT-L's text encoder: all but SDXL's refiner, whose text is the second encoder's alone."""
        return self.text_hidden_size > self.text_hidden_size_2

    @property
    def aesthetic(self) -> bool:
        """SDXL's refiner: an aesthetic score among its size numbers, in place of the target size."""
        return self.xl and self.time_ids == 5

    def components(self) -> tuple[str, ...]:
        """The models an export of this architecture holds (besides a safety checker)."""
        kept = lambda c: c != UNET_SHALLOW or self.deepcache  # noqa: E731
        if not self.xl:
            return tuple(c for c in (*COMPONENTS[:2], UNET_SHALLOW, *COMPONENTS[2:]) if kept(c))
        return tuple(
            c for c in ENGINE_COMPONENTS if (c != TEXT_ENCODER or self.first_text_encoder) and kept(c)
        )

    def required_components(self) -> tuple[str, ...]:
        """The models text to image (or, for SDXL's refiner, image to image) needs."""
        return tuple(c for c in self.components() if c != VAE_ENCODER)

    @property
    def unet_in_channels(self) -> int:
        return self.latent_channels + self.conditioning_channels

    @property
    def inpainting_unet(self) -> bool:
        return self.conditioning_channels > 0

    def sizes(self, batch: int, height: int, width: int) -> dict[str, int]:
        """Run-time sizes for ``batch`` images of ``height`` x ``width`` pixels."""
        return {
            "batch": batch,
            "height": height,
            "width": width,
            "latent_height": height // self.vae_scale_factor,
            "latent_width": width // self.vae_scale_factor,
            "sequence": self.text_max_length,
            # each downsampler halves a side, rounding up (a stride-2 convolution with padding 1)
            "feature_height": -(-(height // self.vae_scale_factor) // self.deepcache_downscale),
            "feature_width": -(-(width // self.vae_scale_factor) // self.deepcache_downscale),
        }

    def deepcache_feature_shape(
        self, unet_batch: int, latent_height: int, latent_width: int
    ) -> tuple[int, ...]:
        """The cached feature's shape for a UNet batch of these latents (``sdengine.deepcache``)."""
        factor = self.vae_scale_factor
        sizes = self.sizes(unet_batch, latent_height * factor, latent_width * factor)
        return self.specs()[UNET].output_shapes(sizes)[DEEPCACHE_FEATURE]

    def control_specs(self) -> tuple[TensorSpec, ...]:
        """The UNet's ControlNet inputs: none without ControlNets."""
        if not self.controlnets:
            return ()
        weights = TensorSpec(CONTROL_WEIGHTS, "float32", ("batch", self.controlnets, self.control_residuals))
        return (
            TensorSpec(CONTROLNET_COND, "float32", ("batch", 3 * self.controlnets, "height", "width")),
            TensorSpec(CONDITIONING_SCALE, "float32", (self.controlnets,)),
            *((weights,) if self.control_residuals else ()),
        )

    def ip_specs(self) -> tuple[TensorSpec, ...]:
        """The UNet's IP-Adapter inputs: none without one."""
        if not self.ip_adapter:
            return ()
        return (
            TensorSpec(IMAGE_EMBEDS, "float32", ("batch", 1, *self.ip_embeds_shape)),
            TensorSpec(IP_ADAPTER_SCALE, "float32", ()),
        )

    @property
    def ip_embeds_shape(self) -> tuple[int, ...]:
        """One image's embeddings from the image encoder: (width,), or (tokens, width)."""
        width = max(self.ip_image_embeds, 1)
        return (self.ip_image_tokens, width) if self.ip_image_tokens else (width,)

    def added_specs(self) -> tuple[TensorSpec, ...]:
        """SDXL's added UNet inputs (pooled text embeddings and size conditioning); none for SD 1.x/2.x."""
        if not self.xl:
            return ()
        return (
            TensorSpec(TEXT_EMBEDS, "float32", ("batch", self.pooled_size)),
            TensorSpec(TIME_IDS, "float32", ("batch", self.time_ids)),
        )

    def text_encoder_specs(self) -> dict[str, ModelSpec]:
        """SD 1.x/2.x: the text encoder's last states, pooled output and every layer's states through the
        final layer norm (what ``clip_skip`` reads there). SDXL: each encoder's every layer's states as they
        are, and the second's pooled, projected embeddings, first (Optimum's order)."""
        ids = (TensorSpec("input_ids", "int32", ("batch", "sequence")),)
        first = self.text_hidden_size - self.text_hidden_size_2

        def states(name: str, width: int) -> TensorSpec:
            return TensorSpec(name, "float32", ("batch", "text_layers", "sequence", width))

        if not self.xl:
            return {
                TEXT_ENCODER: ModelSpec(
                    TEXT_ENCODER,
                    inputs=ids,
                    outputs=(
                        TensorSpec("last_hidden_state", "float32", ("batch", "sequence", first)),
                        TensorSpec("pooler_output", "float32", ("batch", first)),
                        states(LAYER_STATES, first),  # sdengine's exports
                    ),
                )
            }
        second = self.text_hidden_size_2
        specs = {}
        if self.first_text_encoder:  # all but the refiner
            specs[TEXT_ENCODER] = ModelSpec(
                TEXT_ENCODER,
                inputs=ids,
                outputs=(
                    TensorSpec("last_hidden_state", "float32", ("batch", "sequence", first)),
                    states(HIDDEN_STATES, first),
                ),
            )
        return {
            **specs,
            TEXT_ENCODER_2: ModelSpec(
                TEXT_ENCODER_2,
                inputs=ids,
                outputs=(
                    TensorSpec(TEXT_EMBEDS, "float32", ("batch", self.pooled_size)),
                    TensorSpec("last_hidden_state", "float32", ("batch", "sequence", second)),
                    states(HIDDEN_STATES, second),
                ),
            ),
        }

    def guidance_specs(self) -> tuple[TensorSpec, ...]:
        """A guidance-embedded UNet's last input: the scale's embedding, one row per UNet row."""
        if not self.guidance_embedding:
            return ()
        return (TensorSpec(TIMESTEP_COND, "float32", ("batch", self.guidance_embedding)),)

    def specs(self) -> dict[str, ModelSpec]:
        latent = ("batch", self.latent_channels, "latent_height", "latent_width")
        image = ("batch", 3, "height", "width")
        text = ("batch", "sequence", self.text_hidden_size)
        unet_inputs = (
            TensorSpec("sample", "float32", ("batch", self.unet_in_channels, *latent[2:])),
            TensorSpec("timestep", "float32", ()),
            TensorSpec("encoder_hidden_states", "float32", text),
            *self.added_specs(),
            *self.control_specs(),
            *self.ip_specs(),
            *((TensorSpec(PAG_ROWS, "float32", ("batch",)),) if self.pag else ()),
            *self.guidance_specs(),
            *((TensorSpec(FREEU, "float32", (4,)),) if self.freeu else ()),
        )
        out_sample = TensorSpec("out_sample", "float32", latent)
        feature = TensorSpec(
            DEEPCACHE_FEATURE,
            "float32",
            ("batch", self.deepcache_channels, "feature_height", "feature_width"),
        )
        return {
            **self.text_encoder_specs(),
            UNET: ModelSpec(
                UNET, inputs=unet_inputs, outputs=(out_sample, *((feature,) if self.deepcache else ()))
            ),
            UNET_SHALLOW: ModelSpec(UNET_SHALLOW, inputs=(*unet_inputs, feature), outputs=(out_sample,)),
            IMAGE_ENCODER: ModelSpec(  # CLIP's vision model with its projection
                IMAGE_ENCODER,
                inputs=(TensorSpec("pixel_values", "float32", ("batch", 3, *(self.ip_image_size,) * 2)),),
                outputs=(TensorSpec(IMAGE_EMBEDS, "float32", ("batch", *self.ip_embeds_shape)),),
            ),
            VAE_DECODER: ModelSpec(
                VAE_DECODER,
                inputs=(TensorSpec("latent_sample", "float32", latent),),
                outputs=(TensorSpec("sample", "float32", image),),
            ),
            PREVIEW_DECODER: ModelSpec(
                PREVIEW_DECODER,
                inputs=(TensorSpec("latent_sample", "float32", latent),),
                outputs=(TensorSpec("sample", "float32", image),),
            ),
            SAFETY_CHECKER: ModelSpec(  # as diffusers' ONNX pipeline runs it: flagged images black
                SAFETY_CHECKER,
                inputs=(
                    TensorSpec("clip_input", "float32", ("batch", 3, *(self.safety_image_size,) * 2)),
                    TensorSpec("images", "float32", ("batch", "height", "width", 3)),
                ),
                outputs=(
                    TensorSpec("out_images", "float32", ("batch", "height", "width", 3)),
                    TensorSpec("has_nsfw_concepts", "bool", ("batch",)),
                    # sdengine's exports: each concept's score, above 0 where it flags (for the export check)
                    TensorSpec("concept_scores", "float32", ("batch", "concepts")),
                ),
            ),
            VAE_ENCODER: ModelSpec(
                VAE_ENCODER,
                inputs=(TensorSpec("sample", "float32", image),),
                outputs=(
                    TensorSpec("latent_sample", "float32", latent)
                    if self.tiny_vae
                    else TensorSpec(
                        "latent_parameters",
                        "float32",
                        ("batch", 2 * self.latent_channels, "latent_height", "latent_width"),
                    ),
                ),
            ),
        }
