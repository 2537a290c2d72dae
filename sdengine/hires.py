"""The hires fix: text to image at the size asked for, then image to image at a larger one.

A model draws well at the size it was trained at; asked for more pixels straight away it repeats its
subject. The AUTOMATIC1111 web UI's "hires fix" draws at the trained size, enlarges the result and denoises
it again, part way (``strength``), at the larger size, so the larger image keeps the first one's composition
and gains detail. The first pass is enlarged one of two ways:

- ``"latent"`` (the web UI's default, "Latent"): its latents, bilinearly, as torch's
  ``interpolate(mode="bilinear", align_corners=False)`` does (:func:`upscale_latents`); no VAE work
  between the passes. Bilinear latents are soft, so this wants a strength of about 0.5 or more.
- ``"image"``: its decoded images, with Lanczos (as any image input is resized), encoded again by the VAE.

The second pass is an ordinary image-to-image request (:meth:`GenerationRequest.hires_pass`): the same
prompts, seeds and settings, its own noise drawn from the seeds at the larger size, ControlNet's images
resized to it, ``hires_steps`` steps (default: the first pass's) of which ``strength`` run, or its own
custom timesteps or sigmas (:mod:`sdengine.schedulers.custom`), whose count sets them. Only its images are
checked by the safety checker.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sdengine.errors import InvalidArgumentError
from sdengine.schedulers.custom import CustomSteps

UPSCALERS = ("latent", "image")
#: The web UI's default denoising strength for the second pass.
DEFAULT_HIRES_STRENGTH = 0.7
MAX_HIRES_SCALE = 4.0


@dataclass(frozen=True)
class HiresFix:
    """The second pass of a request: its size, steps, strength and how the first pass is enlarged."""

    scale: float
    height: int
    width: int
    steps: int
    strength: float
    upscale: str
    #: the second pass's own timesteps or sigmas (None: its scheduler's spacing)
    custom: CustomSteps | None = None

    def parameters(self) -> dict[str, object]:
        return {
            "hires_scale": self.scale,
            "hires_size": f"{self.height}x{self.width}",
            "hires_steps": self.steps,
            "hires_strength": self.strength,
            "hires_upscale": self.upscale,
            **({f"hires_{self.custom.kind}": list(self.custom.values)} if self.custom is not None else {}),
        }


def hires_fix(
    scale: float | None,
    strength: float | None,
    steps: int | None,
    upscale: str | None,
    *,
    height: int,
    width: int,
    first_steps: int,
    multiple: int,
    custom: CustomSteps | None = None,
) -> HiresFix | None:
    """Check the hires settings of a ``height`` x ``width`` request of ``first_steps`` steps: None without
    ``scale``; the second pass's size is ``scale`` times the first's, rounded down to a ``multiple``.
    ``custom``: the second pass's own timesteps or sigmas, whose count is its steps."""
    if scale is None:
        given = {"hires_strength": strength, "hires_steps": steps, "hires_upscale": upscale}
        given["hires_timesteps or hires_sigmas"] = custom
        if named := [name for name, value in given.items() if value is not None]:
            raise InvalidArgumentError(
                f"{', '.join(named)} apply to the hires fix only: give hires_scale too"
            )
        return None
    number = isinstance(scale, (int, float, np.number)) and not isinstance(scale, bool)
    if not number or not 1.0 < scale <= MAX_HIRES_SCALE:
        raise InvalidArgumentError(f"hires_scale must be a number in (1, {MAX_HIRES_SCALE:g}], got {scale!r}")
    big_height, big_width = (int(side * scale) // multiple * multiple for side in (height, width))
    if (big_height, big_width) == (height, width):
        raise InvalidArgumentError(
            f"hires_scale {scale:g} leaves {height}x{width} as it is (sizes are multiples of {multiple})"
        )
    strength = DEFAULT_HIRES_STRENGTH if strength is None else strength
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise InvalidArgumentError(f"hires_strength must be a number in (0, 1], got {strength!r}")
    if custom is not None and steps not in (None, custom.steps):
        raise InvalidArgumentError(
            f"hires_steps {steps} and the second pass's {custom.steps} custom {custom.kind} steps: give one"
        )
    steps = custom.steps if custom is not None else first_steps if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise InvalidArgumentError(f"hires_steps must be a whole number >= 1, got {steps!r}")
    if int(steps * strength) < 1:
        raise InvalidArgumentError(
            f"hires_strength {strength:g} of {steps} hires_steps runs no step: raise either"
        )
    upscale = "latent" if upscale is None else upscale
    if upscale not in UPSCALERS:
        raise InvalidArgumentError(f"hires_upscale must be {' or '.join(UPSCALERS)}, got {upscale!r}")
    return HiresFix(float(scale), big_height, big_width, int(steps), float(strength), upscale, custom)


def upscale_latents(latents: np.ndarray, height: int, width: int) -> np.ndarray:
    """Latents (B, C, h, w) -> (B, C, height, width), bilinear with half-pixel centres and edges clamped, as
    torch's ``interpolate(size=..., mode="bilinear", align_corners=False)`` computes it."""
    x = latents.astype(np.float32)
    for axis, size in ((2, height), (3, width)):
        n = x.shape[axis]
        source = np.maximum((np.arange(size, dtype=np.float64) + 0.5) * (n / size) - 0.5, 0.0)
        low = np.minimum(np.floor(source).astype(np.int64), n - 1)
        high = np.minimum(low + 1, n - 1)
        frac = (source - low).astype(np.float32)
        shape = [1] * x.ndim
        shape[axis] = size
        frac = frac.reshape(shape)
        x = np.take(x, low, axis=axis) * (1 - frac) + np.take(x, high, axis=axis) * frac
    return x
