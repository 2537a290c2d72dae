"""An HTTP server that speaks the AUTOMATIC1111 web UI's API, so that its clients drive sdengine unchanged:
``sdengine serve MODEL_DIR`` then ``POST /sdapi/v1/txt2img`` (or ``img2img``) with the web UI's JSON.

What the web UI's API takes, and how it maps here:

- ``prompt``, ``negative_prompt``: read in the web UI's syntax (weights, ``BREAK``, prompt editing,
  composable ``AND``), and whole past 75 tokens, as the web UI reads them (``prompt_weights="a1111"``,
  ``long_prompts=True``).
- ``steps`` (50), ``cfg_scale`` (7), ``width``/``height`` (512), ``seed`` (-1: random), ``batch_size``,
  ``n_iter`` (batches one after another; image ``i`` of batch ``n`` has seed ``seed + n * batch_size + i``,
  as in the web UI), ``subseed``/``subseed_strength`` (variations, the same spherical interpolation).
- ``sampler_name`` (or ``sampler_index``; default "Euler") and ``scheduler`` ("Automatic", "Karras",
  "Exponential" or "Beta"): the names of :data:`SAMPLERS`, and their ``_exponential`` and ``_beta``
  schedulers; "Align Your Steps", "SGM Uniform", "Uniform", "Normal", "Simple", "Polyexponential", "DDIM"
  and "KL Optimal": the sampler's scheduler running that schedule's sigmas for the model as the web UI
  computes them (:mod:`sdengine.webui_schedules`; KL Optimal's end above 0, which only Euler's run can),
  the hires fix's second pass its own for its steps; not with DDIM, PLMS or LCM, which take no sigmas.
- ``enable_hr`` with ``hr_scale``, ``hr_upscaler`` ("Latent", or "None"/"Lanczos": the image),
  ``hr_second_pass_steps`` and ``denoising_strength``: the hires fix (:mod:`sdengine.hires`).
- ``override_settings.sd_vae_decode_method`` "TAESD": the images decoded by a tiny VAE's decoder (the
  pipeline's ``decoder="tiny"``), for a model with one; "Full" (the default): its VAE.
- ``override_settings.CLIP_stop_at_last_layers``: clip skip (the web UI counts the last layer as 1);
  ``override_settings.randn_source`` "CPU": the seeds' noise as PyTorch's CPU generator draws it
  (``noise_source="torch-cpu"``, :mod:`sdengine.torch_noise`); "GPU" and "NV" are refused.
- ``refiner_switch_at``: where the refiner of ``sdengine serve MODEL --refiner DIR`` takes over (0.8); that
  refiner finishes every run, whatever ``refiner_checkpoint`` names, which is refused without one.
- img2img: ``init_images`` (one, or one per batch item; base64 images), ``denoising_strength`` (0.75) and
  ``resize_mode`` (0 "Just resize", 1 "Crop and resize", 2 "Resize and fill"; 3, the latents', is refused):
  how an image of another size is brought to ``width`` x ``height`` (:data:`RESIZE_MODES`).
- inpainting (img2img with a ``mask``; one init image): ``mask``, ``mask_blur`` (or ``mask_blur_x`` and
  ``mask_blur_y``), ``inpainting_mask_invert``, ``inpaint_full_res`` with ``inpaint_full_res_padding``, and
  ``inpainting_fill`` 0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing), read as the web UI
  reads them; the result is laid back over the original as the web UI lays it (:mod:`sdengine.webui_inpaint`,
  which says what differs).
- ``<lora:NAME:WEIGHT>`` in the prompt (with ``sdengine serve --lora-dir DIR``): that LoRA file of the
  directory, fused for the request (:mod:`sdengine.extra_networks`); ``/sdapi/v1/loras`` lists them.
- ``alwayson_scripts.controlnet`` (the ControlNet extension's units) for an export with ControlNets in its
  UNet: each unit's image, weight, guidance start and end for the ControlNet its ``model`` names
  (:mod:`sdengine.webui_controlnet`); ``/controlnet/model_list`` lists them. Forge's
  "PerturbedAttentionGuidance Integrated" (``[enabled, scale]``) for a model that perturbs the middle
  block's self-attention (``export --pag-layers mid``): ``pag_scale`` (:mod:`sdengine.webui_pag`). Other
  scripts are refused.
- ``tiling`` (true): served by a seamless export (``sdengine export --seamless``), whose images always tile
  (and say so in their infotext, "Tiling: True"); refused by any other.
- What asks for something sdengine does not do (face restoration, scripts, styles, other samplers or
  upscalers) is refused, naming the field; fields that only steer the web
  UI's own bookkeeping (``save_images``, ``send_images``...) are accepted and left alone, and others are
  ignored and listed in the answer's ``info`` as ``ignored_fields``, as the web UI ignores fields it does
  not know.

``POST /sdapi/v1/options`` sets ``CLIP_stop_at_last_layers``, ``randn_source`` and the live previews'
options (:mod:`sdengine.webui_previews`) for later requests (beneath their own ``override_settings``) and
takes ``sd_model_checkpoint`` naming the model served; any other option is refused by name.
``POST /sdapi/v1/png-info`` reads a PNG's infotext back (:func:`parse_infotext`).

Answers are the web UI's: ``{"images": [base64 PNG], "parameters": {...}, "info": "<JSON>"}``, the info
holding each image's settings as the web UI's infotext too (:mod:`sdengine.infotext`); errors are
``{"error": type, "detail": message}`` with 400 (unreadable JSON), 404, 413 or 422. Generations take turns;
the server answers other requests meanwhile: ``GET /sdapi/v1/progress`` tells how far the one running is,
with its latest live preview (``current_image``), and ``POST /sdapi/v1/interrupt`` ends it between two
steps, its answer holding the images of the latents so far (the web UI's behaviour; later ``n_iter``
batches and a hires fix's second pass do not start); ``POST /sdapi/v1/skip`` ends only the batch running,
and the next ``n_iter`` batch starts. It has no
authentication: bind it to localhost (the default) or put it behind a proxy that has.
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image, UnidentifiedImageError

from sdengine.controlnet import CONTROLNET_CONFIG, exported_controlnets
from sdengine.errors import InvalidArgumentError, SDEngineError
from sdengine.extra_networks import lora_files, lora_hashes, lora_tags, resolve_loras
from sdengine.images import png_info, to_pil
from sdengine.infotext import parameters_infotext, parse_infotext
from sdengine.mask_crop import MaskCrop, cover_resize, fill_resize
from sdengine.model_dir import optional_json
from sdengine.pag import PAG_CONFIG, exported_pag
from sdengine.schedulers import load_scheduler
from sdengine.webui_controlnet import (
    Crop,
    control_settings,
    controlnet_name,
    only_masked,
    preprocessors,
)
from sdengine.webui_inpaint import Resize, WebUIInpaint, stretch
from sdengine.webui_pag import SCRIPT as PAG_SCRIPT
from sdengine.webui_pag import forge_pag
from sdengine.webui_previews import LIVE_PREVIEW_OPTIONS, live_preview, taesd_method
from sdengine.webui_samplers import SAMPLERS, SCHEDULES, sampler_of, scheduler_name
from sdengine.webui_schedules import SIGMA_SCHEDULES, schedule_sigmas

#: hr_upscaler values: the web UI's "Latent" enlarges the latents; "None" and "Lanczos" the image.
UPSCALERS = {"Latent": "latent", "None": "image", "Lanczos": "image"}
#: The web UI's ``resize_mode`` for images of another size than asked: stretched to it (Lanczos), resized to
#: cover it and cut to it, or resized to fit in it with the edges stretched over the rest.
RESIZE_MODES: dict[int, Resize] = {0: stretch, 1: cover_resize, 2: fill_resize}
#: Fields that change nothing here: the web UI's own bookkeeping, and ``image_cfg_scale``, which the web UI
#: too reads only for instruct-pix2pix models.
BOOKKEEPING = {
    "image_cfg_scale",
    "send_images",
    "save_images",
    "do_not_save_samples",
    "do_not_save_grid",
    "override_settings_restore_afterwards",
    "comments",
    "force_task_id",
    "infotext",
    "include_init_images",
    "disable_extra_networks",
}
#: Fields that ask for something sdengine does not do, unless they hold the value that asks for nothing.
UNSUPPORTED = {
    "restore_faces": (None, False),
    "styles": (None, []),
    "script_name": (None, ""),
    "script_args": (None, []),
    "seed_resize_from_h": (None, -1, 0),
    "seed_resize_from_w": (None, -1, 0),
    "hr_resize_x": (None, 0),
    "hr_resize_y": (None, 0),
    "hr_checkpoint_name": (None, ""),
    "hr_sampler_name": (None, ""),
    "hr_scheduler": (None, ""),
    "hr_prompt": (None, ""),
    "hr_negative_prompt": (None, ""),
    "firstpass_image": (None, ""),
    "firstphase_width": (None, 0),
    "firstphase_height": (None, 0),
    "latent_mask": (None, ""),
    "initial_noise_multiplier": (None, 1),
    "s_churn": (None, 0),
    "s_tmin": (None, 0),
    "s_tmax": (None, 0),
    "s_noise": (None, 1),
    "s_min_uncond": (None, 0),
}
#: The only ``eta`` each sampler runs with (the others take none): ancestral ones add all their noise, DDIM
#: none.
ETA = {"euler_a": 1, "dpmpp_2m_sde": 1, "dpmpp_2m_sde_karras": 1, "ddim": 0}
#: The fields this module reads.
READ = {
    "prompt",
    "negative_prompt",
    "steps",
    "cfg_scale",
    "width",
    "height",
    "seed",
    "subseed",
    "subseed_strength",
    "batch_size",
    "n_iter",
    "sampler_name",
    "sampler_index",
    "scheduler",
    "enable_hr",
    "hr_scale",
    "hr_upscaler",
    "hr_second_pass_steps",
    "denoising_strength",
    "override_settings",
    "init_images",
    "resize_mode",
    "mask",
    "mask_blur",
    "mask_blur_x",
    "mask_blur_y",
    "inpainting_mask_invert",
    "inpainting_fill",
    "inpaint_full_res",
    "inpaint_full_res_padding",
    "eta",
    "refiner_checkpoint",
    "refiner_switch_at",
    "alwayson_scripts",
    "tiling",
}
MAX_BODY = 64 * 2**20


def decode_image(data: str, field: str = "init_images", mode: str | None = "RGB") -> Image.Image:
    """A base64 image, with or without a ``data:image/...;base64,`` prefix, in ``mode`` (None: its own);
    ``field`` names it in the error."""
    try:
        raw = base64.b64decode(data.split(",", 1)[1] if data.startswith("data:") else data, validate=True)
        with Image.open(io.BytesIO(raw)) as image:
            return image.convert(mode) if mode else image.copy()
    except (ValueError, UnidentifiedImageError, AttributeError) as exc:
        raise InvalidArgumentError(f"{field}: not a base64 image ({exc})") from None


def decode_as_it_is(data: str, field: str) -> Image.Image:
    """A base64 image in its own mode (a ControlNet unit's, whose transparency is laid over white)."""
    return decode_image(data, field, mode=None)


def encode_png(image: Image.Image, parameters: dict[str, Any]) -> str:
    """``image`` as a base64 PNG recording ``parameters`` (:func:`sdengine.images.png_info`)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(parameters))
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _number(body: dict[str, Any], key: str, default: Any, kind: type) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and value != int(value))
    ):
        raise InvalidArgumentError(
            f"{key} must be {'a whole number' if kind is int else 'a number'}, got {value!r}"
        )
    return kind(value)


class Inpainting(NamedTuple):
    """A web UI inpainting request's mask settings, and where its results go (laid over the original)."""

    settings: WebUIInpaint
    placement: MaskCrop


class WebUIRequest(NamedTuple):
    """A web UI request read: the keyword arguments of one ``pipeline(...)`` call, its ``n_iter``, the
    fields it ignores, its inpainting (None without a mask) and its always-on scripts' infotext fields."""

    settings: dict[str, Any]
    n_iter: int
    ignored: list[str]
    inpainting: Inpainting | None = None
    #: the always-on scripts' infotext fields: the ControlNet extension's units as it records them
    #: (``"ControlNet i"`` -> their fields), Forge's perturbed-attention guidance's (sdengine.webui_pag)
    script_fields: dict[str, Any] | None = None


#: The options ``POST /sdapi/v1/options`` sets, for every later request (beneath its ``override_settings``,
#: which may set them too): clip skip, the noise source, the VAE decoding the images, and the live previews'
#: (:mod:`sdengine.webui_previews`)
SETTABLE_OPTIONS = ("CLIP_stop_at_last_layers", "randn_source", "sd_vae_decode_method", *LIVE_PREVIEW_OPTIONS)
#: ``sd_vae_decode_method`` -> the pipeline's ``decoder``
DECODE_METHODS = {"Full": "vae", "TAESD": "tiny"}
#: what ``GET /sdapi/v1/options`` answers for the options no request or ``POST`` has set
OPTION_DEFAULTS = {"sd_vae_decode_method": "Full", **LIVE_PREVIEW_OPTIONS}


#: The settings' key for a web UI schedule whose sigmas the handler computes (:func:`served_sigmas`).
SIGMA_SCHEDULE = "sigma_schedule"


def served_sigmas(pipeline: Any, schedule: str, scheduler: str, steps: int) -> tuple[float, ...]:
    """The sigmas of the web UI's ``schedule`` (:mod:`sdengine.webui_schedules`) for ``steps`` steps of the
    served model, whose scheduler ``scheduler`` then runs them."""
    alphas_cumprod = load_scheduler(scheduler, pipeline.model_dir.scheduler_config).alphas_cumprod()
    return schedule_sigmas(schedule, steps, alphas_cumprod, pipeline.model_dir.arch.xl)


def generation_settings(
    body: dict[str, Any],
    img2img: bool,
    refiner: bool = False,
    controlnets: Sequence[str] = (),
    pag_layers: Sequence[str] = (),
) -> WebUIRequest:
    """A web UI request read into a pipeline call's settings. InvalidArgumentError names a field sdengine
    cannot honour. ``refiner``: the pipeline has one; ``controlnets``: the names of the ControlNets in its
    UNet, which the ControlNet extension's units name (:mod:`sdengine.webui_controlnet`); ``pag_layers``:
    the layers whose self-attention its UNet can perturb, which Forge's PAG script needs
    (:mod:`sdengine.webui_pag`)."""
    if not isinstance(body, dict):
        raise InvalidArgumentError("the request body must be a JSON object")
    refused = [key for key, fine in UNSUPPORTED.items() if key in body and body[key] not in fine]
    if refused:
        raise InvalidArgumentError(f"not supported: {', '.join(sorted(refused))}")
    ignored = sorted(set(body) - READ - BOOKKEEPING - set(UNSUPPORTED))
    settings: dict[str, Any] = {
        "prompt": body.get("prompt") or "",
        "negative_prompt": body.get("negative_prompt") or "",
        "steps": _number(body, "steps", 50, int),
        "guidance": _number(body, "cfg_scale", 7.0, float),
        "width": _number(body, "width", 512, int),
        "height": _number(body, "height", 512, int),
        "batch": _number(body, "batch_size", 1, int),
        "scheduler": scheduler_name(
            body.get("sampler_name") or body.get("sampler_index"), body.get("scheduler")
        ),
        "prompt_weights": "a1111",
        "long_prompts": True,
    }
    schedule = SCHEDULES.get(body.get("scheduler"), body.get("scheduler"))
    if schedule in SIGMA_SCHEDULES:  # its sigmas are the model's: served_sigmas computes them
        settings[SIGMA_SCHEDULE] = schedule
    eta = _number(body, "eta", None, float)
    if eta is not None and settings["scheduler"] in ETA and eta != ETA[settings["scheduler"]]:
        raise InvalidArgumentError(
            f"eta {eta:g} is not supported with this sampler (only {ETA[settings['scheduler']]})"
        )
    seed = _number(body, "seed", -1, int)
    settings["seed"] = None if seed == -1 else seed
    strength = _number(body, "subseed_strength", 0.0, float)
    if strength:
        subseed = _number(body, "subseed", -1, int)
        settings["variation_seed"] = (
            int(np.random.default_rng().integers(2**63)) if subseed == -1 else subseed
        )
        settings["variation_strength"] = strength
    overrides = body.get("override_settings") or {}
    if not isinstance(overrides, dict) or set(overrides) - set(SETTABLE_OPTIONS):
        raise InvalidArgumentError(f"override_settings: only {', '.join(SETTABLE_OPTIONS)} are supported")
    source = overrides.get("randn_source")
    if source is not None:
        if source != "CPU":
            raise InvalidArgumentError(
                f'override_settings.randn_source: only "CPU" (PyTorch\'s CPU generator) is drawn alike, '
                f"not {source!r}"
            )
        settings["noise_source"] = "torch-cpu"
    method = overrides.get("sd_vae_decode_method", "Full")
    if method not in DECODE_METHODS:
        raise InvalidArgumentError(
            f"override_settings.sd_vae_decode_method must be Full or TAESD, got {method!r}"
        )
    if DECODE_METHODS[method] != "vae":
        settings["decoder"] = DECODE_METHODS[method]
    clip = _number(overrides, "CLIP_stop_at_last_layers", 1, int)
    settings["clip_skip"] = clip - 1  # the web UI's 1 is the last layer
    denoising = _number(body, "denoising_strength", None, float)
    inpainting, init_image = None, None
    if not img2img and body.get("mask"):
        raise InvalidArgumentError("mask: inpainting is img2img's (/sdapi/v1/img2img)")
    if img2img:
        images = body.get("init_images")
        if not isinstance(images, list) or not images:
            raise InvalidArgumentError("init_images: give a list of one base64 image (or one per batch item)")
        resize_mode = _number(body, "resize_mode", 0, int)
        if resize_mode not in RESIZE_MODES:
            raise InvalidArgumentError(
                f"resize_mode {resize_mode} is not supported; use 0 (just resize), 1 (crop and resize) or 2 "
                "(resize and fill)"
            )
        resize = RESIZE_MODES[resize_mode]
        size = (settings["width"], settings["height"])
        decoded = [decode_image(data) for data in images]
        init_image = decoded[0]
        settings["strength"] = 0.75 if denoising is None else denoising
        if body.get("mask"):
            if len(decoded) != 1:
                raise InvalidArgumentError("init_images: inpainting (a mask) takes one init image")
            inpaint = WebUIInpaint.from_body(body, decode_image(body["mask"], "mask", mode=None))
            placement, settings["image"], settings["mask"] = inpaint.prepare(decoded[0], *size, resize)
            settings["masked_content"] = inpaint.masked_content
            inpainting = Inpainting(inpaint, placement)
        else:
            resized = [image if image.size == size else resize(image, *size) for image in decoded]
            settings["image"] = resized[0] if len(resized) == 1 else resized
    elif body.get("enable_hr"):
        upscaler = body.get("hr_upscaler") or "Latent"
        if upscaler not in UPSCALERS:
            raise InvalidArgumentError(
                f"hr_upscaler {upscaler!r} is not supported; use {', '.join(UPSCALERS)}"
            )
        second = _number(body, "hr_second_pass_steps", 0, int)
        settings.update(
            hires_scale=_number(body, "hr_scale", 2.0, float),
            hires_upscale=UPSCALERS[upscaler],
            hires_steps=second or None,
            hires_strength=denoising or None,
        )
    if body.get("refiner_checkpoint") and not refiner:
        raise InvalidArgumentError("refiner_checkpoint: this server has no refiner (serve --refiner DIR)")
    switch = _number(body, "refiner_switch_at", None, float)
    if refiner and switch is not None:
        settings["refiner_switch"] = switch
    size = settings["width"], settings["height"]
    crop = unit_crop(inpainting, *size)
    scripts = body.get("alwayson_scripts")
    pag_scale, pag_fields = forge_pag(scripts, pag_layers)
    if pag_scale:
        settings["pag_scale"] = pag_scale
    if isinstance(scripts, dict):  # the ControlNet extension's are the others
        scripts = {name: value for name, value in scripts.items() if str(name).lower() != PAG_SCRIPT}
    control = control_settings(scripts, controlnets, *size, init_image, decode_as_it_is, crop)
    settings.update(control.settings)
    n_iter = _number(body, "n_iter", 1, int)
    if n_iter < 1:
        raise InvalidArgumentError(f"n_iter must be at least 1, got {n_iter}")
    return WebUIRequest(settings, n_iter, ignored, inpainting, {**control.infotexts, **pag_fields})


def unit_crop(inpainting: Inpainting | None, width: int, height: int) -> Crop | None:
    """The cut of ControlNet units' images to an "only masked" inpainting's box, if the request is one."""
    if inpainting is None or not inpainting.settings.full_res:
        return None
    return only_masked(inpainting.placement, width, height)


def served_pag_layers(pipeline: Any) -> tuple[str, ...]:
    """The layers whose self-attention the served model's UNet can perturb (none where it cannot): the torch
    backend's, or an export's record."""
    if hasattr(pipeline, "pag_layers"):
        return tuple(pipeline.pag_layers)
    return exported_pag(optional_json(pipeline.model_dir.root / PAG_CONFIG))


def served_controlnets(pipeline: Any) -> list[str]:
    """The names of the ControlNets in the served export's UNet, in its order (none for a checkpoint)."""
    entries = exported_controlnets(optional_json(pipeline.model_dir.root / CONTROLNET_CONFIG))
    return [controlnet_name(str(entry.get("dir", ""))) for entry in entries]


def served_taesd(pipeline: Any) -> str | None:
    """The preview method the web UI's "TAESD" live previews are for the model served, if any."""
    return taesd_method(getattr(pipeline, "tiny_previews", False), pipeline.model_dir.arch.tiny_vae)


class Job:
    """The generation the server runs (one at a time): how far it is, for ``/progress``, and the flags that
    ``/interrupt`` (end the request) and ``/skip`` (end the batch running, go on with the next) raise."""

    def __init__(self) -> None:
        self.running = threading.Lock()  # held for a whole request: its batches, then the next request's
        self.interrupted = threading.Event()
        self.skipped = threading.Event()
        self._state = threading.Lock()
        self.begin(0)

    def begin(self, job_count: int) -> None:
        with self._state:
            self.job_count, self.job_no, self.step, self.steps = job_count, 0, 0, 0
            self.started = time.monotonic()
            self.current_image: str | None = None
        self.interrupted.clear()

    def show(self, image: str) -> None:
        """A live preview of the generation (:mod:`sdengine.webui_previews`): ``/progress``'s
        ``current_image`` until the next."""
        with self._state:
            self.current_image = image

    def next_batch(self, job_no: int) -> None:
        with self._state:
            self.job_no, self.step, self.steps = job_no, 0, 0
        self.skipped.clear()

    def stop(self) -> bool:
        """The pipeline's ``stop``: whether the batch running ends here."""
        return self.interrupted.is_set() or self.skipped.is_set()

    def progress(self, calls: Iterable[int]) -> Iterator[int]:
        """The pipeline's ``progress`` wrapper: counts each pass's steps as they run."""
        calls = list(calls)
        with self._state:
            self.step, self.steps = 0, len(calls)
        for call in calls:
            yield call
            with self._state:
                self.step += 1

    def report(self, skip_current_image: bool = False) -> dict[str, Any]:
        """``/sdapi/v1/progress``'s answer, as the web UI gives it: with the latest live preview, unless
        ``skip_current_image``."""
        with self._state:
            done = (
                (self.job_no + (self.step / self.steps if self.steps else 0)) / self.job_count
                if self.job_count
                else 0
            )
            elapsed = time.monotonic() - self.started
            state = {
                "skipped": self.skipped.is_set(),
                "interrupted": self.interrupted.is_set(),
                "job": "txt2img/img2img" if self.job_count else "",
                "job_count": self.job_count,
                "job_no": self.job_no,
                "sampling_step": self.step,
                "sampling_steps": self.steps,
            }
            image = None if skip_current_image else self.current_image
        eta = elapsed / done - elapsed if 0 < done < 1 else 0.0
        return {
            "progress": done,
            "eta_relative": eta,
            "state": state,
            "current_image": image,
            "textinfo": None,
        }


def run_request(
    pipeline: Any,
    body: dict[str, Any],
    img2img: bool,
    job: Job | None = None,
    lora_dir: str | os.PathLike | None = None,
    base_loras: Sequence[tuple[Path, float]] = (),
) -> dict[str, Any]:
    """A web UI API request run on ``pipeline``: the answer's JSON object. ``job``: where its progress goes
    and its interruption comes from. The prompt's ``<lora:NAME:WEIGHT>`` tags (:mod:`sdengine.extra_networks`)
    fuse files of ``lora_dir`` for this request, after ``base_loras`` (those the pipeline came with); the
    answer and the pictures' infotexts keep the prompt as given, tags and all, as the web UI's do, with
    their files' ``Lora hashes``."""
    refiner = getattr(pipeline, "refiner", None) is not None
    names = served_controlnets(pipeline)
    settings, n_iter, ignored, inpainting, fields = generation_settings(
        body, img2img, refiner, names, served_pag_layers(pipeline)
    )
    fields = fields or {}
    if body.get("tiling") and not getattr(pipeline, "seamless", False):
        raise InvalidArgumentError(
            "tiling: the model served is not seamless (export it with sdengine export --seamless)"
        )
    preview = live_preview(body.get("override_settings") or {}, served_taesd(pipeline))
    schedule = settings.pop(SIGMA_SCHEDULE, None)
    if schedule is not None:  # for each pass: the hires fix's second has steps of its own
        settings["sigmas"] = served_sigmas(pipeline, schedule, settings["scheduler"], settings["steps"])
        if "hires_scale" in settings:
            steps = settings.pop("hires_steps") or settings["steps"]
            settings["hires_sigmas"] = served_sigmas(pipeline, schedule, settings["scheduler"], steps)
    typed = settings["prompt"]
    settings["prompt"], tags = lora_tags(typed)
    loras = resolve_loras(tags, lora_dir)
    tagged = {"prompt": typed, "lora_hashes": lora_hashes(tags, loras)} if tags else {}
    tagged |= {"script_fields": fields} if fields else {}
    if loras and not hasattr(pipeline, "set_loras"):
        raise InvalidArgumentError("LoRA tags need the ort backend, which fuses LoRAs at run time")
    job = job or Job()
    with job.running:  # one request at a time: its batches, then the next request's
        if hasattr(pipeline, "set_loras"):
            pipeline.set_loras([*base_loras, *loras])
        job.begin(n_iter)
        prompt, negative = settings.pop("prompt"), settings.pop("negative_prompt")
        settings.update(progress=job.progress, stop=job.stop)
        if preview is not None and preview.every > 0:

            def show(calls: int, latents: np.ndarray) -> None:
                job.show(preview.encode(pipeline.preview_images(latents, preview.method)))

            settings.update(preview=show, preview_every=preview.every)
        images, infotexts, seeds, nsfw, first = [], [], [], [], None
        laid = {} if inpainting is None else inpainting.settings.parameters(inpainting.placement)
        laid |= {} if schedule is None else {"schedule_type": schedule}
        for n in range(n_iter):
            if n and job.interrupted.is_set():
                break
            job.next_batch(n)
            if n:  # later batches go on from the first's seeds (and variation seeds), as the web UI's do
                settings["seed"] = first.request.seed + n * first.request.batch
                if first.request.variation_strength:
                    settings["variation_seed"] = first.request.variation_seed + n * first.request.batch
            result = pipeline(prompt, negative, **settings)
            first = first or result
            array = result.array
            if inpainting is not None:  # the results laid over the original, as the web UI lays them
                array = inpainting.placement.paste(array)
            model = {"model": pipeline.model_dir.root.name, "backend": result.backend}
            for i, image in enumerate(to_pil(array)):
                parameters = {**result.request.parameters(i), **laid, **model, **tagged}
                images.append(encode_png(image, parameters))
                infotexts.append(parameters_infotext(parameters))
            seeds += list(result.request.seeds)
            if preview is not None and preview.every == -1:  # the web UI's "after completion of batch"
                full = preview.method == "full"  # the batch's own images, decoded already
                job.show(
                    preview.encode(
                        to_pil(array) if full else pipeline.preview_images(result.latents, preview.method)
                    )
                )
            nsfw += result.nsfw or [False] * result.request.batch
    request = first.request
    extra = {} if inpainting is None else inpainting.settings.generation_params()
    extra |= fields
    if tags:
        extra["Lora hashes"] = tagged["lora_hashes"]
    info = {
        "prompt": typed,
        "negative_prompt": negative,
        "all_prompts": [typed] * len(seeds),
        "all_negative_prompts": [negative] * len(seeds),
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": request.variation_seed if request.variation_strength else -1,
        "subseed_strength": request.variation_strength,
        "width": request.hires.width if request.hires else request.width,
        "height": request.hires.height if request.hires else request.height,
        "sampler_name": sampler_of(request.scheduler)[0],
        "scheduler": schedule or sampler_of(request.scheduler)[1],
        "cfg_scale": request.guidance,
        "steps": request.steps,
        "batch_size": request.batch,
        "clip_skip": request.clip_skip + 1,
        "denoising_strength": request.strength
        if img2img
        else (request.hires.strength if request.hires else 0),
        "nsfw": nsfw,
        "refiner_switch_at": request.refiner_switch,
        "extra_generation_params": extra,
        "extra_networks": [{"lora": tag.name, "weight": tag.weight} for tag in tags],
        "interrupted": job.interrupted.is_set(),
        "backend": first.backend,
        "ignored_fields": ignored,
        "infotexts": infotexts,
    }
    return {"images": images, "parameters": body_without_images(body), "info": json.dumps(info)}


def set_options(options: dict[str, Any], body: Any, model: str, taesd: str | None = None) -> None:
    """``POST /sdapi/v1/options``: ``sd_model_checkpoint`` may name the model served (the only one), and
    :data:`SETTABLE_OPTIONS` hold for later requests; any other option is refused, naming it, and a refused
    request changes nothing. Answers null, as the web UI does."""
    if not isinstance(body, dict):
        raise InvalidArgumentError("the request body must be a JSON object")
    unknown = sorted(set(body) - {"sd_model_checkpoint", *SETTABLE_OPTIONS})
    if unknown:
        raise InvalidArgumentError(f"options not supported: {', '.join(unknown)}")
    checkpoint = body.get("sd_model_checkpoint")
    if checkpoint is not None and checkpoint != model:
        raise InvalidArgumentError(
            f"sd_model_checkpoint: this server serves {model!r} only, not {checkpoint!r}"
        )
    settings = {key: body[key] for key in SETTABLE_OPTIONS if key in body}
    generation_settings({"override_settings": settings}, img2img=False)  # refuses a value it cannot honour
    live_preview({**options, **settings}, taesd)
    if settings.get("sd_vae_decode_method") == "TAESD" and taesd is None:
        raise InvalidArgumentError(
            "sd_vae_decode_method TAESD: the model served has no tiny VAE's decoder (export it with "
            "--preview-vae DIR)"
        )
    options.update(settings)


def png_info_answer(body: Any) -> dict[str, Any]:
    """``POST /sdapi/v1/png-info``: a PNG's infotext (its ``parameters`` chunk), read back into fields as the
    web UI reads it, and its other text chunks."""
    image = decode_image(body.get("image") if isinstance(body, dict) else None, "image", mode=None)
    text = {key: value for key, value in image.info.items() if isinstance(value, str)}  # its text chunks
    info = text.pop("parameters", "")
    return {"info": info, "items": text, "parameters": parse_infotext(info) if info else {}}


def body_without_images(body: dict[str, Any]) -> dict[str, Any]:
    """The request's fields as the answer echoes them (the web UI's ``parameters``), input images and mask
    left out."""
    return {k: v for k, v in body.items() if k not in ("init_images", "mask")}


class Handler(BaseHTTPRequestHandler):
    """The web UI's routes over one loaded pipeline (``server.pipeline``)."""

    server_version = "sdengine"

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        pipeline = self.server.pipeline  # type: ignore[attr-defined]
        name = pipeline.model_dir.root.name
        query = parse_qs(urlsplit(self.path).query)
        skip_image = query.get("skip_current_image", ["false"])[-1].lower() in ("true", "1")
        routes: dict[str, Callable[[], Any]] = {
            "/sdapi/v1/samplers": lambda: [
                {"name": n, "aliases": [s], "options": {}} for n, s in SAMPLERS.items()
            ],
            "/sdapi/v1/schedulers": lambda: [
                {"name": n, "label": label, "aliases": None} for n, label in SCHEDULES.items()
            ],
            "/sdapi/v1/upscalers": lambda: [{"name": n} for n in UPSCALERS],
            "/sdapi/v1/loras": lambda: [
                {"name": n, "alias": n, "path": str(p), "metadata": {}}
                for n, p in self.server_loras().items()
            ],
            "/sdapi/v1/sd-models": lambda: [
                {"title": name, "model_name": name, "filename": str(pipeline.model_dir.root)}
            ],
            "/sdapi/v1/options": lambda: {
                "sd_model_checkpoint": name,
                **OPTION_DEFAULTS,
                **self.server.options,  # type: ignore[attr-defined]
            },
            "/sdapi/v1/progress": lambda: self.server.job.report(skip_image),  # type: ignore[attr-defined]
            # the ControlNet extension's: the ControlNets in the export's UNet, and no preprocessors
            "/controlnet/model_list": lambda: {"model_list": served_controlnets(pipeline)},
            "/controlnet/module_list": lambda: {"module_list": preprocessors(), "module_detail": {}},
        }
        route = routes.get(self.path.split("?", 1)[0])
        if route is None:
            return self._answer(
                HTTPStatus.NOT_FOUND, {"error": "NotFound", "detail": f"no route {self.path}"}
            )
        self._answer(HTTPStatus.OK, route())

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        server = self.server
        routes: dict[str, Callable[[Any], Any]] = {
            "/sdapi/v1/txt2img": lambda body: self.generate(body, img2img=False),
            "/sdapi/v1/img2img": lambda body: self.generate(body, img2img=True),
            "/sdapi/v1/options": lambda body: set_options(
                server.options,  # type: ignore[attr-defined]
                body,
                server.pipeline.model_dir.root.name,  # type: ignore[attr-defined]
                served_taesd(server.pipeline),  # type: ignore[attr-defined]
            ),
            "/sdapi/v1/png-info": png_info_answer,
        }
        if path in ("/sdapi/v1/interrupt", "/sdapi/v1/skip"):
            job = server.job  # type: ignore[attr-defined]
            (job.interrupted if path.endswith("interrupt") else job.skipped).set()
            return self._answer(HTTPStatus.OK, {})
        if path not in routes:
            return self._answer(
                HTTPStatus.NOT_FOUND, {"error": "NotFound", "detail": f"no route {self.path}"}
            )
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            return self._answer(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                {"error": "TooLarge", "detail": f"request body over {MAX_BODY} bytes"},
            )
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return self._answer(HTTPStatus.BAD_REQUEST, {"error": "BadJSON", "detail": str(exc)})
        try:
            answer = routes[path](body)
        except SDEngineError as exc:
            return self._answer(
                HTTPStatus.UNPROCESSABLE_ENTITY, {"error": type(exc).__name__, "detail": str(exc)}
            )
        except Exception as exc:  # the server stays up for the next request
            self.log_message("failed: %r", exc)
            return self._answer(
                HTTPStatus.INTERNAL_SERVER_ERROR, {"error": type(exc).__name__, "detail": str(exc)}
            )
        self._answer(HTTPStatus.OK, answer)

    def generate(self, body: Any, img2img: bool) -> dict[str, Any]:
        """A txt2img or img2img request, with the options set on the server beneath its own overrides."""
        server = self.server
        options = server.options  # type: ignore[attr-defined]
        if options and isinstance(body, dict) and isinstance(body.get("override_settings") or {}, dict):
            body = {**body, "override_settings": {**options, **(body.get("override_settings") or {})}}
        return run_request(
            server.pipeline,  # type: ignore[attr-defined]
            body,
            img2img,
            server.job,  # type: ignore[attr-defined]
            server.lora_dir,  # type: ignore[attr-defined]
            server.base_loras,  # type: ignore[attr-defined]
        )

    def _answer(self, status: HTTPStatus, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def server_loras(self) -> dict[str, Path]:
        """The LoRA files of the server's directory, by name (none without one)."""
        directory = self.server.lora_dir  # type: ignore[attr-defined]
        return {} if directory is None else lora_files(directory)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        print(f"sdengine serve: {self.address_string()} {format % args}", file=sys.stderr)


def make_server(
    pipeline: Any, host: str = "127.0.0.1", port: int = 7860, lora_dir: str | os.PathLike | None = None
) -> ThreadingHTTPServer:
    """A server for ``pipeline`` on ``host``:``port`` (0: any free port; ``server.server_address`` says
    which), not yet serving: call ``serve_forever()``. ``lora_dir``: where prompts' ``<lora:NAME:WEIGHT>``
    tags find their files (``/sdapi/v1/loras`` lists them)."""
    if lora_dir is not None and not Path(lora_dir).is_dir():
        raise InvalidArgumentError(f"LoRA directory {lora_dir} does not exist")
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.pipeline = pipeline  # type: ignore[attr-defined]
    server.job = Job()  # type: ignore[attr-defined]
    server.lora_dir = lora_dir  # type: ignore[attr-defined]
    server.base_loras = list(getattr(pipeline, "loras", []))  # type: ignore[attr-defined]
    server.options = {}  # type: ignore[attr-defined]  # what POST /sdapi/v1/options set
    return server


def serve_in_thread(
    pipeline: Any, host: str = "127.0.0.1", port: int = 0, lora_dir: str | os.PathLike | None = None
) -> ThreadingHTTPServer:
    """:func:`make_server`, serving from a daemon thread (for embedding, and tests); ``shutdown()`` stops
    it."""
    server = make_server(pipeline, host, port, lora_dir)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
