"""The denoising step as a small ONNX model, so that every backend runs the same step code.

One model does everything between two UNet calls, with every per-step value read from tables by a step index
that the model itself advances:

    eps        = uncond + g * (cond - uncond)         classifier-free guidance (when the batch is doubled)
    [x', h']   = coeffs[i] @ [x, eps, noise[i], h]    the scheduler update (one MatMul; see schedulers)
    unet_input = [x' * input_scale[i + 1]] * G        the next UNet call's input (G = 2 with guidance)
    timestep   = timesteps[i + 1]                     ... and its timestep, shaped as the UNet wants
    i'         = i + 1

Because the tables, the noise and the index live in the model's inputs, a GPU backend keeps them in device
memory and replays the step with no host work in between; the CPU backend runs the very same model with
ONNX Runtime. Shapes are static (the model is built for one batch and latent size), so it captures into a CUDA
graph as a whole. History is padded to :data:`MAX_HISTORY` buffers so one model serves every scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from sdengine.schedulers import Schedule

#: History buffers the step model carries (PNDM needs the most: 4).
MAX_HISTORY = 4
OPSET = 17
IR_VERSION = 8

STEP_INPUTS = (
    "noise_pred",
    "sample",
    "history",
    "step_index",
    "coeffs",
    "timesteps",
    "input_scales",
    "noise",
    "guidance",
)
STEP_OUTPUTS = ("next_sample", "next_history", "next_step_index", "unet_input", "unet_timestep")


@dataclass(frozen=True, eq=False)
class StepTables:
    """A schedule's per-step values, padded for the step model; uploaded once per generation."""

    coeffs: np.ndarray  # (S, 1 + MAX_HISTORY, 3 + MAX_HISTORY) float32
    timesteps: np.ndarray  # (S + 1,) float32: one spare entry, read (and unused) after the last step
    input_scales: np.ndarray  # (S + 1,) float32
    noise: np.ndarray  # (S, B, C, h, w) float32: per-step noise (zeros where the scheduler draws none)

    @property
    def num_calls(self) -> int:
        return len(self.coeffs)


def step_tables(schedule: Schedule, noise: np.ndarray) -> StepTables:
    """Pad ``schedule``'s coefficient rows to :data:`MAX_HISTORY` history buffers.

    Row ``r`` / column ``c`` of the scheduler's ``(1 + K, 3 + K)`` matrix keep their place; the extra history
    rows and columns are zero, so unused buffers stay zero and never contribute.
    """
    k = schedule.history_size
    if k > MAX_HISTORY:
        raise ValueError(f"schedule keeps {k} history buffers; the step model carries {MAX_HISTORY}")
    s = len(schedule.timesteps)
    coeffs = np.zeros((s, 1 + MAX_HISTORY, 3 + MAX_HISTORY), np.float32)
    coeffs[:, : 1 + k, : 3 + k] = schedule.coeffs
    return StepTables(
        coeffs=coeffs,
        timesteps=np.append(schedule.timesteps, schedule.timesteps[-1]).astype(np.float32),
        input_scales=np.append(schedule.input_scale, schedule.input_scale[-1]).astype(np.float32),
        noise=np.ascontiguousarray(noise, dtype=np.float32),
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
    return np.concatenate([scaled] * copies) if copies > 1 else scaled


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
) -> onnx.ModelProto:
    """The step model for ``batch`` latents of ``latent_shape`` (C, h, w) and a schedule of ``num_calls``.

    ``timestep_shape``/``timestep_dtype`` give the UNet's timestep input as it declares it (a scalar float for
    sdengine's exports; (1,) or (batch,) and int64 for some others). ``unet_sample_dtype`` and
    ``unet_output_dtype`` are the UNet's ``sample`` input and noise output types (float16 in exports that keep
    fp16 inputs and outputs): the model takes the noise and gives the next UNet input in them, and computes in
    float32 between.
    """
    copies = 2 if guidance else 1
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
        helper.make_tensor_value_info("unet_input", unet_sample_dtype, [copies * batch, c, h, w]),
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
        "rows_end": [rows],
        "batch_1": [batch],
        "batch2_1": [2 * batch],
        "t_shape": list(timestep_shape) or [1],
    }
    initializers = [
        helper.make_tensor(
            k, TensorProto.INT64, [len(v)] if isinstance(v, list) else [], v if isinstance(v, list) else [v]
        )
        for k, v in ints.items()
    ]
    nodes = [helper.make_node("Cast", ["noise_pred"], ["noise_pred_f32"], to=f32)]
    if guidance:
        nodes += [
            helper.make_node("Slice", ["noise_pred_f32", "zero_1", "batch_1"], ["uncond"]),
            helper.make_node("Slice", ["noise_pred_f32", "batch_1", "batch2_1"], ["cond"]),
            helper.make_node("Sub", ["cond", "uncond"], ["delta"]),
            helper.make_node("Mul", ["delta", "guidance"], ["scaled_delta"]),
            helper.make_node("Add", ["uncond", "scaled_delta"], ["eps"]),
        ]
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
        helper.make_node("Reshape", ["sample_1", "latent_shape"], ["next_sample"]),
        helper.make_node("Slice", ["updated_latents", "one_1", "rows_end"], ["next_history"]),
        # advance the index and prepare the next UNet call
        helper.make_node("Add", ["step_index", "one"], ["next_step_index"]),
        helper.make_node("Gather", ["input_scales", "next_step_index"], ["scale"], axis=0),
        helper.make_node("Gather", ["timesteps", "next_step_index"], ["t"], axis=0),
        helper.make_node("Mul", ["next_sample", "scale"], ["scaled"]),
        helper.make_node("Concat", ["scaled"] * copies, ["unet_input_f32"], axis=0),
        helper.make_node("Cast", ["unet_input_f32"], ["unet_input"], to=unet_sample_dtype),
        helper.make_node("Cast", ["t"], ["t_cast"], to=timestep_dtype),
    ]
    if timestep_shape:
        nodes.append(helper.make_node("Expand", ["t_cast", "t_shape"], ["unet_timestep"]))
    else:
        nodes.append(helper.make_node("Identity", ["t_cast"], ["unet_timestep"]))
    graph = helper.make_graph(nodes, "sdengine_step", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model
