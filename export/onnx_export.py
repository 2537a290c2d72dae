"""Export a diffusers Stable Diffusion checkpoint to ONNX, one model per component.

Per component: trace with torch's TorchScript-based ONNX exporter (the path Optimum and TensorRT's demo use
for these models), fold constants, infer shapes, optionally convert to float16, store weights over 2 GB as one
external-data file, check the result with ``onnx.checker``, and check its outputs against the PyTorch module
at another size (``export.verify``). A manifest records what was made from what, and how close it came.

The UNet is traced at a latent size that is *not* a multiple of its total downsampling factor. That makes
diffusers pass explicit upsample sizes, so the exported graph runs at every latent size, not only at
multiples of 8 (a graph traced at a multiple of 8 bakes in scale-factor-2 upsampling and fails at others).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import onnx
import psutil

import sdengine
from export.checkpoint import checkpoint_hash
from export.controlnet import check_controlnets, controlnet_directory, with_controlnets
from export.cuda_fusion import classic_attention, fuse_for_cuda
from export.deepcache import (
    check_controlled_branch,
    checkpoint_branch_shape,
    cut_for_deepcache,
    restore_unread_inputs,
    write_deepcache_config,
)
from export.fp16 import convert_to_fp16
from export.freeu import write_freeu_config
from export.ip_adapter import check_ip_adapter, write_ip_adapter_config
from export.lora_fuse import check_loras, fuse_loras
from export.pag import write_pag_config
from export.records import write_record
from export.single_file import converted_checkpoint, is_single_file
from export.vae_override import checkpoint_with_vae, preview_vae_source
from export.verify import Verification, check_outputs, reference_outputs
from export.weight_names import name_weights
from export.wrappers import load_export_module, sample_inputs, text_vocab_size
from sdengine.controlnet import CONTROLNET_CONFIG, residual_count
from sdengine.deepcache import CacheBranch
from sdengine.errors import (
    ExportVerificationError,
    InvalidArgumentError,
    ModelDirectoryError,
    UnsupportedConfigError,
)
from sdengine.lora import LoraFile, read_lora
from sdengine.manifest import MANIFEST_NAME, TARGETS, ComponentRecord, Manifest, file_sha256
from sdengine.model_dir import open_checkpoint_dir, read_json
from sdengine.model_specs import (
    CONDITIONING_INPUTS,
    EXPORTABLE,
    IMAGE_ENCODER,
    PREVIEW_DECODER,
    SAFETY_CHECKER,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    UNET,
    UNET_SHALLOW,
    VAE_DECODER,
    VAE_ENCODER,
    ModelSpec,
)

PRECISIONS = ("fp32", "fp16")
MIN_OPSET = 17
DEFAULT_OPSET = 17
TWO_GB = 2**31
# Latent size used for tracing: odd, so not a multiple of any UNet's downsampling factor (see module doc).
TRACE_LATENT = (9, 13)

# Files copied verbatim so the ONNX directory is self-contained (and laid out as Optimum lays it out).
COPIED = {
    "tokenizer": "tokenizer",
    "scheduler": "scheduler",
    "text_encoder/config.json": "text_encoder/config.json",
    "tokenizer_2": "tokenizer_2",  # SDXL's second text encoder's
    "text_encoder_2/config.json": "text_encoder_2/config.json",
    "unet/config.json": "unet/config.json",
    "vae/config.json": ("vae_decoder/config.json", "vae_encoder/config.json"),
    "model_index.json": "model_index.json",
    "feature_extractor": "feature_extractor",  # the safety checker's image processor
    "safety_checker/config.json": "safety_checker/config.json",
}


class _PeakRss:
    """Samples this process's resident memory in a thread; the peak over a ``with`` block."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> _PeakRss:
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def tool_versions() -> dict[str, str]:
    import diffusers
    import onnxruntime
    import torch
    import transformers

    return {
        "sdengine": sdengine.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _trace(module: object, spec: ModelSpec, inputs: dict, path: Path, opset: int) -> None:
    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python branches on shapes; see module doc
        torch.onnx.export(
            module,
            tuple(inputs[name] for name in spec.input_names),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes,
            do_constant_folding=True,
        )


def _save(model: onnx.ModelProto, path: Path, threshold: int = TWO_GB) -> str | None:
    """Save ``model``; one over ``threshold`` bytes (protobuf's 2 GB limit) keeps its weights in one
    external-data file beside it, not a file per tensor. Returns that file's name, if any."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if sum(t.ByteSize() for t in model.graph.initializer) < threshold:
        onnx.save_model(model, str(path))
        return None
    location = path.name + ".data"
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location
    )
    return location


def export_component(
    checkpoint: Path,
    name: str,
    out_dir: Path,
    *,
    precision: str,
    opset: int,
    verify: bool = True,
    loras: Sequence[tuple[LoraFile, float]] = (),
    controlnets: Sequence[Path] = (),
    ip_adapter: dict | None = None,
    target: str = "portable",
    pag_layers: Sequence[str] = (),
    seamless: bool = False,
    preview_vae: Path | None = None,
    deepcache: CacheBranch | None = None,
    freeu: bool = False,
) -> ComponentRecord:
    """Export one component of ``checkpoint`` to ``out_dir/name/model.onnx`` and describe the result.
    ``verify``: check its outputs against the PyTorch module's (recorded; export_checkpoint raises).
    ``loras``: (LoRA, scale) pairs fused into the component first. The UNet's and text encoder's layer
    weights are named after their layers (``export.weight_names``), so LoRA can be fused at run time too.
    ``controlnets``: ControlNet directories traced into the UNet (``wrappers.ControlledUNetExport``).
    ``ip_adapter``: an IP-Adapter's record (``export.ip_adapter.check_ip_adapter``), loaded into the UNet,
    whose image encoder is the ``image_encoder`` component. ``target`` ``cuda``: the UNet fused for ONNX
    Runtime's CUDA provider (``export.cuda_fusion``; checked against PyTorch before the fusion).
    ``pag_layers``: the UNet's self-attention there made perturbable (``export.pag``). ``seamless``: the
    UNet's and VAE's convolutions wrap around the edges (``export.seamless``). ``preview_vae``: the tiny
    VAE folder whose decoder is the ``preview_decoder`` component. ``deepcache``: the UNet cut at this
    DeepCache branch: ``unet`` also gives the cached feature, ``unet_shallow`` runs the branch alone on it
    (``export.deepcache``). ``freeu``: the UNet takes FreeU's scales (``export.freeu``)."""
    cuda_fused = target == "cuda" and name == UNET
    unet_kind = name in (UNET, UNET_SHALLOW)
    if name == UNET_SHALLOW and deepcache is None:
        raise InvalidArgumentError("unet_shallow is DeepCache's: export with --deepcache BRANCH")
    model_dir = open_checkpoint_dir(checkpoint)
    if name in (SAFETY_CHECKER, IMAGE_ENCODER):
        precision = "fp32"  # small, run once per generation, and the checker's flags are thresholds
    if name in (VAE_DECODER, VAE_ENCODER) and model_dir.vae_force_upcast:
        precision = "fp32"  # a VAE that overflows float16 (SDXL's), as diffusers upcasts it
    controlnets = tuple(controlnets) if unet_kind else ()
    ip_adapter = ip_adapter if unet_kind or name == IMAGE_ENCODER else None
    if name == IMAGE_ENCODER and ip_adapter is None:
        raise InvalidArgumentError("image_encoder is an IP-Adapter's: export with --ip-adapter FILE")
    ip_fields = {}
    if ip_adapter is not None:
        ip_fields = {
            "ip_image_embeds": ip_adapter["image_embeds"],
            "ip_image_size": ip_adapter["image_size"],
            "ip_image_tokens": ip_adapter["image_tokens"],
        }
    pag_layers = tuple(pag_layers) if unet_kind else ()
    freeu = freeu and unet_kind
    arch = dataclasses.replace(
        with_controlnets(model_dir.arch, controlnets), pag=bool(pag_layers), freeu=freeu, **ip_fields
    )
    model_path = out_dir / name / "model.onnx"
    start = time.perf_counter()
    ip_file = None if ip_adapter is None else Path(ip_adapter["file"])
    loaded = UNET if unet_kind else name  # the shallow UNet is the UNet, cut (export.deepcache)
    module = load_export_module(
        checkpoint, loaded, controlnets, arch.xl, ip_file, pag_layers, seamless, preview_vae, freeu
    )
    fuse_loras(module, loaded, loras)
    if deepcache is not None and unet_kind:
        module, arch = cut_for_deepcache(module, arch, deepcache, shallow=name == UNET_SHALLOW)
    spec = arch.specs()[name]
    scale = arch.vae_scale_factor
    height, width = TRACE_LATENT[0] * scale, TRACE_LATENT[1] * scale
    vocab_size = text_vocab_size(checkpoint, name)
    inputs = sample_inputs(arch, name, batch=2, height=height, width=width, vocab_size=vocab_size)
    fused_operators, verification = None, None
    if cuda_fused:
        classic_attention(module)
    with _PeakRss() as rss, tempfile.TemporaryDirectory(prefix=f"sdengine-{name}-", dir=out_dir) as tmp:
        traced = Path(tmp) / "model.onnx"
        _trace(module, spec, inputs, traced, opset)
        onnx.shape_inference.infer_shapes_path(str(traced), str(traced))
        # Never both copies of the weights at once: ONNX's stay on disk while the layers are named (read one
        # at a time) and PyTorch's outputs for the check are taken; then PyTorch's are freed.
        model = onnx.load(str(traced), load_external_data=False)
        if name == UNET_SHALLOW:
            restore_unread_inputs(model, spec)
        if name in (UNET, UNET_SHALLOW, TEXT_ENCODER, TEXT_ENCODER_2):
            name_weights(model, module, tmp)
        reference = reference_outputs(module, arch, name, vocab_size=vocab_size) if verify else None
        module = None
        onnx.load_external_data_for_model(model, tmp)
        if cuda_fused:  # checked in float32 before the fusion: the CPU cannot run the fused model
            unfused = Path(tmp) / "unfused.onnx"
            _save(model, unfused)
            del model
            if reference is not None:
                verification = check_outputs(unfused, reference, "fp32").as_dict()
            model, fused_operators = fuse_for_cuda(unfused)
        elif precision == "fp16":
            model = convert_to_fp16(model, CONDITIONING_INPUTS if unet_kind else ())
        for stale in (model_path, model_path.with_name(model_path.name + ".data")):
            stale.unlink(missing_ok=True)
        external = _save(model, model_path)
        del model
        onnx.shape_inference.infer_shapes_path(str(model_path), str(model_path))
        onnx.checker.check_model(str(model_path), full_check=False)
    export_seconds = round(time.perf_counter() - start, 3)
    if reference is not None and not cuda_fused:
        verification = check_outputs(model_path, reference, precision).as_dict()
    data_path = model_path.with_name(external) if external else None
    return ComponentRecord(
        name=name,
        path=str(model_path.relative_to(out_dir)),
        sha256=file_sha256(model_path),
        external_data=str(data_path.relative_to(out_dir)) if data_path else None,
        size_bytes=model_path.stat().st_size + (data_path.stat().st_size if data_path else 0),
        export_seconds=export_seconds,
        peak_rss_bytes=rss.peak,
        inputs={t.name: list(t.dims) for t in spec.inputs},
        outputs={t.name: list(t.dims) for t in spec.outputs},
        verification=verification,
        fused_operators=fused_operators,
    )


def _write_controlnet_config(out_dir: Path, records: list[dict], configs: list[dict]) -> None:
    """List the ControlNets inside the exported UNet (none: no list, so an older one never outlives them),
    and the residuals each adds, which the UNet weighs row by row
    (``sdengine.controlnet.control_mode_weights``)."""
    if not records:
        write_record(out_dir, CONTROLNET_CONFIG, None)
        return
    entries = [{**record, "config": config} for record, config in zip(records, configs, strict=True)]
    write_record(
        out_dir, CONTROLNET_CONFIG, {"controlnets": entries, "residuals": residual_count(configs[0])}
    )


def _copy_side_files(checkpoint: Path, out_dir: Path) -> None:
    for src, dsts in COPIED.items():
        for dst in (dsts,) if isinstance(dsts, str) else dsts:
            source, target = checkpoint / src, out_dir / dst
            if source.exists():  # the safety checker's files are there only with one
                target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, target, dirs_exist_ok=True)
            elif source.is_file():
                shutil.copy2(source, target)


def export_checkpoint(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    components: Iterable[str] | None = None,
    progress: Callable[[Iterable[str]], Iterable[str]] | None = None,
    verify: bool = True,
    loras: Sequence[tuple[str | os.PathLike, float]] = (),
    controlnets: Sequence[str | os.PathLike] = (),
    ip_adapter: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    vae: str | os.PathLike | None = None,
    target: str = "portable",
    pag_layers: Sequence[str] = (),
    seamless: bool = False,
    preview_vae: str | os.PathLike | None = None,
    deepcache: int | None = None,
    freeu: bool = False,
) -> Manifest:
    """Export every component of a diffusers checkpoint to ONNX in ``output``; returns the manifest.
    ``checkpoint`` may be a single-file checkpoint (``model.safetensors``), converted once into the cache
    (:func:`export.single_file.converted_checkpoint`; the manifest names that directory), its configs and
    tokenizer taken from ``config`` (a diffusers directory of the same architecture) or the Hub. ``vae``:
    another VAE in the checkpoint's place (:func:`export.vae_override.checkpoint_with_vae`; the manifest
    names the composed checkpoint, in the cache).
    ``components``: a subset of :data:`EXPORTABLE`; by default the four models (five for SDXL, with its
    second text encoder) and, where the checkpoint has one, its safety checker (always in float32, as is a
    VAE whose config says it overflows float16, SDXL's).

    ``verify`` (the default) checks each model's outputs against its PyTorch module's (``export.verify``).
    A model that fails the check does not stop the export: every model is written and the manifest records
    each check, then ExportVerificationError names the first failure. The files stay for inspection.
    ``loras``: (LoRA file, scale) pairs fused into the UNet and text encoder before they are exported.
    ``controlnets``: ControlNet directories traced into the UNet, whose model then takes their conditioning
    images and weights (``sdengine.controlnet``); listed in ``controlnet/config.json``. ``ip_adapter``: an
    IP-Adapter weights file (its image encoder in ``image_encoder/`` beside it), loaded into the UNet, whose
    model then takes an image prompt's embeddings and weight; its image encoder is exported too
    (``sdengine.ip_adapter``; ``ip_adapter/config.json``). ``target``: ``portable`` (any ONNX Runtime
    provider; TensorRT builds from it) or ``cuda``, float16 only: the UNet fused for ONNX Runtime's CUDA
    provider, which alone runs it (``export.cuda_fusion``). ``pag_layers``: the self-attention layers
    perturbed-attention guidance may perturb, named as diffusers' PAG pipelines name them (``mid``,
    ``down_blocks.1``, a regular expression); the UNet then takes ``pag_rows`` (``sdengine.pag``;
    ``pag/config.json``). ``seamless``: the UNet's and VAE's convolutions wrap around the image's edges, so
    every image made tiles (the web UI's "Tiling"; ``export.seamless``; recorded in the manifest).
    ``preview_vae``: a tiny VAE (``AutoencoderTiny`` folder) whose decoder is exported beside the model's
    own VAE as ``preview_decoder``, to draw previews part way through a run (``sdengine.latent_preview``).
    ``deepcache``: a DeepCache branch (the authors' numbering; 0 the shallowest): the UNet also gives the
    feature cached there, and ``unet_shallow`` runs the branch alone on it (``sdengine.deepcache``;
    ``deepcache/config.json``). ``freeu``: the UNet takes FreeU's scales as an input, so runs choose them
    (``sdengine.freeu``; ``freeu/config.json``)."""
    if precision not in PRECISIONS:
        raise InvalidArgumentError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if target not in TARGETS:
        raise InvalidArgumentError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if target == "cuda" and precision != "fp16":
        raise InvalidArgumentError(
            "--target cuda is float16 (ONNX Runtime's fused CUDA kernels): add --precision fp16"
        )
    if opset < MIN_OPSET:
        raise InvalidArgumentError(f"opset {opset} is too old; use {MIN_OPSET} or newer")
    if is_single_file(checkpoint):
        checkpoint = converted_checkpoint(checkpoint, config)
    elif config is not None:
        raise InvalidArgumentError(
            "a config directory is for single-file checkpoints; a directory has its own"
        )
    if vae is not None:
        checkpoint = checkpoint_with_vae(open_checkpoint_dir(checkpoint).root, vae)
    checkpoint_dir = open_checkpoint_dir(checkpoint)
    source = checkpoint_dir.root
    has_checker = (source / SAFETY_CHECKER / "config.json").is_file()
    ip_record = None if ip_adapter is None else check_ip_adapter(source, Path(ip_adapter).resolve())
    preview = None if preview_vae is None else preview_vae_source(preview_vae, source).resolve()
    if components is None:
        components = [*checkpoint_dir.arch.components(), *([SAFETY_CHECKER] if has_checker else [])]
        components += [IMAGE_ENCODER] if ip_record else []
        components += [PREVIEW_DECODER] if preview else []
    components = list(components)
    unknown = sorted(set(components) - set(EXPORTABLE))
    if unknown:
        raise InvalidArgumentError(
            f"unknown component(s) {', '.join(unknown)}; choose from {', '.join(EXPORTABLE)}"
        )
    if TEXT_ENCODER_2 in components and not checkpoint_dir.arch.xl:
        raise InvalidArgumentError(f"{source} has one text encoder; text_encoder_2 is SDXL's second")
    if SAFETY_CHECKER in components and not has_checker:
        raise ModelDirectoryError(f"{source} has no safety checker to export")
    lora_files = [(read_lora(path), float(scale)) for path, scale in loras]
    check_loras(source, components, lora_files)
    control_paths = [controlnet_directory(Path(p), source).resolve() for p in controlnets]  # files converted
    if control_paths and UNET not in components:
        raise InvalidArgumentError("ControlNets are exported inside the UNet: export the unet component too")
    control_configs = check_controlnets(source, checkpoint_dir.arch, control_paths)
    if ip_record and UNET not in components:
        raise InvalidArgumentError("an IP-Adapter is exported inside the UNet: export the unet component too")
    if IMAGE_ENCODER in components and not ip_record:
        raise InvalidArgumentError("image_encoder is an IP-Adapter's: export with --ip-adapter FILE")
    if PREVIEW_DECODER in components and not preview:
        raise InvalidArgumentError("preview_decoder is a tiny VAE's: export with --preview-vae DIR")
    if target == "cuda" and UNET not in components:
        raise InvalidArgumentError("--target cuda fuses the UNet for CUDA: export the unet component too")
    pag_layers = [layer for layer in pag_layers if layer]
    if pag_layers and UNET not in components:
        raise InvalidArgumentError("--pag-layers are traced into the UNet: export the unet component too")
    if freeu and UNET not in components:
        raise InvalidArgumentError("--freeu is traced into the UNet: export the unet component too")
    branch = None if deepcache is None else CacheBranch(deepcache)
    branch_shape = None
    if branch is not None:
        if UNET not in components:
            raise InvalidArgumentError("--deepcache cuts the UNet in two: export the unet component too")
        if target == "cuda":
            raise UnsupportedConfigError("--deepcache with --target cuda is not supported yet")
        branch_shape = checkpoint_branch_shape(source, branch)
        check_controlled_branch(branch_shape, branch, bool(control_paths))
        if UNET_SHALLOW not in components:
            components.insert(components.index(UNET) + 1, UNET_SHALLOW)
    elif UNET_SHALLOW in components:
        raise InvalidArgumentError("unet_shallow is DeepCache's: export with --deepcache BRANCH")
    out_dir = Path(output)
    if out_dir.resolve() == source.resolve():
        raise InvalidArgumentError("--output must differ from the checkpoint directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    records = {}
    for name in progress(components) if progress else components:
        records[name] = export_component(
            source,
            name,
            out_dir,
            precision=precision,
            opset=opset,
            verify=verify,
            loras=lora_files,
            controlnets=control_paths,
            ip_adapter=ip_record,
            target=target,
            pag_layers=pag_layers,
            seamless=seamless,
            preview_vae=preview,
            deepcache=branch,
            freeu=freeu,
        )
    _copy_side_files(source, out_dir)
    if PREVIEW_DECODER in components:  # its config (its scaling factor), and where it came from
        config = {**read_json(preview / "config.json"), "_source": str(preview)}
        (out_dir / PREVIEW_DECODER / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    control_records = [{"dir": str(p), "sha256": checkpoint_hash(p)} for p in control_paths]
    if UNET in components:
        _write_controlnet_config(out_dir, control_records, control_configs)
        write_ip_adapter_config(out_dir, ip_record)
        write_pag_config(out_dir, pag_layers)
        write_deepcache_config(out_dir, branch, branch_shape)
        write_freeu_config(out_dir, freeu)
    manifest = Manifest(
        source_checkpoint=str(source.resolve()),
        source_hash=checkpoint_hash(source),
        precision=precision,
        opset=opset,
        tool_versions=tool_versions(),
        components=records,
        loras=[
            {"file": str(f.path.resolve()), "sha256": file_sha256(f.path), "scale": s} for f, s in lora_files
        ],
        controlnets=control_records,
        target=target,
        seamless=seamless,
    )
    manifest.write(out_dir)
    failed = [
        Verification(**{k: v for k, v in r.verification.items() if k != "passed"}).describe(n, precision)
        for n, r in records.items()
        if r.verification is not None and not r.verification["passed"]
    ]
    if failed:
        more = f" (and {len(failed) - 1} more; see {MANIFEST_NAME})" if len(failed) > 1 else ""
        raise ExportVerificationError(f"{failed[0]}{more}; the export in {out_dir} is kept for inspection")
    return manifest


__all__ = [
    "PRECISIONS",
    "TEXT_ENCODER",
    "VAE_DECODER",
    "VAE_ENCODER",
    "export_checkpoint",
    "export_component",
]
