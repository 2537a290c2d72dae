"""The one step function shared by every scheduler: apply a row of a :class:`Schedule` coefficient table."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import InvalidArgumentError
from .schedule import HISTORY, Schedule

_INPUT_NAMES = ("sample", "model_output", "noise")


def initial_history(
    schedule: Schedule, shape: Sequence[int], dtype: np.dtype | type = np.float32
) -> tuple[np.ndarray, ...]:
    """The history buffers before the first step: ``schedule.history_size`` zero arrays of ``shape``."""
    return tuple(np.zeros(tuple(shape), dtype=dtype) for _ in range(schedule.history_size))


def step(
    coeffs: np.ndarray,
    sample: np.ndarray,
    model_output: np.ndarray,
    noise: np.ndarray | None,
    history: tuple[np.ndarray, ...],
) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Apply one row ``coeffs`` (shape ``(1 + K, 3 + K)``) of a schedule: the whole scheduler update.

    Returns ``(new_sample, new_history)`` with ``[new_sample, *new_history] = coeffs @ [sample, model_output,
    noise, *history]``. Pure: inputs are never written. Zero coefficients are skipped (``noise`` may be None
    when its column is zero, e.g. wherever ``schedule.needs_noise`` is false), and an output that is a plain
    copy of one input (a single coefficient equal to 1) *is* that input, not a copy, so outputs may alias
    inputs. Arithmetic runs in the promoted dtype of ``sample`` and ``coeffs`` (float32 for float32 latents).
    """
    coeffs = np.asarray(coeffs)
    if coeffs.ndim != 2 or coeffs.shape[1] != coeffs.shape[0] + 2:
        raise InvalidArgumentError(f"coeffs must have shape (1 + K, 3 + K), got {coeffs.shape}")
    k = coeffs.shape[0] - 1
    if len(history) != k:
        raise InvalidArgumentError(f"this schedule keeps {k} history buffers, got {len(history)}")
    inputs = (sample, model_output, noise, *history)
    dtype = np.result_type(sample.dtype, coeffs.dtype)
    used = np.flatnonzero(coeffs.any(axis=0))
    for j in used:
        x = inputs[j]
        if x is None:
            raise InvalidArgumentError("this step needs a noise input (schedule.needs_noise)")
        if x.shape != sample.shape:
            name = _INPUT_NAMES[j] if j < HISTORY else f"history[{j - HISTORY}]"
            raise InvalidArgumentError(f"{name} has shape {x.shape}, sample has {sample.shape}")
    outputs = tuple(_combine(row, inputs, sample.shape, dtype) for row in coeffs)
    return outputs[0], outputs[1:]


def _combine(
    row: np.ndarray, inputs: tuple[np.ndarray | None, ...], shape: tuple[int, ...], dtype: np.dtype
) -> np.ndarray:
    """sum_j row[j] * inputs[j] over the non-zero row[j], with at most two allocations."""
    nonzero = np.flatnonzero(row)
    if nonzero.size == 0:
        return np.zeros(shape, dtype=dtype)
    if nonzero.size == 1 and row[nonzero[0]] == 1:
        return np.asarray(inputs[nonzero[0]], dtype=dtype)
    # Seed the accumulator with a scaled term (one allocation); unit terms are then added in place.
    terms = sorted(nonzero.tolist(), key=lambda j: bool(row[j] == 1))
    first = terms[0]
    acc = np.multiply(inputs[first], row[first].astype(dtype), dtype=dtype)
    scratch: np.ndarray | None = None
    for j in terms[1:]:
        x = inputs[j]
        if row[j] == 1:
            np.add(acc, x, out=acc)
        else:
            if scratch is None:
                scratch = np.empty_like(acc)
            np.multiply(x, row[j].astype(dtype), out=scratch)
            np.add(acc, scratch, out=acc)
    return acc
