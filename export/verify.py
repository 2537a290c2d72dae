"""Checks an exported model against the PyTorch module it was traced from, as part of every export.

The same random inputs go through both, at a size other than the traced one (batch 1, a non-square latent
that is a multiple of 8 where the trace's is odd), so the dynamic axes are exercised too. Each output is
compared relative to its own scale, max |onnx - torch| / max |torch|, against the precision's tolerance:
1e-4 for fp32 (tracing and graph optimisations only reorder float32 arithmetic), 1e-2 for fp16 (half
precision weights and activations). A non-finite output (an fp16 overflow, say) never passes.

The ONNX model runs on ONNX Runtime's CPU provider with basic graph optimisations, which keeps the check's
load time and memory small next to the export itself.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.wrappers import sample_inputs
from sdengine.model_specs import Architecture

TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
#: (batch, latent height, latent width) of the check: unlike the trace's (2, 9, 13)
CHECK_SIZE = (1, 16, 8)


@dataclass(frozen=True)
class Verification:
    """How far an exported model's outputs are from its PyTorch module's, at one size."""

    batch: int
    height: int
    width: int
    rel_error: float  # the largest over the outputs; inf for a non-finite output
    tolerance: float

    @property
    def passed(self) -> bool:
        return math.isfinite(self.rel_error) and self.rel_error <= self.tolerance

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def describe(self, name: str, precision: str) -> str:
        """One line for the error a failed check raises."""
        at = f"at batch {self.batch}, {self.height}x{self.width}"
        if not math.isfinite(self.rel_error):
            return f"{name}: the ONNX model gives non-finite values {at} (a {precision} overflow?)"
        return (
            f"{name}: the ONNX model's output differs from PyTorch's by {self.rel_error:.2g} (relative) "
            f"{at}, above the {self.tolerance:g} that {precision} allows"
        )


def rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected|; inf when either is not finite."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if actual.shape != expected.shape or not (np.isfinite(actual).all() and np.isfinite(expected).all()):
        return math.inf
    scale = float(np.abs(expected).max()) or 1.0
    return float(np.abs(actual - expected).max()) / scale


@dataclass(frozen=True, eq=False)
class Reference:
    """The check's inputs and the PyTorch module's outputs for them, taken before the module is freed (an
    SDXL UNet's weights are 10 GB, which the export should not hold beside ONNX's own copy)."""

    inputs: dict[str, np.ndarray]
    outputs: tuple[np.ndarray, ...]
    height: int
    width: int


def reference_outputs(module: Any, arch: Architecture, name: str, *, vocab_size: int) -> Reference:
    """Run ``module`` (the traced PyTorch wrapper) on the check's inputs."""
    import torch

    batch, latent_h, latent_w = CHECK_SIZE
    height, width = latent_h * arch.vae_scale_factor, latent_w * arch.vae_scale_factor
    inputs = sample_inputs(arch, name, batch=batch, height=height, width=width, seed=7, vocab_size=vocab_size)
    with torch.no_grad():
        expected = module(*inputs.values())
    expected = expected if isinstance(expected, tuple) else (expected,)
    return Reference(
        {k: v.numpy() for k, v in inputs.items()}, tuple(e.float().numpy() for e in expected), height, width
    )


def check_outputs(path: Path, reference: Reference, precision: str) -> Verification:
    """Run the ONNX model at ``path`` on the reference's inputs and compare its outputs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    actual = session.run(None, reference.inputs)
    error = max(rel_error(a, e) for a, e in zip(actual, reference.outputs, strict=True))
    return Verification(CHECK_SIZE[0], reference.height, reference.width, error, TOLERANCE[precision])
