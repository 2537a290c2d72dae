"""sdengine: a lean Stable Diffusion inference engine.

``from sdengine import Pipeline`` is resolved lazily, so ``import sdengine`` alone loads no runtime.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Pipeline", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Pipeline":
        from sdengine.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'sdengine' has no attribute {name!r}")
