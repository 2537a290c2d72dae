"""Forge's always-on "PerturbedAttentionGuidance Integrated" script, read from a web UI API request into
perturbed-attention guidance's scale (:mod:`sdengine.pag`)::

    "alwayson_scripts": {"PerturbedAttentionGuidance Integrated": {"args": [true, 3.0]}}

Its ``args`` are ``[enabled, scale]``, or in its later versions ``[enabled, scale, attenuation, start, end]``,
whose attenuation (0) and share of the steps (0 to 1) must be the ones that change nothing. Forge perturbs
the middle block's self-attention (its value passed on, as if every query saw only its own key) and adds
``scale (cond - perturbed)`` to the guided prediction, in the denoised prediction's terms, which are affine in
the UNet's output with the same sample: diffusers' PAG with layers ``mid`` (what ``sdengine export
--pag-layers mid`` traces), whatever the guidance scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sdengine.errors import InvalidArgumentError

#: The ``alwayson_scripts`` entry (the web UI matches script titles without regard to case).
SCRIPT = "perturbedattentionguidance integrated"
#: The layers Forge perturbs, as diffusers names them.
FORGE_LAYERS = ("mid",)
#: The later versions' extra arguments, at the values that change nothing: attenuation, start, end.
NEUTRAL = (0.0, 0.0, 1.0)


def forge_pag(scripts: Any, layers: Sequence[str]) -> tuple[float, dict[str, Any]]:
    """(pag_scale, infotext fields) of a request's ``alwayson_scripts`` (0 and none where the script is absent
    or off), for a model whose UNet perturbs ``layers`` (none: it cannot). InvalidArgumentError names what
    cannot be honoured."""
    entry = next((v for k, v in (scripts or {}).items() if isinstance(k, str) and k.lower() == SCRIPT), None)
    if entry is None:
        return 0.0, {}
    field = "alwayson_scripts.PerturbedAttentionGuidance Integrated"
    args = entry.get("args") if isinstance(entry, dict) else None
    if not isinstance(args, list) or len(args) not in (2, 2 + len(NEUTRAL)) or not isinstance(args[0], bool):
        raise InvalidArgumentError(
            f"{field}.args: [enabled, scale] or [enabled, scale, attenuation, start, end], got {args!r}"
        )
    numbers = args[1:]
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in numbers):
        raise InvalidArgumentError(f"{field}.args: the scale and the rest must be numbers, got {numbers!r}")
    if not args[0]:
        return 0.0, {}
    if tuple(float(v) for v in numbers[1:]) not in ((), NEUTRAL):
        raise InvalidArgumentError(
            f"{field}: attenuation, start and end other than 0, 0, 1 are not supported, got {numbers[1:]!r}"
        )
    if tuple(layers) != FORGE_LAYERS:
        served = ", ".join(layers) if layers else "none"
        raise InvalidArgumentError(
            f"{field} perturbs the middle block's self-attention; the model served perturbs {served} "
            "(export it with --pag-layers mid)"
        )
    scale = float(numbers[0])
    fields = {"PerturbedAttentionGuidance_enabled": True, "PerturbedAttentionGuidance_scale": scale}
    return scale, fields
