"""``sdengine info DIR``: what a model directory holds, and whether this machine can run it as it is (and
``sdengine info FILE.safetensors``: what a LoRA file updates, what an IP-Adapter is, or a single-file
checkpoint's family or ControlNet's shape; ``sdengine info CONTROLNET_DIR``: what a ControlNet must fit).

For a diffusers checkpoint: its architecture and scheduler. For an ONNX export: its manifest (precision,
opset, source, per-model size) and which models are present. For an engine directory: each engine's build
(profile, TensorRT version, GPU) and its check against this machine and the ONNX it was built from: usable, or
the one-line reason it would be refused and the command that fixes it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sdengine.errors import SDEngineError


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON-ready description of the model directory ``path``."""
    from sdengine.backends.select import model_kind

    root = Path(path)
    if root.suffix == ".safetensors" and root.is_file():
        tensors = _tensor_headers(root)
        described = tensors and (
            _checkpoint_file(root, tensors)
            or _controlnet_file(root, tensors)
            or _ip_adapter_file(root, tensors)
        )
        return described or _lora_file(root)  # which names what is wrong with an unreadable file
    if (root / "config.json").is_file() and not (root / "model_index.json").is_file():
        return _controlnet_dir(root)
    kind = model_kind(root)
    info: dict[str, Any] = {"path": str(root), "kind": kind}
    if kind == "engines":
        info.update(_engines(root))
    else:
        info.update(_model(root, kind))
    return info


def _model(root: Path, kind: str) -> dict[str, Any]:
    from sdengine.controlnet import CONTROLNET_CONFIG, exported_controlnets
    from sdengine.deepcache import DEEPCACHE_CONFIG, exported_branch
    from sdengine.ip_adapter import IP_ADAPTER_CONFIG
    from sdengine.manifest import Manifest
    from sdengine.model_dir import open_checkpoint_dir, open_onnx_dir, optional_json, weights_variant
    from sdengine.model_specs import PREVIEW_DECODER, SAFETY_CHECKER
    from sdengine.pag import PAG_CONFIG, exported_pag

    model_dir = open_checkpoint_dir(root) if kind == "checkpoint" else open_onnx_dir(root)
    config = model_dir.scheduler_config
    info: dict[str, Any] = {
        "architecture": vars(model_dir.arch),
        # an inpainting UNet takes the mask and masked image; a plain one inpaints by blending after each step
        "inpainting": "inpainting UNet" if model_dir.arch.inpainting_unet else "blended, plain UNet",
        "guidance": "embedded: the UNet takes the scale as an input (a latent consistency model), one UNet "
        "call per step"
        if model_dir.arch.guidance_embedding
        else "classifier-free: the UNet runs on the negative and positive prompts above guidance 1",
        "native_size": model_dir.default_image_size,
        "vae": "tiny (AutoencoderTiny, TAESD's architecture)" if model_dir.arch.tiny_vae else "AutoencoderKL",
        "vae_scaling_factor": model_dir.vae_scaling_factor,
        "scheduler": config.get("_class_name"),
        "prediction_type": config.get("prediction_type", "epsilon"),
    }
    layers = optional_json(root / "text_encoder" / "config.json").get("num_hidden_layers")
    layers = layers if isinstance(layers, int) and not isinstance(layers, bool) else None
    checker = (root / SAFETY_CHECKER / ("config.json" if kind == "checkpoint" else "model.onnx")).is_file()
    info["safety_checker"] = "yes: run on every image unless switched off" if checker else "none"
    if kind == "checkpoint":
        info["weights_variant"] = weights_variant(root / "unet")
        info["clip_skip"] = f"0 to {layers - 1}" if layers else "unknown"
        return info
    info["models"] = {c: model_dir.onnx_path(c).is_file() for c in model_dir.arch.components()}
    if model_dir.arch.xl:  # SDXL exports give every layer
        info["clip_skip"] = f"0 to {layers - 1}" if layers else "0 and up"
    else:
        info["clip_skip"] = _clip_skip(model_dir.onnx_path("text_encoder"), layers)
    info["lora_at_run_time"] = _lora(model_dir.onnx_path("unet"))
    controlnets = exported_controlnets(optional_json(root / CONTROLNET_CONFIG))
    info["controlnets"] = [Path(str(c.get("dir", "?"))).name for c in controlnets] or "none"
    if controlnets:
        info["control_modes"] = (
            "balanced, guess, prompt, control"
            if model_dir.arch.control_residuals
            else "balanced only (exported before control modes: export again for the others)"
        )
    adapter = optional_json(root / IP_ADAPTER_CONFIG)
    info["ip_adapter"] = (
        f"{Path(str(adapter.get('file', '?'))).name}: takes an image prompt" if adapter else "none"
    )
    pag = exported_pag(optional_json(root / PAG_CONFIG))
    info["pag"] = f"perturbed-attention guidance (--pag-scale) in {', '.join(pag)}" if pag else "none"
    info["seamless"] = "yes: its images tile" if model_dir.seamless else "no"
    branch = exported_branch(optional_json(root / DEEPCACHE_CONFIG))
    info["deepcache"] = f"branch {branch} (--deepcache-interval)" if branch is not None else "none"
    info["freeu"] = "takes FreeU's scales (--freeu)" if model_dir.arch.freeu else "none"
    tiny = model_dir.onnx_path(PREVIEW_DECODER).is_file()
    info["previews"] = "full, approx, tiny (its preview decoder)" if tiny else "full, approx"
    manifest = Manifest.read(root)
    if manifest is not None:
        info["manifest"] = {
            "precision": manifest.precision,
            "target": "cuda: the UNet fused for ONNX Runtime's CUDA provider, which alone runs it"
            if manifest.target == "cuda"
            else "portable",
            "opset": manifest.opset,
            "source_checkpoint": manifest.source_checkpoint,
            "tool_versions": manifest.tool_versions,
            "size_mb": {n: round(r.size_bytes / 1e6, 1) for n, r in manifest.components.items()},
            "loras_fused": ", ".join(f"{Path(x['file']).name} at {x['scale']:g}" for x in manifest.loras)
            or "none",
        }
    return info


def _engines(root: Path) -> dict[str, Any]:
    from sdengine.engine_keys import EngineManifest, check_engine

    manifest = EngineManifest.read(root)
    assert manifest is not None  # model_kind found it
    env = None
    try:
        from export.trt_build import detect_build_env

        env = detect_build_env()
        here = f"TensorRT {env.trt_version}, GPU compute capability {env.compute_capability}"
    except SDEngineError as exc:
        here = f"not checked here: {exc}"
    engines = {}
    for name, entry in manifest.engines.items():
        status = "usable here"
        if env is not None:
            try:
                check_engine(root, name, manifest.onnx_dir, env=env)
            except SDEngineError as exc:
                status = f"refused: {exc}"
        engines[name] = {
            "file": entry.file,
            "precision": entry.precision,
            "profile": entry.profile,
            "built_with": f"TensorRT {entry.trt_version}, compute capability {entry.compute_capability}",
            "size_mb": round(entry.size_bytes / 1e6, 1),
            "status": status if env is not None else "not checked (no TensorRT here)",
        }
    return {"onnx_dir": manifest.onnx_dir, "this_machine": here, "engines": engines}


def format_info(info: dict[str, Any], indent: str = "") -> str:
    """The description as indented ``key: value`` lines."""
    lines = []
    for key, value in info.items():
        if isinstance(value, dict) and value:
            lines.append(f"{indent}{key}:")
            lines.append(format_info(value, indent + "  "))
        else:
            lines.append(f"{indent}{key}: {value}")
    return "\n".join(lines)


def _clip_skip(text_encoder: Path, layers: int | None) -> str:
    """Which clip_skip values an export's text encoder serves."""
    import onnx

    from sdengine.model_specs import LAYER_STATES

    try:
        outputs = {o.name for o in onnx.load(str(text_encoder), load_external_data=False).graph.output}
    except Exception:  # an unreadable model: the run itself will say so
        return "unknown"
    if LAYER_STATES not in outputs:
        return "0 only (its text encoder gives only its last layer; export again for more)"
    return f"0 to {layers - 1}" if layers else "0 and up"


def _lora(unet: Path) -> str:
    """Whether an export's UNet names its layer weights, which fusing a LoRA at run time needs."""
    import onnx

    from sdengine.lora import named_weights

    try:
        named = named_weights(onnx.load(str(unet), load_external_data=False))
    except Exception:  # an unreadable model: the run itself will say so
        return "unknown"
    if not named:
        return "no (its weights carry no layer names; export again)"
    return "yes (ONNX Runtime backends)"


def _controlnet_dir(root: Path) -> dict[str, Any]:
    """A ControlNet directory: what fixes whether it fits a checkpoint's UNet (``export --controlnet``)."""
    from export.controlnet import MATCHING, controlnet_config

    config = controlnet_config(root)  # a one-line error for any other single-model folder
    keys = ("in_channels", "conditioning_channels", *MATCHING, "controlnet_conditioning_channel_order")
    return {"path": str(root), "kind": "controlnet", **{k: config[k] for k in keys if k in config}}


#: a single-file checkpoint's text-encoder keys that tell its family (diffusers' rule, without diffusers)
FAMILY_KEYS = (
    ("conditioner.embedders.1.model.ln_final.weight", "SDXL base"),
    ("conditioner.embedders.0.model.ln_final.weight", "SDXL refiner"),
    ("cond_stage_model.model.ln_final.weight", "SD 2.x"),
    ("cond_stage_model.transformer.text_model.final_layer_norm.weight", "SD 1.x"),
)


#: a safetensors file's tensors by name: (shape, dtype), from its header alone
Headers = dict[str, tuple[tuple[int, ...], str]]


def _tensor_headers(path: Path) -> Headers | None:
    """Each tensor's shape and dtype, read once for the describers below; None for an unreadable file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            slices = {key: f.get_slice(key) for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)
            return {key: (tuple(s.get_shape()), s.get_dtype()) for key, s in slices.items()}
    except Exception:  # noqa: BLE001 - not ours to judge: the LoRA reader names what is wrong
        return None


def _checkpoint_file(path: Path, tensors: Headers) -> dict[str, Any] | None:
    """A single-file checkpoint (the web UI's layout): its family, weights and how to run it; None for any
    other file."""
    conv_in = tensors.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is None:  # no UNet: not a checkpoint
        return None
    family = next((name for key, name in FAMILY_KEYS if key in tensors), "unknown family")
    return {
        "path": str(path),
        "kind": "single-file checkpoint",
        "family": family + (" inpainting" if conv_in[0][1] == 9 else ""),
        "tensors": len(tensors),
        "unet_dtype": conv_in[1],
        "run": f"sdengine export {path} --output DIR [--config DIFFUSERS_DIR]",
    }


def _controlnet_file(path: Path, tensors: Headers) -> dict[str, Any] | None:
    """A single-file ControlNet (the original layout): its control image's encoder, blocks and dtype, and how
    to use it; None for any other file."""
    prefix = "control_model." if any(key.startswith("control_model.") for key in tensors) else ""
    hint = tensors.get(f"{prefix}input_hint_block.0.weight")
    if hint is None:  # no control image encoder: not a ControlNet file
        return None
    return {
        "path": str(path),
        "kind": "single-file ControlNet",
        "control_image_channels": hint[0][1],
        "residuals": sum(
            key.startswith(f"{prefix}zero_convs.") and key.endswith(".weight") for key in tensors
        )
        + 1,
        "sdxl": any(key.startswith(f"{prefix}label_emb.") for key in tensors),
        "dtype": hint[1],
        "run": f"sdengine export CHECKPOINT --output DIR --controlnet {path}",
    }


def _ip_adapter_file(path: Path, tensors: Headers) -> dict[str, Any] | None:
    """An IP-Adapter weights file (``export --ip-adapter``): its kind, what its projection reads and gives,
    its layers, and whether its image encoder is beside it; None for any other file."""
    shapes = {key: shape for key, (shape, _) in tensors.items()}
    if not any(key.startswith("image_proj.") for key in shapes):
        return None
    encoder = path.parent / "image_encoder" / "config.json"
    info: dict[str, Any] = {"path": str(path), "kind": "ip-adapter"}
    if "image_proj.proj.weight" in shapes:  # the plain kind: one projected embedding -> 4 tokens
        rows, reads = shapes["image_proj.proj.weight"]
        info.update(
            adapter_kind="plain", reads_embeddings_of=reads, tokens_per_image=4, token_width=rows // 4
        )
    elif "image_proj.latents" in shapes and "image_proj.proj_in.weight" in shapes:  # Plus: a resampler
        info.update(
            adapter_kind="plus",
            reads_embeddings_of=shapes["image_proj.proj_in.weight"][1],
            tokens_per_image=shapes["image_proj.latents"][1],
            token_width=shapes["image_proj.proj_out.weight"][0],
        )
    else:
        info["adapter_kind"] = "another kind, not supported (FaceID, Full Face...)"
    info["attention_layers"] = sum(key.endswith("to_k_ip.weight") for key in shapes)
    info["image_encoder"] = str(encoder.parent) if encoder.is_file() else "missing (image_encoder/ beside it)"
    return info


def _lora_file(path: Path) -> dict[str, Any]:
    """A LoRA file: its layers per component, their ranks and their ``alpha / rank`` factors."""
    from sdengine.lora import read_lora

    lora = read_lora(path)
    info: dict[str, Any] = {"path": str(path), "kind": "lora"}
    for component in sorted(lora.components()):
        layers = [layer for layer in lora.layers if layer.component == component]
        ranks = sorted({layer.down.shape[0] for layer in layers})
        factors = sorted({round(layer.factor, 4) for layer in layers})
        info[component] = {
            "layers": len(layers),
            # LoCon's: convolutions with a kernel wider than 1x1 (resnets), beyond attention's projections
            "kernel_layers": sum(layer.down.ndim == 4 and layer.down.shape[2:] != (1, 1) for layer in layers),
            "ranks": ", ".join(map(str, ranks)),
            "alpha_over_rank": ", ".join(f"{f:g}" for f in factors),
            "layout": "kohya-ss" if layers[0].flat else "diffusers/PEFT",
        }
    return info
