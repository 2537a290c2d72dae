"""Reading a safetensors file at run time (numpy, no torch), its failure as one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sdengine.errors import InvalidArgumentError


def read_safetensors(path: Path, what: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor of the safetensors file ``path``, by name, and its metadata; InvalidArgumentError
    naming ``what`` (``"LoRA"``, ``"embedding"``) for a file safetensors cannot read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)
            return tensors, f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types
        raise InvalidArgumentError(f"cannot read {what} {path}: {exc}") from None
