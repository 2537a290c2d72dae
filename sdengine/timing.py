"""Per-stage wall-clock timing for the CPU paths (``perf_counter_ns``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

#: Stage names, in pipeline order. ``denoise`` is the whole loop (its wall time, the final sync included);
#: inside it ``unet`` and ``step`` (guidance plus the scheduler update) are timed per call where the host can
#: see them, and ``denoise_gpu`` is the loop's device time from CUDA events where the steps are graph replays.
#: ``step_call`` is the host time of each whole step (its launch, where the GPU runs it asynchronously).
STAGES = (
    "tokenize",
    "text_encoder",
    "vae_encode",
    "denoise",
    "step_call",
    "unet",
    "step",
    "denoise_gpu",
    "vae_decode",
    "total",
)


@dataclass
class StageTimes:
    """Durations in nanoseconds of every call of every stage of one generation."""

    calls: dict[str, list[int]] = field(default_factory=dict)

    @contextmanager
    def time(self, stage: str) -> Iterator[None]:
        start = time.perf_counter_ns()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter_ns() - start)

    def add(self, stage: str, ns: int) -> None:
        self.calls.setdefault(stage, []).append(ns)

    def total_ms(self, stage: str) -> float:
        return sum(self.calls.get(stage, ())) / 1e6

    def median_ms(self, stage: str) -> float:
        values = self.calls.get(stage)
        return float(np.median(values)) / 1e6 if values else float("nan")

    def count(self, stage: str) -> int:
        return len(self.calls.get(stage, ()))

    def summary(self) -> dict[str, dict[str, float]]:
        """Per stage: number of calls, total and median milliseconds."""
        return {
            s: {"calls": self.count(s), "total_ms": self.total_ms(s), "median_ms": self.median_ms(s)}
            for s in (*STAGES, *sorted(set(self.calls) - set(STAGES)))
            if s in self.calls
        }
