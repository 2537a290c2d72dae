"""Torch modules that give each diffusers/transformers component exactly the inputs and outputs of its spec.

Only the export imports these; the runtime never needs torch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from export.seamless import make_seamless
from sdengine.model_dir import optional_json, weights_variant
from sdengine.model_specs import (
    FREEU,
    IMAGE_ENCODER,
    IP_ADAPTER_SCALE,
    PAG_ROWS,
    PREVIEW_DECODER,
    SAFETY_CHECKER,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    TINY_VAE_CLASS,
    UNET,
    VAE_DECODER,
    VAE_ENCODER,
    Architecture,
)


class TextEncoderExport(nn.Module):
    """Optimum's two outputs, then every layer's hidden states through the final layer norm, stacked
    (batch, layers + 1, sequence, hidden): what ``clip_skip`` reads (diffusers' ``encode_prompt`` takes
    ``hidden_states[-(clip_skip + 1)]`` and applies ``final_layer_norm``)."""

    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.text_encoder(input_ids.to(torch.int64), output_hidden_states=True, return_dict=True)
        # transformers 5 flattened CLIPTextModel (no .text_model); 4.x keeps the layer norm one level down
        norm = getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm
        layers = torch.stack([norm(h) for h in out.hidden_states], dim=1)
        return out.last_hidden_state, out.pooler_output, layers


class XlTextEncoderExport(nn.Module):
    """SDXL's text encoders: Optimum's first output (the second encoder's pooled, projected ``text_embeds``;
    the first encoder's last states), then every layer's states as they are, stacked (batch, layers + 1,
    sequence, hidden). SDXL reads the penultimate layer's (``hidden_states[-(clip_skip + 2)]`` in diffusers'
    ``encode_prompt``), without the final layer norm."""

    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.text_encoder(input_ids.to(torch.int64), output_hidden_states=True, return_dict=True)
        states = torch.stack(out.hidden_states, dim=1)
        if hasattr(out, "text_embeds"):  # the second encoder, with its projection
            return out.text_embeds, out.last_hidden_state, states
        return out.last_hidden_state, states


def exported_component(wrapper: nn.Module) -> tuple[str, nn.Module]:
    """The diffusers or transformers component a wrapper exports, and its path in the wrapper: the first
    child, through the wrappers that only add an input (``inner``: ``export.pag``'s, say), so that the
    component's weights are named alike whatever wraps it."""
    module, path = wrapper, ""
    while isinstance(getattr(module, "inner", None), nn.Module):
        module, path = module.inner, f"{path}inner."
    attribute, component = next(module.named_children())
    return f"{path}{attribute}", component


def with_image_prompt(
    unet: nn.Module,
    added: dict[str, torch.Tensor] | None,
    image_embeds: torch.Tensor | None,
    ip_adapter_scale: torch.Tensor | None,
) -> dict[str, Any]:
    """The UNet call's ``added_cond_kwargs`` keyword, with an IP-Adapter's image embeddings where it has one,
    its attention weighted by ``ip_adapter_scale`` (an input: traced at any value but 0, which diffusers
    skips in Python)."""
    if image_embeds is None:
        return {} if added is None else {"added_cond_kwargs": added}
    for processor in unet.attn_processors.values():
        if hasattr(processor, "to_k_ip"):
            processor.scale = [ip_adapter_scale]
    return {"added_cond_kwargs": {**(added or {}), "image_embeds": [image_embeds]}}


class UNetExport(nn.Module):
    """The UNet; with an IP-Adapter loaded, its image prompt's inputs after the text."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        ip_adapter_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        extra = with_image_prompt(self.unet, None, image_embeds, ip_adapter_scale)
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False, **extra)[0]


class XlUNetExport(nn.Module):
    """SDXL's UNet, whose added conditioning (pooled text embeddings, size numbers) comes as two inputs of
    its own, Optimum's ``text_embeds`` and ``time_ids``."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        ip_adapter_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        extra = with_image_prompt(self.unet, added, image_embeds, ip_adapter_scale)
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False, **extra)[0]


class GuidanceEmbeddedUNetExport(nn.Module):
    """A UNet export wrapper (``inner``) whose last input is a guidance-embedded UNet's ``timestep_cond``
    (``sdengine.guidance_embedding``), handed to the UNet's timestep embedding, where diffusers' UNet adds
    it (``time_embedding(t_emb, timestep_cond)``), before the wrapped UNet runs on the other inputs."""

    def __init__(self, inner: nn.Module, unet: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.condition: torch.Tensor | None = None
        # a hook, not a wrapping module: the UNet's layers keep their names (export.weight_names)
        unet.time_embedding.register_forward_pre_hook(self._condition)

    def _condition(self, module: nn.Module, args: tuple) -> tuple:
        if self.condition is None:
            raise RuntimeError("GuidanceEmbeddedUNetExport's UNet called without its timestep_cond")
        return (args[0], self.condition)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        *others, self.condition = inputs
        try:
            return self.inner(*others)
        finally:
            self.condition = None


class ControlledUNetExport(nn.Module):
    """The UNet with ControlNets inside: each reads the latents (an inpainting UNet's first channels), the
    timestep, the text and its 3 channels of ``controlnet_cond``, and the UNet adds the sum of their
    residuals, each scaled by its ``conditioning_scale``, as diffusers' ControlNet pipelines and
    ``MultiControlNetModel`` do, and each residual by its row's ``control_weights`` (its control mode:
    ``sdengine.controlnet.control_mode_weights``). The UNet is the first child (its layer weights are named
    after it)."""

    def __init__(self, unet: nn.Module, controlnets: list[nn.Module]) -> None:
        super().__init__()
        self.unet = unet
        self.controlnets = nn.ModuleList(controlnets)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: torch.Tensor,
        control_weights: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        ip_adapter_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        control = (controlnet_cond, conditioning_scale, control_weights)
        return self.run(
            sample, timestep, encoder_hidden_states, control, None, (image_embeds, ip_adapter_scale)
        )

    def run(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        control: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        added: dict[str, torch.Tensor] | None = None,
        image_prompt: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    ) -> torch.Tensor:
        """``control``: the ControlNet inputs (``controlnet_cond``, ``conditioning_scale``,
        ``control_weights``); ``added``: SDXL's added conditioning, which its ControlNets read as its UNet
        does; ``image_prompt``: an IP-Adapter's inputs, which the UNet alone reads (as in diffusers'
        ControlNet pipelines)."""
        controlnet_cond, conditioning_scale, control_weights = control
        extra = {} if added is None else {"added_cond_kwargs": added}
        latents = sample[:, : self.controlnets[0].config.in_channels]
        down, mid = None, None
        for i, controlnet in enumerate(self.controlnets):
            d, m = controlnet(
                latents,
                timestep,
                encoder_hidden_states,
                controlnet_cond=controlnet_cond[:, 3 * i : 3 * i + 3],
                conditioning_scale=conditioning_scale[i],
                return_dict=False,
                **extra,
            )
            rows = control_weights[:, i]  # (batch, residuals): this ControlNet's, down blocks' then middle's
            d = [res * rows[:, r, None, None, None] for r, res in enumerate(d)]
            m = m * rows[:, -1, None, None, None]
            down = d if down is None else [a + b for a, b in zip(down, d, strict=True)]
            mid = m if mid is None else mid + m
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
            **with_image_prompt(self.unet, added, *image_prompt),
        )[0]


class XlControlledUNetExport(ControlledUNetExport):
    """SDXL's UNet with ControlNets inside: its added conditioning (``text_embeds``, ``time_ids``, after the
    text, as :class:`XlUNetExport` takes them) goes to every ControlNet and the UNet."""

    def forward(  # type: ignore[override]
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: torch.Tensor,
        control_weights: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        ip_adapter_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        control = (controlnet_cond, conditioning_scale, control_weights)
        return self.run(
            sample, timestep, encoder_hidden_states, control, added, (image_embeds, ip_adapter_scale)
        )


class ImageEncoderExport(nn.Module):
    """An IP-Adapter's CLIP image encoder: its projected image embeddings, or (``hidden_states``, for the
    Plus kind) every token of its penultimate layer, as diffusers' ``encode_image`` reads them."""

    def __init__(self, encoder: nn.Module, hidden_states: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.hidden_states = hidden_states

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.hidden_states:
            return self.encoder(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]
        return self.encoder(pixel_values=pixel_values).image_embeds


class VaeDecoderExport(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoderExport(nn.Module):
    """Outputs the Gaussian's parameters (mean and log-variance), as Optimum's ``latent_parameters``."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(sample).latent_dist.parameters


class TinyVaeEncoderExport(nn.Module):
    """A tiny VAE's encoder (``AutoencoderTiny``): the latents themselves, which diffusers' pipelines take as
    they are (no sampling)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(sample).latents


class SafetyCheckerExport(nn.Module):
    """diffusers' ``StableDiffusionSafetyChecker.forward_onnx`` with the inputs and outputs its ONNX pipeline
    uses (the images with every flagged one black, and the flags), and each image's concept scores
    beside them: an image is flagged where a score is above 0. The scores give the export's check against
    PyTorch something continuous to compare (random inputs flag nothing); the flags and scores are checked
    against diffusers' own checker in the tests. The blacking out is a product, which traces for any size."""

    def __init__(self, checker: nn.Module) -> None:
        super().__init__()
        self.checker = checker

    def forward(
        self, clip_input: torch.Tensor, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        checker = self.checker
        embeds = checker.visual_projection(checker.vision_model(clip_input)[1])
        unit = nn.functional.normalize(embeds)

        def similarity(concepts: torch.Tensor) -> torch.Tensor:
            return unit @ nn.functional.normalize(concepts).t()

        special = similarity(checker.special_care_embeds) - checker.special_care_embeds_weights
        adjustment = (special > 0).any(dim=1, keepdim=True).to(embeds.dtype) * 0.01  # special care: stricter
        scores = similarity(checker.concept_embeds) - checker.concept_embeds_weights + adjustment
        flags = (scores > 0).any(dim=1)
        return images * (~flags).to(images.dtype)[:, None, None, None], flags, scores


def load_export_module(
    checkpoint: str | Path,
    name: str,
    controlnets: Sequence[Path] = (),
    xl: bool = False,
    ip_adapter: Path | None = None,
    pag_layers: Sequence[str] = (),
    seamless: bool = False,
    preview_vae: Path | None = None,
    freeu: bool = False,
) -> nn.Module:
    """Load one checkpoint component, in float32 and eval mode, wrapped for export; the UNet with the
    ControlNets in the directories ``controlnets`` inside, if any, and the IP-Adapter file ``ip_adapter``
    loaded (whose image encoder is the ``image_encoder`` component), and the self-attention of
    ``pag_layers`` perturbable (``export.pag``: its last input then says which rows). ``xl``: an SDXL
    checkpoint's. ``seamless``: the UNet's and VAE's convolutions wrap around (``export.seamless``).
    ``preview_vae``: the tiny VAE folder whose decoder is the ``preview_decoder`` component. ``freeu``: the
    UNet's last input is FreeU's scales (``export.freeu``)."""
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    root = Path(checkpoint)

    def load(cls: type, folder: str) -> nn.Module:
        return cls.from_pretrained(root / folder, variant=weights_variant(root / folder))

    if name == TEXT_ENCODER and xl:
        module: nn.Module = XlTextEncoderExport(load(CLIPTextModel, TEXT_ENCODER))
    elif name == TEXT_ENCODER_2:
        module = XlTextEncoderExport(load(CLIPTextModelWithProjection, TEXT_ENCODER_2))
    elif name == TEXT_ENCODER:
        module = TextEncoderExport(load(CLIPTextModel, "text_encoder"))
    elif name == UNET:
        unet = load(UNet2DConditionModel, "unet")
        if seamless:
            make_seamless(unet)
        if ip_adapter is not None:
            from export.ip_adapter import load_ip_adapter

            load_ip_adapter(unet, ip_adapter)
        if controlnets:
            from export.controlnet import load_controlnets

            wrapper = XlControlledUNetExport if xl else ControlledUNetExport
            module = wrapper(unet, load_controlnets(list(controlnets)))
        else:
            module = XlUNetExport(unet) if xl else UNetExport(unet)
        if pag_layers:
            from export.pag import PerturbableUNetExport, perturb_self_attention

            module = PerturbableUNetExport(module, perturb_self_attention(unet, pag_layers))
        if unet.config.time_cond_proj_dim:  # its last input (Architecture.guidance_specs)
            module = GuidanceEmbeddedUNetExport(module, unet)
        if freeu:  # its last input (Architecture.specs)
            from export.freeu import FreeUUNetExport

            module = FreeUUNetExport(module, unet)
    elif name == IMAGE_ENCODER:
        from transformers import CLIPVisionModelWithProjection

        from export.ip_adapter import image_encoder_dir, reads_hidden_states

        if ip_adapter is None:
            raise KeyError(name)
        encoder = CLIPVisionModelWithProjection.from_pretrained(image_encoder_dir(ip_adapter))
        module = ImageEncoderExport(encoder, reads_hidden_states(ip_adapter))
    elif name == SAFETY_CHECKER:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

        module = SafetyCheckerExport(load(StableDiffusionSafetyChecker, "safety_checker"))
    elif name == PREVIEW_DECODER:
        if preview_vae is None:
            raise KeyError(name)
        vae = AutoencoderTiny.from_pretrained(preview_vae)
        if seamless:
            make_seamless(vae)
        module = VaeDecoderExport(vae)
    elif name in (VAE_DECODER, VAE_ENCODER):
        tiny = optional_json(root / "vae" / "config.json").get("_class_name") == TINY_VAE_CLASS
        vae = load(AutoencoderTiny if tiny else AutoencoderKL, "vae")
        if seamless:
            make_seamless(vae)
        encoder = TinyVaeEncoderExport if tiny else VaeEncoderExport
        module = VaeDecoderExport(vae) if name == VAE_DECODER else encoder(vae)
    else:
        raise KeyError(name)
    return module.float().eval()


def sample_inputs(
    arch: Architecture,
    name: str,
    *,
    batch: int,
    height: int,
    width: int,
    seed: int = 0,
    vocab_size: int = 49408,
) -> dict[str, torch.Tensor]:
    """Random inputs for component ``name`` at the given size, shaped and typed by its spec."""
    spec = arch.specs()[name]
    sizes = arch.sizes(batch, height, width)
    gen = torch.Generator().manual_seed(seed)
    inputs: dict[str, torch.Tensor] = {}
    for t in spec.inputs:
        shape = t.shape(sizes)
        if t.dtype.startswith("int"):
            inputs[t.name] = torch.randint(0, vocab_size, shape, generator=gen, dtype=getattr(torch, t.dtype))
        elif t.name == "timestep":
            inputs[t.name] = torch.tensor(float(torch.randint(1, 1000, (), generator=gen)))
        elif t.name == IP_ADAPTER_SCALE:  # not 0, which diffusers' attention skips in Python (untraced)
            inputs[t.name] = torch.tensor(0.5 + float(torch.rand((), generator=gen)))
        elif t.name == PAG_ROWS:  # rows of both kinds, perturbed and not
            inputs[t.name] = (torch.arange(shape[0]) % 2).to(torch.float32)
        elif t.name == FREEU:  # scales about the ones in use (diffusers' for SD 1.5), each its own
            typical = torch.tensor([0.9, 0.2, 1.5, 1.6])
            inputs[t.name] = typical + 0.1 * torch.rand(shape, generator=gen)
        else:
            inputs[t.name] = torch.randn(shape, generator=gen, dtype=getattr(torch, t.dtype))
    return inputs


def text_vocab_size(checkpoint: str | Path, component: str = TEXT_ENCODER) -> int:
    """The vocabulary size of the checkpoint's text encoder ``component`` (another model's: the first text
    encoder's, or the second's where it is the only one, as in SDXL's refiner)."""
    folder = component if component in (TEXT_ENCODER, TEXT_ENCODER_2) else TEXT_ENCODER
    if not (Path(checkpoint) / folder / "config.json").is_file():
        folder = TEXT_ENCODER_2
    return int(json.loads((Path(checkpoint) / folder / "config.json").read_text())["vocab_size"])
