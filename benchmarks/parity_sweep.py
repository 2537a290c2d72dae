"""Random combinations of the engine's settings, each run by the engine and by a reference, to catch what the
tests of one feature at a time miss: two features that meet wrongly.

    python -m benchmarks.parity_sweep [--against torch|bound] [--combos 30] [--seed 0] [--workdir DIR]

``torch`` (the default) runs each request on the ONNX Runtime engine and on the PyTorch baseline (diffusers'
pipelines, given the engine's draws) and compares the images (PSNR, at least ``--min-db``). ``bound`` runs it
on the host loop and on the loop the GPU backends run, every step one call of the step model with its state
bound in place, here on ONNX Runtime's CPU provider, and compares the latents. The models are a tiny random
SD 1.x checkpoint and its export with perturbed-attention guidance, FreeU and DeepCache in it, written to
``--workdir`` once. Each combination draws a scheduler, step count, guidance, prompt (prompt editing,
alternation, long prompts), batch, text or image to image or inpainting, the hires fix, PAG, FreeU,
DeepCache, clip skip, guidance rescale, adaptive projected guidance, variation seeds, custom sigmas or
timesteps and PyTorch's CPU noise; weighted and composable prompts only against ``bound`` (the baseline's
A1111 weighting is ill-conditioned on random text encoders, and it has no composable prompts).

A request both refuse alike passes; one the reference alone refuses with UnsupportedConfigError is counted
as the reference lacking it (the baseline's documented limits: diffusers' pipelines lack some settings).
Anything else fails: the engine refusing what the reference runs, different errors, images (or latents)
apart. Each line prints its settings, so a failure can be run again by hand. Exit status 1 if any failed.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: Prompts: plain, prompt editing (with the web UI's syntax), alternation and editing, longer than a window.
PROMPTS = ("a cat", "a [cat:dog:0.5] in a red hat", "a [cat|dog] on a [mat::0.4]", "a cat, " * 30)
#: ... and, against the bound loop only, weighted and composable prompts.
ENGINE_ONLY_PROMPTS = ("a [cat:dog:0.5] in a (red:1.3) hat", "a cat AND a dog :0.5")
SIZE = 64


@dataclass(frozen=True)
class Outcome:
    """One combination's result: ``verdict`` "ok", "refused by both", "reference lacks it" or "FAILED"."""

    verdict: str
    detail: str
    settings: dict[str, Any]

    @property
    def failed(self) -> bool:
        return self.verdict == "FAILED"


def random_settings(rng: random.Random, features: Mapping[str, bool], engine_only: bool) -> dict[str, Any]:
    """One random request (the prompt under ``"prompt"``): the engine's settings, as its pipeline takes
    them. ``features``: whether the model runs ``pag``, ``freeu``, ``deepcache``; ``engine_only``: also
    weighted and composable prompts (both sides are the engine's)."""
    from sdengine.schedulers import SCHEDULER_NAMES, custom_kinds

    prompts = PROMPTS + (ENGINE_ONLY_PROMPTS if engine_only else ())
    width = rng.choice([SIZE, SIZE + 32])
    s: dict[str, Any] = {
        "prompt": rng.choice(prompts),
        "steps": rng.choice([2, 3, 4, 6]),
        "seed": rng.randrange(1000),
        "height": SIZE,
        "width": width,
        "scheduler": rng.choice([name for name in SCHEDULER_NAMES if name != "lcm"]),
        "guidance": rng.choice([1.0, 5.0, 7.5]),
    }
    if any(mark in s["prompt"] for mark in "[(") or " AND " in s["prompt"]:
        s["prompt_weights"] = "a1111"
    if len(s["prompt"]) > 100:
        s["long_prompts"] = True
    if rng.random() < 0.2:
        s["batch"] = 2
    mode = rng.choice(["text", "text", "image", "inpaint"])
    if mode != "text":
        s["image"] = np.random.default_rng(2).random((SIZE, width, 3)).astype(np.float32)
        s["strength"] = rng.choice([0.5, 0.8, 1.0])
    if mode == "inpaint":
        mask = np.zeros((SIZE, width), np.float32)
        mask[16:48, 16:48] = 1
        s["mask"] = mask
    if mode == "text" and rng.random() < 0.25:
        s["hires_scale"] = 1.5
    guided = s["guidance"] > 1
    draws = {
        "pag_scale": (features.get("pag"), lambda: rng.choice([1.5, 3.0])),
        "freeu": (features.get("freeu"), lambda: (0.9, 0.2, 1.5, 1.6)),
        "deepcache_interval": (features.get("deepcache"), lambda: rng.choice([2, 3])),
        "clip_skip": (True, lambda: 1),
        "guidance_rescale": (guided, lambda: 0.5),
        "apg": (guided, lambda: (rng.choice([0.0, 1.0]), 15.0, rng.choice([0.0, -0.5]))),
        "noise_source": (True, lambda: "torch-cpu"),
    }
    for name, (possible, value) in draws.items():
        if possible and rng.random() < 0.2:
            s[name] = value()
    if rng.random() < 0.2:
        s["variation_seed"], s["variation_strength"] = 7, 0.3
    kinds = custom_kinds(s["scheduler"])
    if kinds and rng.random() < 0.2:
        kind = rng.choice(kinds)
        s[kind] = "ays"
        del s["steps"]
        if "hires_scale" in s:
            s[f"hires_{kind}"] = "ays"
    return s


def shown(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings as a line shows them (arrays by their shape)."""
    return {k: f"<array {v.shape}>" if isinstance(v, np.ndarray) else v for k, v in settings.items()}


def compare(
    run: Callable[[str, dict[str, Any]], Any],
    reference: Callable[[str, dict[str, Any]], Any],
    settings: dict[str, Any],
    measure: Callable[[Any, Any], tuple[bool, str]],
) -> Outcome:
    """Run one combination on both sides and judge it (see the module's docstring)."""
    from sdengine.errors import UnsupportedConfigError

    results, errors = {}, {}
    for side, call in (("engine", run), ("reference", reference)):
        try:
            results[side] = call("blurry", dict(settings))
        except Exception as exc:  # noqa: BLE001 - every error is a finding, judged below
            errors[side] = exc
    if not errors:
        same, detail = measure(results["engine"], results["reference"])
        return Outcome("ok" if same else "FAILED", detail, settings)
    said = {side: f"{type(e).__name__}: {e}" for side, e in errors.items()}
    if len(errors) == 2 and type(errors["engine"]) is type(errors["reference"]):
        return Outcome("refused by both", said["engine"], settings)
    if set(errors) == {"reference"} and isinstance(errors["reference"], UnsupportedConfigError):
        return Outcome("reference lacks it", said["reference"], settings)
    return Outcome("FAILED", "; ".join(f"{side}: {text}" for side, text in said.items()), settings)


def images_agree(min_db: float) -> Callable[[Any, Any], tuple[bool, str]]:
    from sdengine.images import psnr

    def measure(ours: Any, theirs: Any) -> tuple[bool, str]:
        value = psnr(ours.array, theirs.array)
        return value >= min_db, f"{value:.1f} dB"

    return measure


def latents_agree(tolerance: float = 1e-4) -> Callable[[Any, Any], tuple[bool, str]]:
    def measure(ours: Any, theirs: Any) -> tuple[bool, str]:
        scale = max(float(np.abs(theirs.latents).max()), 1e-12)
        apart = float(np.abs(ours.latents - theirs.latents).max()) / scale
        return apart <= tolerance, f"latents {apart:.1e} apart (relative)"

    return measure


def caller(pipe: Any) -> Callable[[str, dict[str, Any]], Any]:
    """A pipeline as :func:`compare` calls it: the negative prompt, then the settings with the prompt."""

    def call(negative: str, settings: dict[str, Any]) -> Any:
        return pipe(settings.pop("prompt"), negative, **settings)

    return call


def sweep(
    run: Callable[[str, dict[str, Any]], Any],
    reference: Callable[[str, dict[str, Any]], Any],
    measure: Callable[[Any, Any], tuple[bool, str]],
    *,
    combos: int,
    seed: int,
    features: Mapping[str, bool],
    engine_only: bool,
    report: Callable[[str], object] = print,
) -> list[Outcome]:
    """``combos`` random combinations (from ``seed``) through :func:`compare`, each reported in a line."""
    rng = random.Random(seed)
    outcomes = []
    for index in range(combos):
        outcome = compare(run, reference, random_settings(rng, features, engine_only), measure)
        report(f"[{index}] {outcome.verdict}: {outcome.detail} | {shown(outcome.settings)}")
        outcomes.append(outcome)
    return outcomes


def tiny_models(workdir: Path) -> tuple[Path, Path]:
    """The tiny random checkpoint and its export with PAG (mid), FreeU and DeepCache (branch 0), written
    once into ``workdir``."""
    from export.checkpoint import write_random_checkpoint
    from export.onnx_export import export_checkpoint
    from sdengine.manifest import MANIFEST_NAME

    checkpoint, onnx_dir = workdir / "checkpoint", workdir / "onnx"
    if not (checkpoint / "model_index.json").is_file():
        write_random_checkpoint(checkpoint, "tiny", seed=0, overwrite=True)
    if not (onnx_dir / MANIFEST_NAME).is_file():
        export_checkpoint(checkpoint, onnx_dir, pag_layers=["mid"], freeu=True, deepcache=0)
    return checkpoint, onnx_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--against", choices=("torch", "bound"), default="torch")
    p.add_argument("--combos", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-db", type=float, default=80.0, help="torch: the least PSNR that passes")
    p.add_argument("--workdir", type=Path, default=Path("parity-sweep"))
    args = p.parse_args(argv)
    from sdengine.pipeline import Pipeline

    checkpoint, onnx_dir = tiny_models(args.workdir)
    engine = Pipeline.load(onnx_dir, backend="ort", device="cpu")
    if args.against == "torch":
        reference = Pipeline.load(checkpoint, backend="torch", pag_layers=["mid"], deepcache=0)
        measure = images_agree(args.min_db)
    else:
        from sdengine.backends.ort_cuda import OrtCudaBackend

        backend = OrtCudaBackend(engine.model_dir, device="cpu")
        reference = Pipeline(engine.model_dir, backend, engine.tokenizer)
        measure = latents_agree()
    features = {"pag": True, "freeu": True, "deepcache": True}
    outcomes = sweep(
        caller(engine),
        caller(reference),
        measure,
        combos=args.combos,
        seed=args.seed,
        features=features,
        engine_only=args.against == "bound",
    )
    counts = {v: sum(o.verdict == v for o in outcomes) for v in dict.fromkeys(o.verdict for o in outcomes)}
    print("; ".join(f"{count} {verdict}" for verdict, count in counts.items()))
    return 1 if any(o.failed for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
