"""The denoising step as a small ONNX model, so that every backend runs the same step code.

One model does everything between two UNet calls, with every per-step value read from tables by a step index
that the model itself advances:

    eps        = uncond + g * (cond - uncond)         classifier-free guidance (when the batch is doubled)
    eps        = uncond + g * sum_k w_k (cond_k - uncond)     ... composable prompts' K parts, weighted
    eps        = r * eps * std(cond) / std(eps) + (1 - r) * eps       guidance rescale, when asked for
    eps        = uncond + g * (d_orth + eta * d_par)  ... or adaptive projected guidance (sdengine.apg), whose
                                                      running average of d is the last history buffer
    [x', h']   = coeffs[i] @ [x, eps, noise[i], h]    the scheduler update (one MatMul; see schedulers)
    x'         = m * x' + (1 - m) * (a[i+1] * image + b[i+1] * noise0)     inpainting, plain UNet only
    unet_input = [x' * input_scale[i + 1]] * G        the next UNet call's input (G = 2 with guidance, 1 + K)
                 (+ [mask, masked image latents] on the channel axis: inpainting with a 9-channel UNet)
    timestep   = timesteps[i + 1]                     ... and its timestep, shaped as the UNet wants
    scales     = control_scales[i + 1]                ... and its ControlNets' weights, where it has any
    context    = contexts[context_index[i + 1]]       ... and its text embeddings, where prompts are edited
    pooled     = pooled[context_index[i + 1]]         ... and SDXL's pooled text embeddings with them
    i'         = i + 1

Because the tables, the noise and the index live in the model's inputs, a GPU backend keeps them in device
memory and replays the step with no host work in between; the CPU backend runs the very same model with
ONNX Runtime. Shapes are static (the model is built for one batch and latent size), so it captures into a CUDA
graph as a whole. History is padded to :data:`MAX_HISTORY` buffers so one model serves every scheduler (and
adaptive projected guidance's running average).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from sdengine.model_specs import CONDITIONING_SCALE, TEXT_EMBEDS
from sdengine.schedulers import Schedule

#: History buffers the step model carries: the schedulers' (PNDM needs the most: 4), and one for adaptive
#: projected guidance's running average.
MAX_HISTORY = 5
OPSET = 17
IR_VERSION = 8

STEP_OUTPUTS = ("next_sample", "next_history", "next_step_index", "unet_input", "unet_timestep")
#: Inputs of inpainting with a plain (4-channel) UNet: after each step the area outside the mask is the image
#: noised to the next timestep, as diffusers' ``StableDiffusionInpaintPipeline`` does.
BLEND_INPUTS = ("keep_mask", "image_latents", "image_noise", "noise_scales")
#: Composable prompts (:mod:`sdengine.composable`): each call's weight of each part for each image,
#: (S, K, B, 1, 1, 1).
PART_WEIGHTS = "part_weights"
#: Input of inpainting with an inpainting (9-channel) UNet: the channels after the latents, fixed for the run.
CONDITIONING_INPUT = "unet_conditioning"
#: ControlNet: the table of each call's ControlNet weights, and the output that gives the next call's.
CONTROL_SCALES = "control_scales"
CONTROL_SCALE_OUTPUT = "unet_conditioning_scale"
#: Adaptive projected guidance (:mod:`sdengine.apg`): its (eta, norm_threshold, momentum), (3,).
APG_INPUT = "apg"
#: ... and the history buffer that holds its running average of cond - uncond (its momentum's), the last,
#: which no scheduler uses.
APG_SLOT = MAX_HISTORY - 1
#: Prompt editing: every set of text embeddings the run reads, which set each call reads, and the output that
#: gives the next call's.
CONTEXTS, CONTEXT_INDEX, CONTEXT_OUTPUT = "contexts", "context_index", "unet_context"
#: ... and on SDXL, each set's pooled text embeddings, and the output that gives the next call's.
POOLED, POOLED_OUTPUT = "pooled_contexts", "unet_text_embeds"
#: The step model's outputs that are the next UNet call's inputs besides its sample and timestep: the UNet
#: input each one feeds, by output.
CALL_INPUTS = {
    CONTROL_SCALE_OUTPUT: CONDITIONING_SCALE,
    CONTEXT_OUTPUT: "encoder_hidden_states",
    POOLED_OUTPUT: TEXT_EMBEDS,
}


@dataclass(frozen=True, eq=False)
class Blend:
    """Inpainting with a plain UNet: what is kept of each step's result, and the image it is blended with."""

    keep_mask: np.ndarray  # (B, 1, h, w) float32: 1 where the denoised latents are kept, 0 where the image is
    image_latents: np.ndarray  # (B, C, h, w) float32: the image's latents (scaled)
    image_noise: np.ndarray  # (B, C, h, w) float32: the unit noise they are noised with (the initial draw)


@dataclass(frozen=True, eq=False)
class StepTables:
    """A schedule's per-step values, padded for the step model, and the run's other constant inputs of the
    step model (inpainting's); uploaded once per generation."""

    coeffs: np.ndarray  # (S, 1 + MAX_HISTORY, 3 + MAX_HISTORY) float32
    timesteps: np.ndarray  # (S + 1,) float32: one spare entry, read (and unused) after the last step
    input_scales: np.ndarray  # (S + 1,) float32
    noise: np.ndarray  # (S, B, C, h, w) float32: per-step noise (zeros where the scheduler draws none)
    #: (S + 1, 2) float32: add_noise's (image, noise) factors for the image blended in after each step; the
    #: last row, after the last step, is (1, 0): the image itself. With ``blend`` only.
    noise_scales: np.ndarray | None = None
    blend: Blend | None = None
    #: (G * B, E, h, w) float32: the UNet input's channels after the latents (inpainting UNets: the mask and
    #: the masked image's latents), the same for every call
    unet_conditioning: np.ndarray | None = None
    #: () float32: guidance rescale's factor (Lin et al. 2023, sec. 3.4), with classifier-free guidance only
    guidance_rescale: np.ndarray | None = None
    #: (S + 1, ControlNets) float32: each call's ControlNet weights (0 outside a ControlNet's share of the
    #: schedule); one spare row, read (and unused) after the last step
    control_scales: np.ndarray | None = None
    #: (sets, G * B, sequence, hidden) float32: each set of text embeddings an edited prompt reads
    #: (:mod:`sdengine.prompt_editing`), and (S + 1,) int64: the set each call reads, one spare entry
    contexts: np.ndarray | None = None
    context_index: np.ndarray | None = None
    #: (sets, G * B, pooled) float32: SDXL, each set's pooled text embeddings
    pooled: np.ndarray | None = None
    #: (S, K, B, 1, 1, 1) float32: composable prompts (and perturbed-attention guidance), each call's weight
    #: of each part for each image (G = 1 + K)
    part_weights: np.ndarray | None = None
    #: (3,) float32: adaptive projected guidance's (eta, norm_threshold, momentum), with classifier-free
    #: guidance only (sdengine.apg)
    apg: np.ndarray | None = None

    @property
    def num_calls(self) -> int:
        return len(self.coeffs)

    @property
    def context_sets(self) -> int:
        """How many sets of text embeddings the calls read from the step model (0: the UNet keeps one)."""
        return 0 if self.contexts is None else len(self.contexts)

    @property
    def pooled_size(self) -> int:
        """The width of the pooled text embeddings the calls read from the step model (0: none)."""
        return 0 if self.pooled is None else self.pooled.shape[-1]

    @property
    def parts(self) -> int:
        """K, the composable prompts' parts guidance sums (0: plain guidance, or none)."""
        return 0 if self.part_weights is None else self.part_weights.shape[1]

    @property
    def controls(self) -> int:
        """How many ControlNets the UNet runs (0: none)."""
        return 0 if self.control_scales is None else self.control_scales.shape[1]

    @property
    def conditioning_channels(self) -> int:
        return 0 if self.unet_conditioning is None else self.unet_conditioning.shape[1]

    def inputs(self) -> dict[str, np.ndarray]:
        """The step model's inputs that stay the same for the whole run (all but the state, the UNet's
        output and the guidance scale), by name."""
        arrays = {
            "coeffs": self.coeffs,
            "timesteps": self.timesteps,
            "input_scales": self.input_scales,
            "noise": self.noise,
        }
        if self.blend is not None:
            arrays.update(
                keep_mask=self.blend.keep_mask,
                image_latents=self.blend.image_latents,
                image_noise=self.blend.image_noise,
                noise_scales=self.noise_scales,
            )
        if self.unet_conditioning is not None:
            arrays[CONDITIONING_INPUT] = self.unet_conditioning
        if self.guidance_rescale is not None:
            arrays["guidance_rescale"] = self.guidance_rescale
        if self.control_scales is not None:
            arrays[CONTROL_SCALES] = self.control_scales
        if self.contexts is not None:
            arrays[CONTEXTS], arrays[CONTEXT_INDEX] = self.contexts, self.context_index
        if self.pooled is not None:
            arrays[POOLED] = self.pooled
        if self.part_weights is not None:
            arrays[PART_WEIGHTS] = self.part_weights
        if self.apg is not None:
            arrays[APG_INPUT] = self.apg
        return arrays

    def outputs(self) -> tuple[str, ...]:
        """The step model's outputs, in order: :data:`STEP_OUTPUTS`, then those of :data:`CALL_INPUTS` the
        run has (the next call's ControlNet weights, its text embeddings, its pooled ones)."""
        extra = (CONTROL_SCALE_OUTPUT,) * bool(self.controls) + (CONTEXT_OUTPUT,) * bool(self.context_sets)
        return STEP_OUTPUTS + extra + (POOLED_OUTPUT,) * bool(self.pooled_size)

    def first_call_inputs(self) -> dict[str, np.ndarray]:
        """The first UNet call's values of the inputs that the step model gives every later call (by UNet
        input name)."""
        inputs = {}
        if self.control_scales is not None:
            inputs[CONDITIONING_SCALE] = self.control_scales[0]
        if self.contexts is not None:
            inputs[CALL_INPUTS[CONTEXT_OUTPUT]] = self.contexts[self.context_index[0]]
        if self.pooled is not None:
            inputs[CALL_INPUTS[POOLED_OUTPUT]] = self.pooled[self.context_index[0]]
        return inputs


def unet_copies(guidance: bool, parts: int = 0) -> int:
    """G, how many copies of the latents the UNet's batch holds: 1 without guidance, 2 with it (negative,
    positive), 1 + ``parts`` for composable prompts of that many parts; ``parts`` alone without guidance's
    negative side (perturbed-attention guidance's two, at a scale <= 1)."""
    return int(guidance) + max(parts, 1)


def step_tables(
    schedule: Schedule,
    noise: np.ndarray,
    *,
    blend: Blend | None = None,
    unet_conditioning: np.ndarray | None = None,
    guidance_rescale: float | None = None,
    control_scales: np.ndarray | None = None,
    contexts: np.ndarray | None = None,
    context_index: np.ndarray | None = None,
    pooled: np.ndarray | None = None,
    part_weights: np.ndarray | None = None,
    apg: np.ndarray | None = None,
) -> StepTables:
    """Pad ``schedule``'s coefficient rows to :data:`MAX_HISTORY` history buffers. ``control_scales``: each
    call's ControlNet weights, (calls, ControlNets). ``contexts`` (sets, G * B, sequence, hidden) and
    ``context_index`` (calls,): edited prompts' text embeddings, and the set each call reads; ``pooled``
    (sets, G * B, pooled): SDXL's pooled embeddings of those sets. ``part_weights`` (K, B, 1, 1, 1), the
    same for every call, or (calls, K, B, 1, 1, 1): composable prompts' weights (perturbed-attention
    guidance's, whose adaptive scale changes them call by call). ``apg`` (3,): adaptive projected
    guidance's settings (:mod:`sdengine.apg`), whose running average takes the last history buffer.

    Row ``r`` / column ``c`` of the scheduler's ``(1 + K, 3 + K)`` matrix keep their place; the extra history
    rows and columns are zero, so unused buffers stay zero and never contribute.
    """
    if pooled is not None and (contexts is None or len(pooled) != len(contexts)):
        raise ValueError("pooled text embeddings come with the sets of text embeddings they belong to")
    k = schedule.history_size
    if k > APG_SLOT:
        raise ValueError(
            f"schedule keeps {k} history buffers; the step model carries {APG_SLOT} for schedulers"
        )
    s = len(schedule.timesteps)
    coeffs = np.zeros((s, 1 + MAX_HISTORY, 3 + MAX_HISTORY), np.float32)
    coeffs[:, : 1 + k, : 3 + k] = schedule.coeffs
    f32 = lambda a: None if a is None else np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    return StepTables(
        coeffs=coeffs,
        timesteps=np.append(schedule.timesteps, schedule.timesteps[-1]).astype(np.float32),
        input_scales=np.append(schedule.input_scale, schedule.input_scale[-1]).astype(np.float32),
        noise=f32(noise),
        noise_scales=None
        if blend is None
        else np.append(schedule.noise_scales, [[1.0, 0.0]], axis=0).astype(np.float32),
        blend=None
        if blend is None
        else Blend(f32(blend.keep_mask), f32(blend.image_latents), f32(blend.image_noise)),
        unet_conditioning=f32(unet_conditioning),
        guidance_rescale=None if guidance_rescale is None else np.array(guidance_rescale, np.float32),
        control_scales=None
        if control_scales is None
        else np.concatenate([control_scales, control_scales[-1:]]).astype(np.float32),
        contexts=f32(contexts),
        context_index=None
        if context_index is None
        else np.append(context_index, context_index[-1]).astype(np.int64),
        pooled=f32(pooled),
        part_weights=None
        if part_weights is None
        else f32(np.broadcast_to(part_weights, (s, *np.shape(part_weights)[-5:]))),
        apg=f32(apg),
    )


def timestep_shape(declared_rank: int, unet_batch: int) -> tuple[int, ...]:
    """The UNet's timestep shape: a scalar (sdengine's exports) or one per batch item (other exporters)."""
    return (unet_batch,) if declared_rank else ()


def first_timestep(tables: StepTables, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """The first UNet call's timestep, as the UNet declares it (later ones come out of the step model)."""
    return np.full(shape, tables.timesteps[0]).astype(dtype)


def first_unet_inputs(tables: StepTables, latents: np.ndarray, copies: int) -> np.ndarray:
    """The first UNet call's input, computed on the host (every later one comes out of the step model)."""
    scaled = latents * tables.input_scales[0]
    unet_input = np.concatenate([scaled] * copies) if copies > 1 else scaled
    if tables.unet_conditioning is not None:
        unet_input = np.concatenate([unet_input, tables.unet_conditioning], axis=1)
    return unet_input


def build_step_model(
    *,
    batch: int,
    latent_shape: tuple[int, int, int],
    num_calls: int,
    guidance: bool,
    timestep_shape: tuple[int, ...] = (),
    timestep_dtype: int = TensorProto.FLOAT,
    unet_sample_dtype: int = TensorProto.FLOAT,
    unet_output_dtype: int = TensorProto.FLOAT,
    blend: bool = False,
    conditioning_channels: int = 0,
    rescale: bool = False,
    controls: int = 0,
    contexts: tuple[int, int, int] = (),
    context_dtype: int = TensorProto.FLOAT,
    pooled: int = 0,
    parts: int = 0,
    apg: bool = False,
) -> onnx.ModelProto:
    """The step model for ``batch`` latents of ``latent_shape`` (C, h, w) and a schedule of ``num_calls``.

    ``timestep_shape``/``timestep_dtype`` give the UNet's timestep input as it declares it (a scalar float for
    sdengine's exports; (1,) or (batch,) and int64 for some others). ``unet_sample_dtype`` and
    ``unet_output_dtype`` are the UNet's ``sample`` input and noise output types (float16 in exports that keep
    fp16 inputs and outputs): the model takes the noise and gives the next UNet input in them, and computes in
    float32 between.

    ``blend``: inpainting with a plain UNet; the model takes :data:`BLEND_INPUTS` and replaces the area
    outside the mask by the image noised to the next timestep after every step. ``conditioning_channels``:
    inpainting with an inpainting UNet; the model takes :data:`CONDITIONING_INPUT` and appends it to every
    UNet input on the channel axis. ``rescale`` (with ``guidance``): the model takes ``guidance_rescale``
    and rescales the guided output towards the conditional one's standard deviation, as diffusers'
    ``rescale_noise_cfg`` does (unbiased std over each image). ``controls``: the UNet runs that many
    ControlNets; the model takes :data:`CONTROL_SCALES` and gives the next call's row of it as
    :data:`CONTROL_SCALE_OUTPUT`, so a ControlNet that stops (or starts) partway costs no host work.
    ``contexts`` (sets, sequence, hidden): prompts are edited; the model takes :data:`CONTEXTS` and
    :data:`CONTEXT_INDEX` and gives the next call's set of text embeddings, in ``context_dtype`` (the UNet's
    ``encoder_hidden_states`` type), as :data:`CONTEXT_OUTPUT`; with ``pooled`` (SDXL: the pooled
    embeddings' width) it takes :data:`POOLED` too and gives the set's pooled embeddings, in the same type,
    as :data:`POOLED_OUTPUT`. ``parts`` (not with ``rescale``): composable prompts of that many parts; the
    UNet's batch holds 1 + ``parts`` copies, and the model takes :data:`PART_WEIGHTS`, each call's row, and
    sums the parts' pulls from the negative side; without ``guidance``, ``parts`` copies and no negative
    side: the model's noise is the parts' weighted sum (perturbed-attention guidance at a scale <= 1).
    ``apg`` (with ``guidance``, not with ``parts`` or ``rescale``): adaptive projected guidance in place of
    the plain combination; the model takes :data:`APG_INPUT` and keeps the running average of cond - uncond
    in history buffer :data:`APG_SLOT` (:func:`_add_apg`).
    """
    if parts and rescale:
        raise ValueError("composable prompts' parts are summed without guidance rescale")
    if apg and (parts or rescale or not guidance):
        raise ValueError("adaptive projected guidance combines plain classifier-free guidance's two halves")
    copies = unet_copies(guidance, parts)
    c, h, w = latent_shape
    latent = [batch, c, h, w]
    rows, cols = 1 + MAX_HISTORY, 3 + MAX_HISTORY
    f32 = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("noise_pred", unet_output_dtype, [copies * batch, c, h, w]),
        helper.make_tensor_value_info("sample", f32, latent),
        helper.make_tensor_value_info("history", f32, [MAX_HISTORY, *latent]),
        helper.make_tensor_value_info("step_index", TensorProto.INT64, []),
        helper.make_tensor_value_info("coeffs", f32, [num_calls, rows, cols]),
        helper.make_tensor_value_info("timesteps", f32, [num_calls + 1]),
        helper.make_tensor_value_info("input_scales", f32, [num_calls + 1]),
        helper.make_tensor_value_info("noise", f32, [num_calls, *latent]),
        helper.make_tensor_value_info("guidance", f32, []),
    ]
    outputs = [
        helper.make_tensor_value_info("next_sample", f32, latent),
        helper.make_tensor_value_info("next_history", f32, [MAX_HISTORY, *latent]),
        helper.make_tensor_value_info("next_step_index", TensorProto.INT64, []),
        helper.make_tensor_value_info(
            "unet_input", unet_sample_dtype, [copies * batch, c + conditioning_channels, h, w]
        ),
        helper.make_tensor_value_info("unet_timestep", timestep_dtype, list(timestep_shape)),
    ]

    n = batch * c * h * w
    ints = {
        "one": 1,
        "flat_shape": [1, n],
        "history_shape": [MAX_HISTORY, n],
        "out_shape": [rows, *latent],
        "latent_shape": latent,
        "zero_1": [0],
        "one_1": [1],
        "two_1": [2],
        "history_end": [1 + APG_SLOT if apg else rows],  # APG's running average takes the last buffer
        "batch_1": [batch],
        "batch2_1": [2 * batch],
        "all_1": [copies * batch],
        "parts_shape": [parts, batch, c, h, w],
        "t_shape": list(timestep_shape) or [1],
        "image_axes": [1, 2, 3],  # each image's own channels and pixels
    }
    initializers = [
        helper.make_tensor(
            k, TensorProto.INT64, [len(v)] if isinstance(v, list) else [], v if isinstance(v, list) else [v]
        )
        for k, v in ints.items()
    ]
    nodes = [helper.make_node("Cast", ["noise_pred"], ["noise_pred_f32"], to=f32)]
    if parts:
        inputs.append(helper.make_tensor_value_info(PART_WEIGHTS, f32, [num_calls, parts, batch, 1, 1, 1]))
        nodes.append(helper.make_node("Gather", [PART_WEIGHTS, "step_index"], ["call_part_weights"], axis=0))
    if parts and not guidance:  # no negative side: the weighted sum of the parts
        nodes += [
            helper.make_node("Reshape", ["noise_pred_f32", "parts_shape"], ["conds"]),
            helper.make_node("Mul", ["conds", "call_part_weights"], ["weighted_conds"]),
            helper.make_node("ReduceSum", ["weighted_conds", "zero_1"], ["eps"], keepdims=0),
        ]
    elif parts:
        nodes += [
            helper.make_node("Slice", ["noise_pred_f32", "zero_1", "batch_1"], ["uncond"]),
            helper.make_node("Slice", ["noise_pred_f32", "batch_1", "all_1"], ["conds_flat"]),
            helper.make_node("Reshape", ["conds_flat", "parts_shape"], ["conds"]),
            helper.make_node("Sub", ["conds", "uncond"], ["deltas"]),
            helper.make_node("Mul", ["deltas", "call_part_weights"], ["weighted_deltas"]),
            helper.make_node("ReduceSum", ["weighted_deltas", "zero_1"], ["delta"], keepdims=0),
            helper.make_node("Mul", ["delta", "guidance"], ["scaled_delta"]),
            helper.make_node("Add", ["uncond", "scaled_delta"], ["eps"]),
        ]
    elif guidance:
        nodes += [
            helper.make_node("Slice", ["noise_pred_f32", "zero_1", "batch_1"], ["uncond"]),
            helper.make_node("Slice", ["noise_pred_f32", "batch_1", "batch2_1"], ["cond"]),
            helper.make_node("Sub", ["cond", "uncond"], ["delta"]),
        ]
        if apg:  # the pull is APG's update of delta, not delta itself
            _add_apg(inputs, initializers, nodes)
        nodes += [
            helper.make_node("Mul", ["apg_update" if apg else "delta", "guidance"], ["scaled_delta"]),
            helper.make_node("Add", ["uncond", "scaled_delta"], ["eps" if not rescale else "guided"]),
        ]
        if rescale:
            _add_guidance_rescale(inputs, initializers, nodes, per_image=c * h * w)
    else:
        nodes.append(helper.make_node("Identity", ["noise_pred_f32"], ["eps"]))
    nodes += [
        # the scheduler update: one (rows x cols) @ (cols x n) product
        helper.make_node("Gather", ["coeffs", "step_index"], ["row"], axis=0),
        helper.make_node("Gather", ["noise", "step_index"], ["step_noise"], axis=0),
        helper.make_node("Reshape", ["sample", "flat_shape"], ["flat_sample"]),
        helper.make_node("Reshape", ["eps", "flat_shape"], ["flat_eps"]),
        helper.make_node("Reshape", ["step_noise", "flat_shape"], ["flat_noise"]),
        helper.make_node("Reshape", ["history", "history_shape"], ["flat_history"]),
        helper.make_node(
            "Concat", ["flat_sample", "flat_eps", "flat_noise", "flat_history"], ["stacked"], axis=0
        ),
        helper.make_node("MatMul", ["row", "stacked"], ["updated"]),
        helper.make_node("Reshape", ["updated", "out_shape"], ["updated_latents"]),
        helper.make_node("Slice", ["updated_latents", "zero_1", "one_1"], ["sample_1"]),
        helper.make_node("Reshape", ["sample_1", "latent_shape"], ["denoised"]),
        helper.make_node("Slice", ["updated_latents", "one_1", "history_end"], ["scheduler_history"]),
        # advance the index
        helper.make_node("Add", ["step_index", "one"], ["next_step_index"]),
    ]
    if apg:  # the scheduler's buffers, then APG's running average
        nodes += [
            helper.make_node("Unsqueeze", ["apg_average", "zero_1"], ["apg_buffer"]),
            helper.make_node("Concat", ["scheduler_history", "apg_buffer"], ["next_history"], axis=0),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["scheduler_history"], ["next_history"]))
    if blend:
        _add_blend(inputs, nodes, latent, num_calls)
    else:
        nodes.append(helper.make_node("Identity", ["denoised"], ["next_sample"]))
    nodes += [
        # prepare the next UNet call
        helper.make_node("Gather", ["input_scales", "next_step_index"], ["scale"], axis=0),
        helper.make_node("Gather", ["timesteps", "next_step_index"], ["t"], axis=0),
        helper.make_node("Mul", ["next_sample", "scale"], ["scaled"]),
        helper.make_node("Concat", ["scaled"] * copies, ["latent_input"], axis=0),
    ]
    if conditioning_channels:
        inputs.append(
            helper.make_tensor_value_info(
                CONDITIONING_INPUT, f32, [copies * batch, conditioning_channels, h, w]
            )
        )
        nodes.append(
            helper.make_node("Concat", ["latent_input", CONDITIONING_INPUT], ["unet_input_f32"], axis=1)
        )
    else:
        nodes.append(helper.make_node("Identity", ["latent_input"], ["unet_input_f32"]))
    nodes += [
        helper.make_node("Cast", ["unet_input_f32"], ["unet_input"], to=unet_sample_dtype),
        helper.make_node("Cast", ["t"], ["t_cast"], to=timestep_dtype),
    ]
    if timestep_shape:
        nodes.append(helper.make_node("Expand", ["t_cast", "t_shape"], ["unet_timestep"]))
    else:
        nodes.append(helper.make_node("Identity", ["t_cast"], ["unet_timestep"]))
    if controls:
        inputs.append(helper.make_tensor_value_info(CONTROL_SCALES, f32, [num_calls + 1, controls]))
        outputs.append(helper.make_tensor_value_info(CONTROL_SCALE_OUTPUT, f32, [controls]))
        nodes.append(
            helper.make_node("Gather", [CONTROL_SCALES, "next_step_index"], [CONTROL_SCALE_OUTPUT], axis=0)
        )
    if contexts:
        sets, sequence, hidden = contexts
        inputs += [
            helper.make_tensor_value_info(CONTEXTS, f32, [sets, copies * batch, sequence, hidden]),
            helper.make_tensor_value_info(CONTEXT_INDEX, TensorProto.INT64, [num_calls + 1]),
        ]
        outputs.append(
            helper.make_tensor_value_info(CONTEXT_OUTPUT, context_dtype, [copies * batch, sequence, hidden])
        )
        nodes += [
            helper.make_node("Gather", [CONTEXT_INDEX, "next_step_index"], ["context_set"], axis=0),
            helper.make_node("Gather", [CONTEXTS, "context_set"], ["next_context"], axis=0),
            helper.make_node("Cast", ["next_context"], [CONTEXT_OUTPUT], to=context_dtype),
        ]
        if pooled:
            inputs.append(helper.make_tensor_value_info(POOLED, f32, [sets, copies * batch, pooled]))
            outputs.append(
                helper.make_tensor_value_info(POOLED_OUTPUT, context_dtype, [copies * batch, pooled])
            )
            nodes += [
                helper.make_node("Gather", [POOLED, "context_set"], ["next_pooled"], axis=0),
                helper.make_node("Cast", ["next_pooled"], [POOLED_OUTPUT], to=context_dtype),
            ]
    graph = helper.make_graph(nodes, "sdengine_step", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def _add_apg(inputs: list, initializers: list, nodes: list) -> None:
    """``apg_update`` = d_orth + eta d_par from ``cond`` and ``delta`` (cond - uncond), which guidance then
    scales (eps = uncond + g apg_update), diffusers' ``normalized_guidance`` (:mod:`sdengine.apg`): d the
    running average delta + momentum * (history buffer APG_SLOT), which goes back there (as
    ``apg_average``), scaled to the norm threshold where it is larger (a threshold of 0: none), then split
    along cond (normalised as torch's ``normalize`` does: by max(|cond|, 1e-12)); norms over each image."""
    f32 = TensorProto.FLOAT
    inputs.append(helper.make_tensor_value_info(APG_INPUT, f32, [3]))
    initializers += [
        helper.make_tensor("apg_slot", TensorProto.INT64, [], [APG_SLOT]),
        helper.make_tensor("apg_eta_at", TensorProto.INT64, [], [0]),
        helper.make_tensor("apg_threshold_at", TensorProto.INT64, [], [1]),
        helper.make_tensor("apg_momentum_at", TensorProto.INT64, [], [2]),
        helper.make_tensor("apg_one", f32, [], [1.0]),
        helper.make_tensor("apg_zero", f32, [], [0.0]),
        helper.make_tensor("apg_tiny", f32, [], [1e-12]),
    ]
    nodes += [
        helper.make_node("Gather", [APG_INPUT, "apg_eta_at"], ["apg_eta"], axis=0),
        helper.make_node("Gather", [APG_INPUT, "apg_threshold_at"], ["apg_threshold"], axis=0),
        helper.make_node("Gather", [APG_INPUT, "apg_momentum_at"], ["apg_momentum"], axis=0),
        # the momentum's running average
        helper.make_node("Gather", ["history", "apg_slot"], ["apg_previous"], axis=0),
        helper.make_node("Mul", ["apg_previous", "apg_momentum"], ["apg_carried"]),
        helper.make_node("Add", ["delta", "apg_carried"], ["apg_average"]),
        # scaled down to the norm threshold (where there is one)
        *_image_norm("apg_average", "apg_norm"),
        helper.make_node("Div", ["apg_threshold", "apg_norm"], ["apg_ratio"]),
        helper.make_node("Min", ["apg_ratio", "apg_one"], ["apg_capped"]),
        helper.make_node("Greater", ["apg_threshold", "apg_zero"], ["apg_thresholded"]),
        helper.make_node("Where", ["apg_thresholded", "apg_capped", "apg_one"], ["apg_factor"]),
        helper.make_node("Mul", ["apg_average", "apg_factor"], ["apg_d"]),
        # split along cond
        *_image_norm("cond", "cond_norm"),
        helper.make_node("Max", ["cond_norm", "apg_tiny"], ["cond_norm_safe"]),
        helper.make_node("Div", ["cond", "cond_norm_safe"], ["cond_unit"]),
        helper.make_node("Mul", ["apg_d", "cond_unit"], ["apg_products"]),
        helper.make_node("ReduceSum", ["apg_products", "image_axes"], ["apg_along"], keepdims=1),
        helper.make_node("Mul", ["apg_along", "cond_unit"], ["apg_parallel"]),
        helper.make_node("Sub", ["apg_d", "apg_parallel"], ["apg_orthogonal"]),
        helper.make_node("Mul", ["apg_parallel", "apg_eta"], ["apg_parallel_kept"]),
        helper.make_node("Add", ["apg_orthogonal", "apg_parallel_kept"], ["apg_update"]),
    ]


def _image_norm(x: str, out: str) -> list[onnx.NodeProto]:
    """``out`` = the L2 norm of each image of ``x`` (B, C, h, w), kept (B, 1, 1, 1)."""
    return [
        helper.make_node("Mul", [x, x], [f"{x}_squares"]),
        helper.make_node("ReduceSum", [f"{x}_squares", "image_axes"], [f"{x}_norm2"], keepdims=1),
        helper.make_node("Sqrt", [f"{x}_norm2"], [out]),
    ]


def _add_guidance_rescale(inputs: list, initializers: list, nodes: list, *, per_image: int) -> None:
    """eps = r * guided * std(cond) / std(guided) + (1 - r) * guided, the unbiased standard deviation taken
    over each image, as diffusers' ``rescale_noise_cfg`` computes it (with torch.std)."""
    f32 = TensorProto.FLOAT
    inputs.append(helper.make_tensor_value_info("guidance_rescale", f32, []))
    initializers += [
        helper.make_tensor("one_f", f32, [], [1.0]),
        helper.make_tensor("n_minus_1", f32, [], [float(max(per_image - 1, 1))]),
    ]
    for name in ("cond", "guided"):
        nodes += [
            helper.make_node("ReduceMean", [name], [f"{name}_mean"], axes=[1, 2, 3], keepdims=1),
            helper.make_node("Sub", [name, f"{name}_mean"], [f"{name}_centred"]),
            helper.make_node("Mul", [f"{name}_centred", f"{name}_centred"], [f"{name}_squares"]),
            helper.make_node("ReduceSum", [f"{name}_squares", "image_axes"], [f"{name}_sum"], keepdims=1),
            helper.make_node("Div", [f"{name}_sum", "n_minus_1"], [f"{name}_var"]),
            helper.make_node("Sqrt", [f"{name}_var"], [f"{name}_std"]),
        ]
    nodes += [
        helper.make_node("Div", ["cond_std", "guided_std"], ["std_ratio"]),
        helper.make_node("Mul", ["guided", "std_ratio"], ["rescaled"]),
        helper.make_node("Mul", ["rescaled", "guidance_rescale"], ["rescaled_part"]),
        helper.make_node("Sub", ["one_f", "guidance_rescale"], ["keep_factor"]),
        helper.make_node("Mul", ["guided", "keep_factor"], ["kept_part"]),
        helper.make_node("Add", ["rescaled_part", "kept_part"], ["eps"]),
    ]


def _add_blend(inputs: list, nodes: list, latent: list[int], num_calls: int) -> None:
    """Inpainting with a plain UNet: next_sample = image_part + m * (denoised - image_part), where
    image_part = a * image + b * noise0 with (a, b) = noise_scales[i + 1] (the image itself after the last
    step) and m the keep mask, as diffusers' inpainting loop blends after each step."""
    f32 = TensorProto.FLOAT
    batch, _, h, w = latent
    inputs += [
        helper.make_tensor_value_info("keep_mask", f32, [batch, 1, h, w]),
        helper.make_tensor_value_info("image_latents", f32, latent),
        helper.make_tensor_value_info("image_noise", f32, latent),
        helper.make_tensor_value_info("noise_scales", f32, [num_calls + 1, 2]),
    ]
    nodes += [
        helper.make_node("Gather", ["noise_scales", "next_step_index"], ["ab"], axis=0),
        helper.make_node("Slice", ["ab", "zero_1", "one_1"], ["a"]),
        helper.make_node("Slice", ["ab", "one_1", "two_1"], ["b"]),
        helper.make_node("Mul", ["image_latents", "a"], ["image_a"]),
        helper.make_node("Mul", ["image_noise", "b"], ["noise_b"]),
        helper.make_node("Add", ["image_a", "noise_b"], ["image_part"]),
        helper.make_node("Sub", ["denoised", "image_part"], ["kept_delta"]),
        helper.make_node("Mul", ["kept_delta", "keep_mask"], ["masked_delta"]),
        helper.make_node("Add", ["image_part", "masked_delta"], ["next_sample"]),
    ]
