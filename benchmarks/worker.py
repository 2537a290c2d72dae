"""Measures one backend in a process of its own, so its memory peak and threads are its alone.

Run by :mod:`benchmarks.bench`; prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import numpy as np

from benchmarks.machine import nvidia_smi
from sdengine.backends.cuda_options import parse_cuda_options
from sdengine.freeu import parse_freeu
from sdengine.pipeline import Pipeline


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def device_memory_mb() -> float | None:
    """GPU memory (MiB) this process holds, from nvidia-smi (any backend: torch, ONNX Runtime, TensorRT)."""
    rows = nvidia_smi("--query-compute-apps=pid,used_memory") or []
    used = [float(m) for pid, m in (row.split(",") for row in rows) if int(pid) == os.getpid()]
    return used[0] if used else None


def control_images(count: int, height: int, width: int, seed: int) -> dict:
    """For a model with ControlNets, one random edge-like control image each (white on a tenth of the
    pixels): what they run on changes nothing of their cost."""
    if not count:
        return {}
    rng = np.random.default_rng(seed)
    images = [
        (rng.random((height, width, 1)) > 0.9).repeat(3, axis=-1).astype(np.float32) for _ in range(count)
    ]
    return {"control_image": images[0] if count == 1 else images}


def image_prompt(ip_adapter: bool, seed: int) -> dict:
    """For a model with an IP-Adapter, a random image prompt (its cost is the same for any image)."""
    if not ip_adapter:
        return {}
    return {"ip_adapter_image": np.random.default_rng(seed).random((224, 224, 3)).astype(np.float32)}


def measure(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    start = time.perf_counter()
    pipe = Pipeline.load(
        args.model,
        backend=args.backend,
        device=args.device,
        threads=args.threads,
        optimized_cache=args.optimized_cache,
        graphs=args.graphs,
        controlnets=args.controlnet,
        refiner=args.refiner,
        **({"ip_adapter": args.ip_adapter} if args.ip_adapter else {}),
        **({"pag_layers": args.pag_layers.split(",")} if args.pag_layers else {}),
        **({"seamless": True} if args.seamless else {}),
        **({"deepcache": args.deepcache} if args.deepcache is not None else {}),
        cuda_options=parse_cuda_options(args.cuda_option),
    )
    load_s = time.perf_counter() - start
    rss_loaded = peak_rss_mb()
    request = pipe.request(
        args.prompt,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        height=args.height,
        width=args.width,
        batch=args.batch,
        scheduler=args.scheduler,
        **control_images(pipe.controlnets, args.height, args.width, args.seed),
        **image_prompt(pipe.ip_adapter, args.seed),
        **({"pag_scale": args.pag_scale} if args.pag_scale else {}),
        **({"deepcache_interval": args.deepcache_interval} if args.deepcache_interval != 1 else {}),
        **({"freeu": parse_freeu(args.freeu)} if args.freeu else {}),
    )
    results = []
    for _ in tqdm(range(args.warmup + args.runs), desc=f"{args.backend}", unit="run", file=sys.stderr):
        results.append(pipe.generate(request))
    np.save(args.image_out, results[-1].array)
    return {
        "backend": args.backend,
        "graphs": args.graphs,
        "choice": vars(pipe.choice) if pipe.choice else None,
        "load_s": load_s,
        "rss_after_load_mb": rss_loaded,
        "peak_rss_mb": peak_rss_mb(),
        "device_memory_mb": device_memory_mb(),
        "warmup": [r.times.calls for r in results[: args.warmup]],
        "runs": [r.times.calls for r in results[args.warmup :]],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--backend", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", default="a photo of an astronaut riding a horse on mars")
    for name in ("steps", "seed", "height", "width", "batch", "runs", "warmup"):
        p.add_argument(f"--{name}", type=int, required=True)
    p.add_argument("--guidance", type=float, required=True)
    p.add_argument("--scheduler", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--optimized-cache", action="store_true")
    p.add_argument("--graphs", default="step")
    p.add_argument("--cuda-option", action="append", default=[])
    p.add_argument("--controlnet", action="append", default=[])
    p.add_argument("--refiner", default=None)
    p.add_argument("--ip-adapter", default=None)
    p.add_argument("--pag-scale", type=float, default=0.0)
    p.add_argument("--pag-layers", default=None)
    p.add_argument("--seamless", action="store_true")
    p.add_argument("--deepcache", type=int, default=None)
    p.add_argument("--deepcache-interval", type=int, default=1)
    p.add_argument("--freeu", default=None)
    p.add_argument("--image-out", required=True)
    print(json.dumps(measure(p.parse_args(argv))))


if __name__ == "__main__":
    main()
