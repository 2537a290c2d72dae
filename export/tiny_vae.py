"""Random tiny VAEs (diffusers' ``AutoencoderTiny``, TAESD's architecture) for the tests and the demo, as
``sdengine make-tiny-vae`` writes them: TAESD's own sizes, whose weights cannot be downloaded here."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from sdengine.errors import InvalidArgumentError


def write_random_tiny_vae(output: str | os.PathLike, *, latent_channels: int = 4, seed: int = 0) -> Path:
    """A randomly initialised ``AutoencoderTiny`` with TAESD's sizes (its defaults), written to ``output``
    (diffusers format); ``latent_channels``: the checkpoint's (4 for SD 1.x/2.x and SDXL). Its weights are
    random: it decodes latents into structured noise, as the random checkpoints' VAEs do."""
    import torch
    from diffusers import AutoencoderTiny

    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidArgumentError(f"{out} exists and is not an empty directory")
    if latent_channels < 1:
        raise InvalidArgumentError(f"latent_channels must be >= 1, got {latent_channels}")
    digest = hashlib.sha256(f"sdengine-random-tiny-vae:{seed}".encode()).digest()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        model = AutoencoderTiny(latent_channels=latent_channels)
        # PyTorch's default initialisation fades through its 30-odd layers to a flat image; He's keeps the
        # spread, and the last layers are scaled so that latents of unit spread decode to mid-grey +- 0.2
        # (in [0, 1]) and images encode to latents of unit spread, as a trained one's roughly do
        for conv in (m for m in model.modules() if isinstance(m, torch.nn.Conv2d)):
            conv.weight.normal_(0.0, (2.0 / conv.weight[0].numel()) ** 0.5)
            if conv.bias is not None:
                conv.bias.zero_()
        last = model.decoder.layers[-1]
        last.weight.mul_(0.2 / float(model.decoder.layers(torch.randn(1, latent_channels, 16, 16)).std()))
        last.bias.fill_(0.5)
        last = model.encoder.layers[-1]
        last.weight.mul_(1.0 / float(model.encoder.layers(torch.rand(1, 3, 128, 128)).std()))
    model.eval().save_pretrained(out, safe_serialization=True)
    return out
