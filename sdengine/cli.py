"""``sdengine`` command line: generate, export, make-checkpoint, build, bench, info, demo.

Errors a user can cause end as one line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from sdengine.backends.cuda_options import parse_cuda_options
from sdengine.backends.select import BACKEND_CHOICES, DEVICE_CHOICES
from sdengine.controlnet import CONTROL_MODES
from sdengine.errors import InvalidArgumentError, SDEngineError
from sdengine.latent_preview import PREVIEW_METHODS, check_preview_method
from sdengine.manifest import TARGETS
from sdengine.request import (
    DECODERS,
    DEFAULT_GUIDANCE,
    DEFAULT_INPAINT_STRENGTH,
    DEFAULT_STEPS,
    DEFAULT_STRENGTH,
    MASKED_CONTENTS,
    NOISE_SOURCES,
)

#: SDXL's size conditioning, as ``generate`` takes it.
SIZE_SETTINGS = {
    "original_size": "SDXL: the original size it is conditioned on, HEIGHT,WIDTH (default: the image's)",
    "crop_top_left": "SDXL: the crop corner it is conditioned on, TOP,LEFT (default 0,0)",
    "target_size": "SDXL: the target size it is conditioned on, HEIGHT,WIDTH (default: the image's)",
    "negative_original_size": "SDXL: --original-size for the negative side of guidance",
    "negative_crop_top_left": "SDXL: --crop-top-left for the negative side of guidance",
    "negative_target_size": "SDXL: --target-size for the negative side of guidance",
}


def pair(text: str) -> tuple[int, int]:
    """``A,B`` -> (A, B), two whole numbers."""
    parts = text.split(",")
    try:
        if len(parts) == 2:
            return int(parts[0]), int(parts[1])
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected two whole numbers A,B, got {text!r}")


EXIT_ERROR = 1


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser, whose errors (an unknown option, a value of the wrong type) are one line on stderr,
    naming ``--help``, not the whole usage; exit status 2, as argparse's."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


CONFIG_HELP = (
    "for a single-file checkpoint: a diffusers-format directory of the same architecture whose configs and "
    "tokenizer it takes (its weights are not read); without it they come from the Hugging Face Hub"
)
VAE_HELP = (
    "another VAE in place of the checkpoint's: a diffusers AutoencoderKL folder, a tiny VAE's "
    "(AutoencoderTiny: TAESD, TAESDXL), a checkpoint directory (its vae/), or a single .safetensors file in "
    "the original layout"
)
OPTIMIZED_CACHE_HELP = "CPU: keep ONNX Runtime's optimised graphs per machine (fast starts, more disk)"
GRAPH_CHOICES = ("step", "ort", "none")
GRAPHS_HELP = (
    "GPU: step = each whole denoising step one CUDA graph (default); ort = ONNX Runtime's own graph mode; "
    "none = no graphs"
)

CUDA_OPTION_HELP = (
    "ONNX Runtime on CUDA: a CUDA provider option for every session, such as prefer_nhwc=1 or "
    "cudnn_conv_algo_search=HEURISTIC (ONNX Runtime's documentation lists them); repeatable"
)


def _add_cuda_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cuda-option", action="append", default=[], metavar="KEY=VALUE", help=CUDA_OPTION_HELP
    )


def _progress(desc: str):
    from tqdm import tqdm

    return lambda it: tqdm(it, desc=desc, unit="step", leave=False, file=sys.stderr)


def _load_latents(path: str | None) -> np.ndarray | None:
    if path is None:
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(f"cannot read latents from {path}: {exc}") from None


def format_times(rows: dict[str, dict[str, dict[str, float]]]) -> str:
    """A per-stage table: one column per backend, total milliseconds per stage (calls in brackets)."""
    stages: list[str] = []
    for summary in rows.values():
        stages += [s for s in summary if s not in stages]
    header = f"{'stage':<14}" + "".join(f"{name:>22}" for name in rows)
    lines = [header, "-" * len(header)]
    for stage in stages:
        cells = []
        for summary in rows.values():
            s = summary.get(stage)
            cells.append(f"{s['total_ms']:>12.1f} ms ({int(s['calls']):>3})" if s else f"{'-':>22}")
        lines.append(f"{stage:<14}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def cmd_generate(args: argparse.Namespace) -> int:
    from sdengine.apg import parse_apg
    from sdengine.extra_networks import lora_hashes, lora_tags, resolve_loras
    from sdengine.freeu import parse_freeu
    from sdengine.images import load_image, load_mask, output_paths, save_png
    from sdengine.lora import parse_lora_arg, read_lora
    from sdengine.pipeline import Pipeline
    from sdengine.replay import check_outputs, comparison
    from sdengine.schedulers.custom import parse_custom
    from sdengine.textual_inversion import read_embedding

    replayed = getattr(args, "replay", None)
    if replayed is not None:
        replayed.fill(args)
        check_outputs(replayed, output_paths(args.output, args.batch))
    if args.model_dir is None or args.prompt is None:
        raise InvalidArgumentError(
            "generate needs MODEL_DIR and PROMPT (or --from IMAGE, whose record has them)"
        )
    freeu = None if args.freeu is None else parse_freeu(args.freeu)  # as the files: before the models load
    apg = None if args.apg is None else parse_apg(args.apg)
    timesteps, sigmas, hires_timesteps, hires_sigmas = (
        None if text is None else parse_custom(text)
        for text in (args.timesteps, args.sigmas, args.hires_timesteps, args.hires_sigmas)
    )
    if args.steps is not None and (timesteps is not None or sigmas is not None):
        option = "--timesteps" if timesteps is not None else "--sigmas"
        raise InvalidArgumentError(f"--steps and {option}: {option} sets the steps, give one or the other")
    # every input file is read before the models load, so a bad one costs no load time
    latents = _load_latents(args.latents)
    image = None if args.image is None else load_image(args.image)
    mask = None if args.mask is None else load_mask(args.mask)
    controls = [load_image(path) for path in args.control_image]
    image_prompt = None if args.ip_adapter_image is None else load_image(args.ip_adapter_image)
    embeddings = []
    for spec in args.embedding:
        path, token = (spec, None) if Path(spec).exists() or ":" not in spec else spec.rsplit(":", 1)
        read_embedding(path, token)
        embeddings.append((path, token))
    loras = [parse_lora_arg(spec) for spec in args.lora]
    prompt, tagged = args.prompt, {}
    if args.lora_dir is not None:  # the web UI's tags: their LoRAs after --lora's
        prompt, tags = lora_tags(prompt)
        tag_loras = resolve_loras(tags, args.lora_dir)
        loras += tag_loras
        if tags:  # the pictures record the prompt as given, as the web UI's do
            tagged = {"prompt": args.prompt, "lora_hashes": lora_hashes(tags, tag_loras)}
    for path, _ in loras:
        read_lora(path)
    if args.refiner_switch is not None and args.refiner is None:
        raise InvalidArgumentError("--refiner-switch needs a refiner: give --refiner DIR")
    pipeline = Pipeline.load(
        args.model_dir,
        backend=args.backend,
        device=args.device,
        threads=args.threads,
        optimized_cache=args.optimized_cache,
        graphs=args.graphs,
        vae_tiling=args.vae_tiling,
        controlnets=args.controlnet,
        safety_checker=args.safety_checker,
        refiner=args.refiner,
        ip_adapter=args.ip_adapter,
        vae=args.vae,
        cuda_options=parse_cuda_options(args.cuda_option),
        pag_layers=args.pag_layers.split(",") if args.pag_layers else None,
        seamless=args.seamless,
        deepcache=args.deepcache,
    )
    print(f"backend: {pipeline.choice.backend} on {pipeline.choice.device} ({pipeline.choice.reason})")
    if len(controls) != pipeline.controlnets:
        raise InvalidArgumentError(
            f"{args.model_dir} has {pipeline.controlnets} ControlNet(s): give --control-image that many "
            f"times, not {len(controls)}"
        )
    embeddings = [(path, pipeline.load_textual_inversion(path, token)) for path, token in embeddings]
    if pipeline.refiner is not None:  # it reads the prompts too (its LoRAs would be its own: none here)
        for path, token in embeddings:
            pipeline.refiner.load_textual_inversion(path, token)
    for path, token in embeddings:
        print(f"embedding: {token} from {path}")
    for path, scale in loras:
        print(f"lora: {pipeline.load_lora(path, scale)} layers from {path} at scale {scale:g}")
    result = pipeline(
        prompt,
        args.negative_prompt,
        steps=DEFAULT_STEPS if args.steps is None else args.steps,
        timesteps=timesteps,
        sigmas=sigmas,
        hires_timesteps=hires_timesteps,
        hires_sigmas=hires_sigmas,
        guidance=args.guidance,
        scheduler=args.scheduler,
        seed=args.seed,
        height=args.height,
        width=args.width,
        batch=args.batch,
        latents=latents,
        image=image,
        strength=args.strength,
        mask=mask,
        mask_crop=args.mask_crop,
        masked_content=args.masked_content,
        decoder=args.decoder,
        clip_skip=args.clip_skip,
        guidance_rescale=args.guidance_rescale,
        long_prompts=args.long_prompts,
        prompt_weights=args.prompt_weights,
        control_image=(controls[0] if len(controls) == 1 else controls) if controls else None,
        control_scale=args.control_scale or 1.0,
        control_start=args.control_start or 0.0,
        control_end=args.control_end or 1.0,
        control_mode=args.control_mode or "balanced",
        variation_seed=args.variation_seed,
        variation_strength=args.variation_strength,
        hires_scale=args.hires_scale,
        hires_strength=args.hires_strength,
        hires_steps=args.hires_steps,
        hires_upscale=args.hires_upscale,
        refiner_switch=args.refiner_switch,
        ip_adapter_image=image_prompt,
        ip_adapter_scale=args.ip_adapter_scale,
        noise_source=args.noise_source,
        pag_scale=args.pag_scale,
        pag_adaptive_scale=args.pag_adaptive_scale,
        deepcache_interval=args.deepcache_interval,
        freeu=freeu,
        apg=apg,
        **{name: getattr(args, name) for name in SIZE_SETTINGS if getattr(args, name) is not None},
        progress=_progress("denoising"),
        **_previews(pipeline, args),
    )
    where = {"backend": result.backend, "model": str(Path(args.model_dir)), **tagged}
    if args.refiner is not None:
        where["refiner"] = str(Path(args.refiner))
    if loras:
        where["loras"] = [{"file": Path(path).name, "scale": scale} for path, scale in loras]
    if controls:
        where["control_images"] = [Path(path).name for path in args.control_image]
    if image_prompt is not None:
        where["ip_adapter_image"] = Path(args.ip_adapter_image).name
    if embeddings:
        where["embeddings"] = [{"file": Path(path).name, "token": token} for path, token in embeddings]
    paths = output_paths(args.output, len(result.images))
    for i, (image, path) in enumerate(zip(result.images, paths, strict=True)):
        seed = result.request.seeds[i]
        flagged = bool(result.nsfw and result.nsfw[i])
        checked = {} if result.nsfw is None else {"safety_checker": "flagged" if flagged else "passed"}
        record = {**result.request.parameters(i), **where, **checked}
        written = save_png(image, path, record)
        print(f"wrote {written} (seed {seed})")
        if replayed is not None and i == 0:
            print(comparison(replayed, record, result.array[0]))
        if flagged:
            print(
                f"sdengine: warning: the safety checker flagged {path}; it was written black "
                "(--no-safety-checker turns the checker off)",
                file=sys.stderr,
            )
    print(f"{result.times.total_ms('total'):.0f} ms in all")
    return 0


def _previews(pipeline: Any, args: argparse.Namespace) -> dict[str, Any]:
    """``--preview-every N``: after every N UNet calls, the images so far beside the output, drawn by
    ``--preview-method`` (:mod:`sdengine.latent_preview`): ``out-step4.png`` (``out-step4-0.png``, ... for a
    batch)."""
    if not args.preview_every:
        return {}
    check_preview_method(args.preview_method, pipeline.tiny_previews)  # before the run, not at its first look
    from sdengine.images import output_paths

    output = Path(args.output)

    def write(calls: int, latents: np.ndarray) -> None:
        images = pipeline.preview_images(latents, args.preview_method)
        base = output.with_name(f"{output.stem}-step{calls}{output.suffix or '.png'}")
        for image, path in zip(images, output_paths(base, len(images)), strict=True):
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)

    return {"preview": write, "preview_every": args.preview_every}


def cmd_export(args: argparse.Namespace) -> int:
    try:
        from export.onnx_export import export_checkpoint
    except ImportError as exc:
        raise SDEngineError(
            f"export needs the export extra ({exc.name} is missing): pip install 'sdengine[export]'"
        ) from None
    from tqdm import tqdm

    from sdengine.lora import parse_lora_arg
    from sdengine.manifest import MANIFEST_NAME

    if (Path(args.output) / MANIFEST_NAME).is_file():
        print(f"sdengine: {args.output} holds an export: replacing it", file=sys.stderr)
    manifest = export_checkpoint(
        args.checkpoint,
        args.output,
        precision=args.precision,
        opset=args.opset,
        components=args.components.split(",") if args.components else None,
        progress=lambda names: tqdm(names, desc="exporting", unit="model", file=sys.stderr),
        verify=args.verify,
        loras=[parse_lora_arg(spec) for spec in args.lora],
        controlnets=args.controlnet,
        ip_adapter=args.ip_adapter,
        config=args.config,
        vae=args.vae,
        target=args.target,
        pag_layers=args.pag_layers.split(",") if args.pag_layers else (),
        seamless=args.seamless,
        preview_vae=args.preview_vae,
        deepcache=args.deepcache,
        freeu=args.freeu,
    )
    for name, record in manifest.components.items():
        check = record.verification
        checked = f"{check['rel_error']:.1e} vs PyTorch" if check else "not checked"
        print(
            f"{name:<13} {record.size_bytes / 1e6:10.1f} MB {record.export_seconds:8.1f} s  {checked:<20} "
            f"{record.path}"
        )
    fused = "; UNet fused for ONNX Runtime's CUDA provider" if manifest.target == "cuda" else ""
    print(f"wrote {args.output} ({manifest.precision}, opset {manifest.opset}{fused})")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    try:
        from export.single_file import convert_single_file
    except ImportError as exc:
        raise SDEngineError(
            f"convert needs the export extra ({exc.name} is missing): pip install 'sdengine[export]'"
        ) from None

    path = convert_single_file(args.checkpoint, args.output, config=args.config)
    print(f"wrote diffusers-format checkpoint {path}")
    return 0


def cmd_make_checkpoint(args: argparse.Namespace) -> int:
    from export.checkpoint import write_random_checkpoint

    path = write_random_checkpoint(
        args.output,
        args.preset,
        seed=args.seed,
        prediction_type=args.prediction_type,
        overwrite=args.overwrite,
        inpainting=args.inpainting,
        safety_checker=args.safety_checker,
        guidance_embedding=args.guidance_embedding,
    )
    kind = " inpainting" if args.inpainting else ""
    kind += " latent consistency (guidance-embedded)" if args.guidance_embedding else ""
    print(f"wrote random-weight {args.preset}{kind} checkpoint to {path}")
    return 0


def cmd_make_controlnet(args: argparse.Namespace) -> int:
    from export.controlnet import write_random_controlnet
    from sdengine.model_dir import open_checkpoint_dir

    path = write_random_controlnet(open_checkpoint_dir(args.checkpoint).root, args.output, seed=args.seed)
    print(f"wrote random-weight ControlNet for {args.checkpoint} to {path}")
    return 0


def cmd_make_ip_adapter(args: argparse.Namespace) -> int:
    from export.ip_adapter import write_random_ip_adapter
    from sdengine.model_dir import open_checkpoint_dir

    checkpoint = open_checkpoint_dir(args.checkpoint).root
    path = write_random_ip_adapter(checkpoint, args.output, seed=args.seed, kind=args.kind)
    print(f"wrote random-weight IP-Adapter for {args.checkpoint} to {path}")
    return 0


def cmd_make_tiny_vae(args: argparse.Namespace) -> int:
    from export.tiny_vae import write_random_tiny_vae

    path = write_random_tiny_vae(args.output, latent_channels=args.latent_channels, seed=args.seed)
    print(f"wrote random-weight tiny VAE (TAESD's architecture) to {path}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from sdengine.info import describe, format_info

    info = describe(args.model_dir)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from sdengine.pipeline import Pipeline
    from sdengine.server import make_server

    if args.lora_dir is not None and not Path(args.lora_dir).is_dir():  # before the models load
        raise InvalidArgumentError(f"LoRA directory {args.lora_dir} does not exist")
    pipeline = Pipeline.load(
        args.model_dir,
        backend=args.backend,
        device=args.device,
        threads=args.threads,
        graphs=args.graphs,
        safety_checker=args.safety_checker,
        refiner=args.refiner,
        cuda_options=parse_cuda_options(args.cuda_option),
    )
    print(f"backend: {pipeline.choice.backend} on {pipeline.choice.device} ({pipeline.choice.reason})")
    try:
        server = make_server(pipeline, args.host, args.port, args.lora_dir)
    except OSError as exc:
        raise InvalidArgumentError(
            f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}"
        ) from None
    host, port = server.server_address[:2]
    print(
        f"serving the AUTOMATIC1111 web UI's API (/sdapi/v1/txt2img, img2img) on http://{host}:{port}",
        flush=True,
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from sdengine.demo import run_demo

    run_demo(Path(args.workdir), output=Path(args.output), steps=args.steps, scheduler=args.scheduler)
    return 0


def refiner_dirs(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """``bench --refiner``: the refiner's export and its source checkpoint (``--refiner-checkpoint``, or the
    one its manifest names), which the torch baseline runs."""
    from sdengine.manifest import Manifest
    from sdengine.model_dir import open_onnx_dir

    refiner = open_onnx_dir(args.refiner).root
    manifest = Manifest.read(refiner)
    source = args.refiner_checkpoint or (manifest.source_checkpoint if manifest else None)
    return refiner, None if source is None else Path(source)


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        from benchmarks.bench import BenchConfig, format_report, plot_report, run_benchmark
        from benchmarks.flops import stage_flops
        from benchmarks.presets import PRESETS, get_preset, prepare, prepare_checkpoint
    except ImportError as exc:
        raise SDEngineError(
            f"bench needs the export extra ({exc.name} is missing): pip install 'sdengine[export]'"
        ) from None
    from sdengine.backends.select import detect
    from sdengine.deepcache import DEEPCACHE_CONFIG, check_interval, exported_branch
    from sdengine.errors import BackendUnavailableError
    from sdengine.freeu import FREEU_CONFIG, exported_freeu, parse_freeu
    from sdengine.ip_adapter import IP_ADAPTER_CONFIG
    from sdengine.manifest import Manifest
    from sdengine.model_dir import open_onnx_dir, optional_json
    from sdengine.pag import PAG_CONFIG, exported_pag

    cuda_options = parse_cuda_options(args.cuda_option)  # before any preparation: a bad one fails at once
    if cuda_options and args.device == "cpu":
        raise InvalidArgumentError("--cuda-option is for ONNX Runtime on cuda, not --device cpu")
    prep: dict[str, float] = {}
    device = args.device
    controlnets: tuple[str, ...] = ()
    ip_adapter = None
    pag_layers: tuple[str, ...] = ()
    seamless = False
    refiner, refiner_checkpoint = (None, None) if args.refiner is None else refiner_dirs(args)
    if args.model in PRESETS and args.pag_scale:  # before any preparation
        raise InvalidArgumentError(
            "--pag-scale needs an export with perturbed-attention guidance (sdengine export --pag-layers); "
            "the presets have none"
        )
    freeu = None if args.freeu is None else parse_freeu(args.freeu)
    if args.model in PRESETS and freeu is not None:
        raise InvalidArgumentError(
            "--freeu needs an export whose UNet takes its scales (sdengine export --freeu); the presets have "
            "none"
        )
    if args.model in PRESETS and args.deepcache_interval != 1:
        raise InvalidArgumentError(
            "--deepcache-interval needs an export cut for DeepCache (sdengine export --deepcache 0); the "
            "presets have none"
        )
    deepcache = None
    if args.model in PRESETS:
        preset = get_preset(args.model)
        device = device or preset.device
        if device == "cuda" and not detect(torch_cuda=False).ort_cuda:
            raise BackendUnavailableError(
                f"preset {preset.name} runs on a CUDA GPU and ONNX Runtime has none here; "
                "use --device cpu to run it on the CPU anyway (hours), or the sd15-cpu preset"
            )
        checkpoint, onnx_dir, prep = prepare(preset)
        if preset.refiner is not None and args.refiner is None:
            refiner_checkpoint, refiner, made = prepare_checkpoint(
                preset.refiner, preset.precision, label="refiner_"
            )
            prep.update(made)
        size = dict(height=preset.height, width=preset.width, batch=preset.batch, steps=preset.steps)
        size.update(guidance=preset.guidance, runs=preset.runs, warmup=preset.warmup)
    else:
        onnx_dir = open_onnx_dir(args.model).root
        manifest = Manifest.read(onnx_dir)
        checkpoint = (
            Path(args.checkpoint or manifest.source_checkpoint) if (args.checkpoint or manifest) else None
        )
        native = open_onnx_dir(onnx_dir).default_image_size
        controlnets = tuple(str(c["dir"]) for c in manifest.controlnets) if manifest else ()
        ip_adapter = optional_json(onnx_dir / IP_ADAPTER_CONFIG).get("file")
        pag_layers = exported_pag(optional_json(onnx_dir / PAG_CONFIG))
        deepcache = exported_branch(optional_json(onnx_dir / DEEPCACHE_CONFIG))
        seamless = bool(manifest and manifest.seamless)
        size = dict(height=native, width=native, batch=1, steps=4, guidance=7.5, runs=3, warmup=1)
    overrides = {k: getattr(args, k) for k in size if getattr(args, k) is not None}
    config = BenchConfig(
        onnx_dir=onnx_dir,
        checkpoint=checkpoint,
        controlnets=controlnets,
        backends=tuple(b for b in args.backends.split(",") if b),
        scheduler=args.scheduler,
        threads=args.threads,
        device=device,
        optimized_cache=args.optimized_cache,
        graphs=args.graphs,
        cuda_options=tuple(f"{k}={v}" for k, v in cuda_options.items()),
        refiner=refiner,
        refiner_checkpoint=refiner_checkpoint,
        ip_adapter=ip_adapter,
        pag_scale=args.pag_scale,
        pag_layers=pag_layers,
        seamless=seamless,
        deepcache_interval=check_interval(args.deepcache_interval),
        deepcache=deepcache,
        freeu=freeu,
        **{**size, **overrides},
    )
    if args.deepcache_interval != 1 and deepcache is None:
        raise InvalidArgumentError(
            "--deepcache-interval needs an export cut for DeepCache (sdengine export --deepcache 0)"
        )
    if freeu is not None and not exported_freeu(optional_json(onnx_dir / FREEU_CONFIG)):
        raise InvalidArgumentError(
            "--freeu needs an export whose UNet takes its scales (sdengine export --freeu)"
        )
    if args.pag_scale and not pag_layers:
        raise InvalidArgumentError(
            "--pag-scale needs an export with perturbed-attention guidance (sdengine export --pag-layers)"
        )
    flops = {}
    # FLOPs are counted for the checkpoint's own modules at two copies of the batch: not with a refiner's or
    # an IP-Adapter's beside them, nor for PAG's perturbed copy
    whole_unet = not args.pag_scale and args.deepcache_interval == 1  # DeepCache's shallow calls: fewer
    if checkpoint is not None and refiner is None and ip_adapter is None and whole_unet:
        flops = stage_flops(
            checkpoint,
            onnx_dir,
            batch=config.batch,
            height=config.height,
            width=config.width,
            cfg=config.guidance > 1 and not open_onnx_dir(onnx_dir).arch.guidance_embedding,
            controlnets=controlnets,
        )
    report = run_benchmark(config, flops)
    report["preparation_s"] = prep
    print(format_report(report))
    if prep:
        print("made for this run: " + ", ".join(f"{k} {v:.1f}" for k, v in prep.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {plot_report(report, Path(args.plot))}")
    return 0


def build_parser(generate_defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """The command line's parser; ``generate_defaults``: the generate command's defaults in place of its own
    (``generate --from``'s recorded settings, :mod:`sdengine.replay`)."""
    from sdengine import __version__

    parser = OneLineParser(prog="sdengine", description="A lean Stable Diffusion inference engine.")
    parser.add_argument("--version", action="version", version=f"sdengine {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser(
        "generate", help="text to image (image to image with --image, inpainting with --image and --mask)"
    )
    # with --from, both may be left out: the record has them (argparse reads optional positionals only
    # where they stand together, so they are required otherwise, to stand anywhere among the options)
    replaying = {"nargs": "?", "default": None} if generate_defaults is not None else {}
    g.add_argument(
        "model_dir",
        help="ONNX export (ort), engine directory (trt) or diffusers checkpoint (torch); with --from: the "
        "record's model if not given",
        **replaying,
    )
    g.add_argument("prompt", help="with --from: the record's prompt if not given", **replaying)
    g.add_argument(
        "--from",
        dest="replay_from",
        default=None,
        metavar="IMAGE",
        help="make a PNG of sdengine's again: its recorded settings are the defaults (any option given "
        "changes that one), its input files are given again; prints the new image's PSNR against it",
    )
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--steps", type=int, default=None, help=f"default: {DEFAULT_STEPS}")
    g.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    g.add_argument("--scheduler", default=None, help="default: the model's own scheduler")
    custom = g.add_mutually_exclusive_group()
    custom.add_argument(
        "--timesteps",
        default=None,
        metavar="T1,T2,...|ays",
        help="the run's own timesteps, the noisiest first, one per step (diffusers' timesteps=), for the "
        "euler, heun, dpmpp_2m and dpmpp_2m_sde schedulers; ays: Align Your Steps' 10 for the model",
    )
    custom.add_argument(
        "--sigmas",
        default=None,
        metavar="S1,S2,...|ays",
        help="the run's own sigmas, the noisiest first, ending where the run ends (0, or for euler any "
        "sigma; diffusers' sigmas=), for the euler, euler_a, heun, dpm2, lms, dpmpp_2m, dpmpp_2m_sde and "
        "unipc schedulers; ays: Align Your Steps' 10 steps for the model",
    )
    g.add_argument("--seed", type=int, default=None, help="default: random, printed and stored in the PNG")
    g.add_argument("--height", type=int, default=None, help="default: the model's native size (or --image's)")
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--batch", type=int, default=1)
    g.add_argument(
        "--noise-source",
        choices=NOISE_SOURCES,
        default=NOISE_SOURCES[0],
        help="torch-cpu: the seed's noise as PyTorch's CPU generator gives it (diffusers with "
        'torch.Generator("cpu"), the web UI with its "CPU" random source): the same seed, the same image; '
        "text and image to image, inpainting",
    )
    g.add_argument(
        "--variation-seed", type=int, default=None, help="variations: the seed whose noise to move towards"
    )
    g.add_argument(
        "--variation-strength",
        type=float,
        default=0.0,
        help="how far (0 to 1, along the sphere) the seed's noise moves towards --variation-seed's",
    )
    g.add_argument(
        "--hires-scale",
        type=float,
        default=None,
        help="hires fix: after text to image, image to image again at this many times the size",
    )
    g.add_argument(
        "--hires-strength", type=float, default=None, help="the hires pass's strength (default 0.7)"
    )
    g.add_argument("--hires-steps", type=int, default=None, help="the hires pass's steps (default: --steps)")
    g.add_argument(
        "--hires-upscale",
        choices=("latent", "image"),
        default=None,
        help="enlarge the first pass's latents (default) or its decoded images",
    )
    hires_custom = g.add_mutually_exclusive_group()
    hires_custom.add_argument(
        "--hires-timesteps",
        default=None,
        metavar="T1,T2,...|ays",
        help="the hires fix's second pass's own timesteps (as --timesteps), which set its steps",
    )
    hires_custom.add_argument(
        "--hires-sigmas",
        default=None,
        metavar="S1,S2,...|ays",
        help="the hires fix's second pass's own sigmas (as --sigmas), which set its steps",
    )
    g.add_argument(
        "--refiner",
        default=None,
        metavar="DIR",
        help="a model that finishes every run (SDXL's refiner for SDXL base), loaded as the model is",
    )
    g.add_argument(
        "--refiner-switch",
        type=float,
        default=None,
        metavar="F",
        help="share of the run after which the refiner takes over, in (0, 1) (default 0.8)",
    )
    for name, what in SIZE_SETTINGS.items():
        g.add_argument(f"--{name.replace('_', '-')}", type=pair, default=None, metavar="A,B", help=what)
    g.add_argument("--backend", choices=BACKEND_CHOICES, default="auto", help="default: auto (by directory)")
    g.add_argument("--device", choices=DEVICE_CHOICES, default=None, help="default: cuda where available")
    g.add_argument(
        "--embedding",
        action="append",
        default=[],
        metavar="FILE[:TOKEN]",
        help="textual inversion embedding (.safetensors) to use as TOKEN in prompts (default: its own name)",
    )
    g.add_argument(
        "--long-prompts",
        action="store_true",
        help="read prompts past 77 tokens whole, in windows of 75 tokens (instead of cutting them off)",
    )
    g.add_argument(
        "--prompt-weights",
        nargs="?",
        const="compel",
        default="",
        choices=("compel", "a1111"),
        help="read prompts in a weighting syntax: compel's (the default: (red cat)1.3, dog+, (blue)-) or "
        "the AUTOMATIC1111 web UI's (a1111: (red cat:1.3), (dog), [blue], BREAK, and prompt editing: "
        "[cat:dog:0.5] switches half way, [cat|dog] alternates every step)",
    )
    g.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="LoRA (.safetensors; diffusers', PEFT's or kohya's layout) fused into the UNet and text encoder "
        "at SCALE (default 1); repeatable. ONNX Runtime and torch backends",
    )
    g.add_argument(
        "--lora-dir",
        default=None,
        metavar="DIR",
        help="where the prompt's <lora:NAME:WEIGHT> tags (the web UI's) find NAME.safetensors; the tags "
        "leave the prompt's text",
    )
    g.add_argument(
        "--guidance-rescale",
        type=float,
        default=0.0,
        help="rescale guided predictions towards the conditional one's std, in [0, 1] (zero-SNR models)",
    )
    g.add_argument(
        "--clip-skip",
        type=int,
        default=0,
        help="text embeddings from this many layers before the text encoder's last (1 = 'clip skip 2')",
    )
    g.add_argument("--latents", default=None, help=".npy of initial latents (batch, 4, height/8, width/8)")
    g.add_argument(
        "--image", default=None, help="image to image: the input image (resized to the output size)"
    )
    g.add_argument(
        "--strength",
        type=float,
        default=None,
        help=f"image to image: share of the schedule that runs, (0, 1] (default {DEFAULT_STRENGTH}; "
        f"{DEFAULT_INPAINT_STRENGTH} with --mask)",
    )
    g.add_argument(
        "--mask", default=None, help="inpainting (with --image): white repaints, black keeps the image"
    )
    g.add_argument(
        "--decoder",
        choices=DECODERS,
        default="vae",
        help="what decodes the images: vae, the model's (default); tiny, a tiny VAE's decoder (an export "
        "made with --preview-vae, or with --vae of a tiny VAE): many times faster, a little less faithful",
    )
    g.add_argument(
        "--masked-content",
        choices=MASKED_CONTENTS,
        default="original",
        help="inpainting: what the masked part starts from before it is noised: the image's (default), the "
        "seed's noise or zeros (the web UI's latent noise and latent nothing; not at strength 1)",
    )
    g.add_argument(
        "--mask-crop",
        type=int,
        default=None,
        metavar="PIXELS",
        help="inpainting: repaint only the mask's box grown by PIXELS, at --height x --width (default: the "
        "model's size), laid back into the image, which keeps its size (diffusers' padding_mask_crop)",
    )
    g.add_argument(
        "--control-image",
        action="append",
        default=[],
        metavar="FILE",
        help="ControlNet's conditioning image (resized to the output size, whose default it sets); once per "
        "ControlNet, in the order they were exported",
    )
    g.add_argument(
        "--control-scale",
        type=float,
        action="append",
        default=[],
        metavar="S",
        help="each ControlNet's weight (default 1); once for all, or once per ControlNet",
    )
    g.add_argument(
        "--control-start",
        type=float,
        action="append",
        default=[],
        metavar="F",
        help="share of the schedule before each ControlNet starts, in [0, 1) (default 0); once or per "
        "ControlNet",
    )
    g.add_argument(
        "--control-end",
        type=float,
        action="append",
        default=[],
        metavar="F",
        help="share of the schedule after which each ControlNet stops, in (0, 1] (default 1); once or per "
        "ControlNet",
    )
    g.add_argument(
        "--control-mode",
        action="append",
        default=[],
        choices=CONTROL_MODES,
        help="how each ControlNet's residuals are weighed: balanced (default), guess (diffusers' guess "
        "mode), prompt or control (the web UI's 'My prompt' / 'ControlNet is more important'); once or "
        "per ControlNet",
    )
    g.add_argument(
        "--controlnet",
        action="append",
        default=[],
        metavar="PATH",
        help="torch backend: a ControlNet directory (diffusers format) or single file (.safetensors/.pth, "
        "original layout); repeatable. An export holds its own",
    )
    g.add_argument(
        "--ip-adapter-image",
        default=None,
        metavar="FILE",
        help="an image prompt, for a model with an IP-Adapter (sdengine export --ip-adapter)",
    )
    g.add_argument(
        "--ip-adapter-scale",
        type=float,
        default=None,
        metavar="S",
        help="the image prompt's weight (default 1)",
    )
    g.add_argument(
        "--ip-adapter",
        default=None,
        metavar="FILE",
        help="torch backend: IP-Adapter weights (its image_encoder/ beside them). An export holds its own",
    )
    g.add_argument(
        "--pag-scale",
        type=float,
        default=0.0,
        metavar="S",
        help="perturbed-attention guidance's scale (default 0: none; diffusers' examples use 3), for a model "
        "exported with --pag-layers (the torch backend perturbs --pag-layers, default mid)",
    )
    g.add_argument(
        "--pag-adaptive-scale",
        type=float,
        default=0.0,
        metavar="A",
        help="lower the PAG scale as the timestep t falls: max(S - A (1000 - t), 0), as diffusers does "
        "(default 0: constant)",
    )
    g.add_argument(
        "--pag-layers",
        default=None,
        metavar="LAYERS",
        help="torch backend: where --pag-scale perturbs the self-attention, comma-separated (default mid). "
        "An export holds its own",
    )
    g.add_argument(
        "--deepcache-interval",
        type=int,
        default=1,
        metavar="N",
        help="DeepCache: the whole UNet on every N-th call, its shallow branch on the cached feature between "
        "(default 1: off; the authors use 3 to 5), for a model exported with --deepcache",
    )
    g.add_argument(
        "--deepcache",
        type=int,
        default=None,
        metavar="BRANCH",
        help="torch backend: the DeepCache branch --deepcache-interval runs at (the authors' helper; 0: the "
        "shallowest). An export holds its own",
    )
    g.add_argument(
        "--freeu",
        default=None,
        metavar="S1,S2,B1,B2",
        help="FreeU at these scales, in diffusers' enable_freeu order (0.9,0.2,1.5,1.6 is diffusers' example "
        "for SD 1.5), for a model exported with --freeu (the torch backend: any model)",
    )
    g.add_argument(
        "--apg",
        default=None,
        metavar="ETA,THRESHOLD,MOMENTUM",
        help="adaptive projected guidance in place of classifier-free guidance's plain combination, as "
        "diffusers' AdaptiveProjectedGuidance runs it (1,15,0: its defaults; 0,15,-0.5: nearer the paper's)",
    )
    g.add_argument(
        "--seamless",
        action="store_true",
        help="torch backend: images that tile (the UNet's and VAE's convolutions wrap around). An export is "
        "seamless or not (export --seamless)",
    )
    g.add_argument("--vae", default=None, metavar="DIR|FILE", help="torch backend: " + VAE_HELP)
    g.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    g.add_argument("--optimized-cache", action="store_true", help=OPTIMIZED_CACHE_HELP)
    g.add_argument("--graphs", choices=GRAPH_CHOICES, default="step", help=GRAPHS_HELP)
    _add_cuda_option(g)
    g.add_argument(
        "--vae-tiling",
        action="store_true",
        help="run the VAE in overlapping tiles of its training size (large images in little memory)",
    )
    g.add_argument(
        "--no-safety-checker",
        dest="safety_checker",
        action="store_false",
        help="do not run the model's safety checker (where it has one), which blacks out flagged images",
    )
    g.add_argument(
        "--preview-every",
        type=int,
        default=0,
        metavar="N",
        help="also write the images so far after every N UNet calls (OUTPUT-stepK.png); each waits for them",
    )
    g.add_argument(
        "--preview-method",
        choices=PREVIEW_METHODS,
        default="full",
        help="how --preview-every draws them: full, through the VAE decoder (default); approx, a fixed "
        "linear mix of the latents' channels at 1/8 of the size, free; tiny, through the preview decoder of "
        "an export made with --preview-vae",
    )
    g.add_argument("--output", default="image.png")
    g.set_defaults(func=cmd_generate, **(generate_defaults or {}))

    e = sub.add_parser("export", help="export a diffusers checkpoint (or a single-file one) to ONNX")
    e.add_argument(
        "checkpoint", help="a diffusers-format directory, or a single .safetensors/.ckpt checkpoint"
    )
    e.add_argument("--output", required=True)
    e.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    e.add_argument(
        "--target",
        choices=TARGETS,
        default="portable",
        help="portable (default: any ONNX Runtime provider, TensorRT builds from it) or cuda: the UNet fused "
        "for ONNX Runtime's CUDA provider (fused attention, NHWC GroupNorm and convolutions), which alone "
        "runs it; needs --precision fp16",
    )
    e.add_argument("--opset", type=int, default=17)
    e.add_argument(
        "--components",
        default=None,
        help="comma-separated subset (default: all four, and the checkpoint's safety checker if it has one)",
    )
    e.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip checking each model's outputs against its PyTorch module's",
    )
    e.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="LoRA (.safetensors) fused into the UNet and text encoder before export, at SCALE (default 1); "
        "repeatable. For TensorRT engines, which hold their weights",
    )
    e.add_argument(
        "--controlnet",
        action="append",
        default=[],
        metavar="PATH",
        help="ControlNet (a diffusers ControlNetModel directory, or a single .safetensors/.pth file in the "
        "original layout, converted once into the cache) traced into the UNet, which then takes its control "
        "image; repeatable (their residuals add up)",
    )
    e.add_argument(
        "--ip-adapter",
        default=None,
        metavar="FILE",
        help="IP-Adapter weights (ip-adapter_sd15.safetensors; its image_encoder/ beside it) traced into the "
        "UNet, which then takes an image prompt; its image encoder is exported too",
    )
    e.add_argument(
        "--pag-layers",
        default=None,
        metavar="LAYERS",
        help="make the UNet's self-attention in these layers perturbable, for perturbed-attention guidance "
        "(generate --pag-scale): comma-separated names as diffusers' PAG pipelines take them, such as mid "
        "(their default) or down_blocks.1",
    )
    e.add_argument(
        "--deepcache",
        type=int,
        default=None,
        metavar="BRANCH",
        help="cut the UNet for DeepCache at this branch (numbered as the authors' helper numbers it; 0, the "
        "shallowest and fastest, is theirs for SD 1.5): a whole UNet that caches the branch's feature and a "
        "shallow one that runs on it (generate --deepcache-interval)",
    )
    e.add_argument(
        "--freeu",
        action="store_true",
        help="the UNet takes FreeU's scales as an input, so each run chooses them (generate --freeu); "
        "without them it gives the plain UNet's output",
    )
    e.add_argument(
        "--seamless",
        action="store_true",
        help="the UNet's and VAE's convolutions wrap around the image's edges, so every image made tiles "
        "(the web UI's Tiling)",
    )
    e.add_argument("--vae", default=None, metavar="DIR|FILE", help=VAE_HELP)
    e.add_argument(
        "--preview-vae",
        default=None,
        metavar="DIR",
        help="a tiny VAE (AutoencoderTiny: TAESD, TAESDXL) whose decoder is exported beside the model's VAE "
        "to draw previews (--preview-method tiny; the HTTP API's TAESD live previews)",
    )
    e.add_argument("--config", default=None, metavar="DIR", help=CONFIG_HELP)
    e.set_defaults(func=cmd_export)

    v = sub.add_parser(
        "convert", help="write a single-file checkpoint (.safetensors, .ckpt) as a diffusers-format directory"
    )
    v.add_argument("checkpoint")
    v.add_argument("--output", required=True)
    v.add_argument("--config", default=None, metavar="DIR", help=CONFIG_HELP)
    v.set_defaults(func=cmd_convert)

    c = sub.add_parser("make-checkpoint", help="write a randomly initialised SD 1.x or SDXL checkpoint")
    c.add_argument("output")
    c.add_argument(
        "--preset",
        choices=("tiny", "sd15", "tiny-xl", "sdxl", "tiny-xl-refiner", "sdxl-refiner"),
        default="tiny",
        help="tiny: SD 1.x at toy widths (default); sd15: SD 1.5's sizes; tiny-xl, sdxl: the same for SDXL; "
        "tiny-xl-refiner, sdxl-refiner: the same for SDXL's refiner",
    )
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="epsilon")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--inpainting", action="store_true", help="a 9-channel inpainting UNet")
    c.add_argument(
        "--guidance-embedding",
        type=int,
        default=0,
        metavar="WIDTH",
        help="a latent consistency model's UNet, which takes the guidance scale as an embedding this wide "
        "(LCM_Dreamshaper_v7's: 256)",
    )
    c.add_argument("--safety-checker", action="store_true", help="with a random safety checker, as SD 1.x's")
    c.set_defaults(func=cmd_make_checkpoint)

    n = sub.add_parser("make-controlnet", help="write a randomly initialised ControlNet for a checkpoint")
    n.add_argument("checkpoint", help="the diffusers checkpoint whose UNet it conditions")
    n.add_argument("output")
    n.add_argument("--seed", type=int, default=0)
    n.set_defaults(func=cmd_make_controlnet)

    a = sub.add_parser(
        "make-ip-adapter", help="write a randomly initialised IP-Adapter (and image encoder) for a checkpoint"
    )
    a.add_argument("checkpoint", help="the diffusers checkpoint whose UNet it conditions")
    a.add_argument("output", help="a new directory: ip-adapter.safetensors and image_encoder/ go there")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument(
        "--kind",
        choices=("plain", "plus"),
        default="plain",
        help="plain (one projected embedding, default) or plus (a resampler over every token of the encoder)",
    )
    a.set_defaults(func=cmd_make_ip_adapter)

    t = sub.add_parser(
        "make-tiny-vae", help="write a randomly initialised tiny VAE (AutoencoderTiny, TAESD's architecture)"
    )
    t.add_argument("output", help="a new directory, to give export or generate as --vae")
    t.add_argument("--latent-channels", type=int, default=4, help="the checkpoint's (default 4: SD and SDXL)")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_make_tiny_vae)

    b = sub.add_parser("bench", help="per-stage latency of each backend against the PyTorch baseline")
    b.add_argument(
        "model",
        help="a preset (tiny, sd15-cpu, sd15-512, tiny-xl, sdxl-1024, tiny-xl-refined, sdxl-1024-refined) or "
        "an ONNX directory",
    )
    b.add_argument("--backends", default="ort,torch")
    b.add_argument("--checkpoint", default=None, help="source checkpoint (default: from the export manifest)")
    b.add_argument(
        "--refiner", default=None, metavar="DIR", help="a refiner's export that finishes every run (0.8 on)"
    )
    b.add_argument(
        "--refiner-checkpoint", default=None, help="the refiner's source checkpoint (default: its manifest's)"
    )
    for name in ("steps", "height", "width", "batch", "runs", "warmup"):
        b.add_argument(f"--{name}", type=int, default=None)
    b.add_argument("--guidance", type=float, default=None)
    b.add_argument("--scheduler", default=None)
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--device", choices=DEVICE_CHOICES, default=None, help="default: cuda where available")
    b.add_argument("--optimized-cache", action="store_true", help=OPTIMIZED_CACHE_HELP)
    b.add_argument("--graphs", choices=GRAPH_CHOICES, default="step", help=GRAPHS_HELP)
    _add_cuda_option(b)
    b.add_argument(
        "--pag-scale",
        type=float,
        default=0.0,
        metavar="S",
        help="perturbed-attention guidance at this scale, for an export with --pag-layers (the baseline runs "
        "diffusers' PAG pipelines on the same layers)",
    )
    b.add_argument(
        "--deepcache-interval",
        type=int,
        default=1,
        metavar="N",
        help="DeepCache at this interval, for an export with --deepcache (the baseline runs the authors' "
        "DeepCacheSDHelper at the same branch)",
    )
    b.add_argument(
        "--freeu",
        default=None,
        metavar="S1,S2,B1,B2",
        help="FreeU at these scales, for an export with --freeu (the baseline runs diffusers' enable_freeu)",
    )
    b.add_argument("--json", default=None)
    b.add_argument("--plot", default=None)
    b.set_defaults(func=cmd_bench)

    from export.trt_build import add_build_parser

    add_build_parser(sub)

    i = sub.add_parser(
        "info", help="what a model directory (or a LoRA file) holds, and whether it runs here as it is"
    )
    i.add_argument("model_dir", help="diffusers checkpoint, ONNX export or engine directory, or a LoRA file")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_info)

    v = sub.add_parser("serve", help="serve a model over HTTP with the AUTOMATIC1111 web UI's API")
    v.add_argument(
        "model_dir", help="ONNX export (ort), engine directory (trt) or diffusers checkpoint (torch)"
    )
    v.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine only; no auth)")
    v.add_argument("--port", type=int, default=7860, help="default: 7860, the web UI's")
    v.add_argument("--backend", choices=BACKEND_CHOICES, default="auto")
    v.add_argument("--device", choices=DEVICE_CHOICES, default=None)
    v.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    v.add_argument("--graphs", choices=GRAPH_CHOICES, default="step", help=GRAPHS_HELP)
    _add_cuda_option(v)
    v.add_argument(
        "--refiner",
        default=None,
        metavar="DIR",
        help="a model that finishes every run from refiner_switch_at on (SDXL's refiner for SDXL base)",
    )
    v.add_argument(
        "--lora-dir",
        default=None,
        metavar="DIR",
        help="where prompts' <lora:NAME:WEIGHT> tags find NAME.safetensors (the web UI's models/Lora)",
    )
    v.add_argument(
        "--no-safety-checker",
        dest="safety_checker",
        action="store_false",
        help="do not run the safety checker",
    )
    v.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="offline end-to-end demo on a tiny random checkpoint")
    d.add_argument("--workdir", default="sdengine-demo")
    d.add_argument("--output", default="demo.png")
    d.add_argument("--steps", type=int, default=20)
    d.add_argument("--scheduler", default=None)
    d.set_defaults(func=cmd_demo)
    return parser


def replay_source(argv: Sequence[str]) -> str | None:
    """generate's ``--from IMAGE``, read before the command line is: the record sets its defaults."""
    if not argv or argv[0] != "generate":
        return None
    early = OneLineParser(prog="sdengine generate", add_help=False)
    early.add_argument("--from", dest="replay_from", default=None)
    return early.parse_known_args(argv[1:])[0].replay_from


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        source = replay_source(argv)
        if source is not None:  # the record's settings as the defaults, which options given change
            from sdengine.replay import replay

            replayed = replay(source)
            args = build_parser(replayed.defaults).parse_args(argv)
            args.replay = replayed
        else:
            args = build_parser().parse_args(argv)
        return args.func(args)
    except SDEngineError as exc:
        print(f"sdengine: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("sdengine: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
