"""A base model and a refiner sharing one run (SDXL's "ensemble of expert denoisers", Podell et al. 2023,
sec. 2.5; diffusers' ``denoising_end`` and ``denoising_start``; the web UI's "refiner, switch at").

The run is the base request's schedule. The base model makes its calls down to the switch, the training
timestep ``round(T - switch * T)``; it hands its latents over as they are, still noisy; the refiner, from a
fresh scheduler, makes the calls below the switch, without noising them again. The split is diffusers' own
(:func:`sdengine.schedulers.base.calls_before` and :func:`~sdengine.schedulers.base.first_call_after`), so
for every scheduler both parts run the calls diffusers' SDXL pipelines run.

What the two parts share: the prompts (each model encodes them with its own text encoders), seeds, steps,
guidance and scheduler. Prompt edits count steps of the whole run. The refiner draws its own per-step noise
(stochastic schedulers), reads no ControlNet, and its VAE decodes the result. Inpainting (with a plain base
model, which blends the image back in outside the mask after each step) goes on in the refiner, which blends
its steps with the latents it was handed, as diffusers' SDXL inpainting pipeline does given latents; an
inpainting model's run is not handed over, its latents outside the mask being still noisy at the switch.

A refiner is any model whose latents are the base's: the same channels, downsampling and scaling factor
(SDXL's refiner for SDXL base; any SD 1.x model for another). It is loaded beside the base, on the same kind
of backend: ``Pipeline.load(base, refiner=dir)``, or :meth:`set_refiner` on a loaded pipeline.
"""

from __future__ import annotations

from typing import Any

from sdengine.errors import InvalidArgumentError, UnsupportedConfigError

#: The share of the run the base model makes when none is asked for: diffusers' documented
#: ``high_noise_frac`` and the web UI's default switch.
DEFAULT_REFINER_SWITCH = 0.8


def check_refiner(base: Any, refiner: Any) -> None:
    """InvalidArgumentError unless ``refiner`` (a loaded pipeline) can finish ``base``'s runs: the same
    kind of pipeline, latents alike, and a UNet that takes nothing but them (no ControlNet, no inpainting
    channels)."""
    if refiner is base:
        raise InvalidArgumentError("a model cannot refine its own runs: load the refiner on its own")
    if type(refiner) is not type(base):
        raise InvalidArgumentError(
            f"the refiner runs on {type(refiner).__name__}, the base on {type(base).__name__}: load both on "
            "the same backend"
        )
    ours, theirs = base.model_dir, refiner.model_dir
    mine = (ours.arch.latent_channels, ours.arch.vae_scale_factor, ours.vae_scaling_factor)
    other = (theirs.arch.latent_channels, theirs.arch.vae_scale_factor, theirs.vae_scaling_factor)
    if mine != other:
        raise InvalidArgumentError(
            f"{theirs.root}: its latents ({other[0]} channels, 1/{other[1]} size, scaled by {other[2]:g}) "
            f"are not the base's ({mine[0]}, 1/{mine[1]}, {mine[2]:g}): it cannot refine this model's runs"
        )
    if ours.arch.guidance_embedding or theirs.arch.guidance_embedding:
        raise UnsupportedConfigError(
            "a refiner with a latent consistency model (a UNet that takes the guidance scale as an input) is "
            "not supported"
        )
    if refiner.controlnets or theirs.arch.inpainting_unet:
        raise InvalidArgumentError(
            f"{theirs.root}: its UNet takes a control image or a mask; a refiner's takes the latents alone"
        )
