"""Two-way compatibility check with Hugging Face Optimum's ONNX Stable Diffusion export.

Not part of CI: optimum-onnx needs transformers < 4.58, older than the one sdengine tests with. Run it in a
venv of its own, with this checkout on the path:

    python -m venv /tmp/optvenv && /tmp/optvenv/bin/pip install torch==2.13.0 \
        "transformers<4.58" "diffusers<0.36" "optimum-onnx[onnxruntime]" tokenizers pillow tqdm psutil
    /tmp/optvenv/bin/python scripts/check_optimum_compat.py

1. Optimum exports the tiny random checkpoint; sdengine's runtime generates from that export.
2. Optimum's ORTStableDiffusionPipeline generates from sdengine's export.
Both images are compared with diffusers' own pipeline on the same initial latents (PSNR, dB).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.checkpoint import write_random_checkpoint  # noqa: E402
from export.onnx_export import export_checkpoint  # noqa: E402
from sdengine.images import psnr  # noqa: E402
from sdengine.pipeline import Pipeline  # noqa: E402

PROMPT = "a photo of a cat"
SETTINGS = dict(steps=4, seed=2, height=64, width=64, scheduler="pndm")


def main() -> int:
    import torch
    from optimum.exporters.onnx import main_export
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    work = Path(tempfile.mkdtemp(prefix="sdengine-optimum-"))
    try:
        ckpt = write_random_checkpoint(work / "ckpt", "tiny", seed=0)
        ours, theirs = work / "sdengine-export", work / "optimum-export"
        export_checkpoint(ckpt, ours)
        main_export(str(ckpt), output=str(theirs), task="text-to-image")
        reference = Pipeline.load(ckpt, backend="torch")(PROMPT, **SETTINGS).array

        on_theirs = Pipeline.load(theirs)(PROMPT, **SETTINGS).array
        print(f"sdengine runtime on Optimum's export vs diffusers: PSNR {psnr(on_theirs, reference):.1f} dB")

        pipe = ORTStableDiffusionPipeline.from_pretrained(str(ours))
        latents = torch.from_numpy(
            np.random.default_rng(SETTINGS["seed"]).standard_normal((1, 4, 8, 8), np.float32)
        )
        images = pipe(
            PROMPT,
            num_inference_steps=SETTINGS["steps"],
            height=64,
            width=64,
            latents=latents,
            output_type="np",
        ).images
        score = psnr(np.asarray(images), reference)
        print(f"Optimum runtime on sdengine's export vs diffusers: PSNR {score:.1f} dB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
