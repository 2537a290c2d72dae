"""The offline demo: random tiny checkpoint -> ONNX -> image, with the PyTorch baseline beside it.

Needs the ``export`` extra (torch, diffusers) for writing the checkpoint, exporting it and the baseline.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sdengine.images import psnr, save_png

PROMPT = "a photo of an astronaut riding a horse on mars"
NEGATIVE = "blurry"
SEED = 0


def run_demo(
    workdir: Path, *, output: Path, steps: int = 20, scheduler: str | None = None
) -> dict[str, float]:
    from export.checkpoint import write_random_checkpoint
    from export.onnx_export import export_checkpoint
    from sdengine.cli import format_times
    from sdengine.pipeline import Pipeline

    say = lambda text: print(text, file=sys.stderr)  # noqa: E731 - progress lines on stderr, results on stdout
    checkpoint, onnx_dir = workdir / "tiny-checkpoint", workdir / "tiny-onnx"
    say(f"[1/4] writing a tiny random-weight SD 1.x checkpoint to {checkpoint}")
    write_random_checkpoint(checkpoint, "tiny", seed=SEED, overwrite=True)
    say(f"[2/4] exporting it to ONNX in {onnx_dir}")
    export_checkpoint(checkpoint, onnx_dir)
    results = {}
    for i, (backend, path) in enumerate((("ort", onnx_dir), ("torch", checkpoint)), start=3):
        say(f"[{i}/4] generating with the {backend} backend")
        pipe = Pipeline.load(path, backend=backend)
        pipe(PROMPT, NEGATIVE, steps=1, seed=SEED, scheduler=scheduler)  # warm-up, not timed
        results[backend] = pipe(PROMPT, NEGATIVE, steps=steps, seed=SEED, scheduler=scheduler)
    ort_result = results["ort"]
    save_png(ort_result.images[0], output, {**ort_result.request.parameters(), "backend": "ort"})
    similarity = psnr(ort_result.array, results["torch"].array)
    print(format_times({f"{b} (ms, calls)": r.times.summary() for b, r in results.items()}))
    print(
        f"\nwrote {output}: {steps} steps, "
        f"{ort_result.request.height}x{ort_result.request.width}, seed {SEED}"
    )
    print(f"ONNX Runtime image vs PyTorch (diffusers) image: PSNR {similarity:.1f} dB")
    print(
        "NOTE: the checkpoint's weights are RANDOM, so the image is structured noise, "
        "not a picture of the prompt."
    )
    return {"psnr_db": similarity}
