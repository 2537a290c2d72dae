"""DeepCache (Ma et al. 2024, "DeepCache: Accelerating Diffusion Models for Free"), as the authors'
``DeepCacheSDHelper`` runs it in diffusers' pipelines.

An export made with ``--deepcache BRANCH`` holds two UNets (``export.deepcache``): the whole one, which also
gives the hidden states where the branch is cut (the cached feature), and a shallow one, which runs the
branch's layers alone on the latest cached feature. A run with ``deepcache_interval`` N > 1 calls the whole
UNet on every N-th call and the shallow one in between; interval 1 (the default) runs the whole UNet
throughout and gives the plain export's images. The feature stays where the backend keeps its state (device
memory on a GPU), and the choice of UNet per call is a fixed table of the run (:func:`whole_calls`), so the
calls go on being replayed graphs.

Which calls are whole follows the helper: it finds each call's timestep in the whole schedule and runs the
whole UNet where that position, counted from the run's first call's, is a multiple of N. For schedulers that
call the UNet once a step that is every N-th call; for those that call it twice at the same timestep
(Heun's), both calls of a step share their first call's position, as in the helper, and so does an image to
image run that starts at the second of two such calls (it counts from the first, which it left out).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdengine.errors import InvalidArgumentError, ModelDirectoryError

#: Where an export records its DeepCache branch and the cached feature's shape.
DEEPCACHE_CONFIG = Path("deepcache") / "config.json"


@dataclass(frozen=True)
class CacheBranch:
    """DeepCache's branch ``3 * block + layer``, numbered as the authors' helper numbers it: ``block``
    counts the UNet's blocks from its ends (0: the first down block and the last up block), ``layer`` the
    up block's layers from its end (0: its last)."""

    branch_id: int

    def __post_init__(self) -> None:
        value = self.branch_id
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidArgumentError(f"a DeepCache branch is a whole number >= 0, got {value!r}")

    @property
    def block(self) -> int:
        return self.branch_id // 3

    @property
    def layer(self) -> int:
        return self.branch_id % 3


def exported_deepcache(config: dict[str, Any]) -> dict[str, int]:
    """The architecture's DeepCache fields from an export's ``deepcache/config.json`` (none: empty)."""
    if not config:
        return {}
    fields = {k: config.get(k) for k in ("branch", "channels", "downscale")}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in fields.values()):
        raise ModelDirectoryError(f"{DEEPCACHE_CONFIG} is unreadable: export again")
    if fields["channels"] < 1 or fields["downscale"] < 1:
        raise ModelDirectoryError(f"{DEEPCACHE_CONFIG} is unreadable: export again")
    return {"deepcache_channels": fields["channels"], "deepcache_downscale": fields["downscale"]}


def exported_branch(config: dict[str, Any]) -> int | None:
    """The branch an export's ``deepcache/config.json`` names (None: no DeepCache), checked as
    :func:`exported_deepcache` checks the record."""
    return config["branch"] if exported_deepcache(config) else None


def check_interval(interval: int) -> int:
    """A DeepCache interval: a whole number >= 1 (1: the whole UNet on every call)."""
    if isinstance(interval, bool) or not isinstance(interval, (int, np.integer)) or interval < 1:
        raise InvalidArgumentError(f"deepcache_interval must be a whole number >= 1, got {interval!r}")
    return int(interval)


def whole_calls(timesteps: np.ndarray, interval: int, lead: tuple[float, ...] = ()) -> tuple[bool, ...]:
    """For each call of a run with these timesteps (one per call), whether it runs the whole UNet: where
    its timestep's first position in the whole schedule, counted from the first call's timestep's, is a
    multiple of ``interval`` (the helper's rule). ``lead``: the whole schedule's timesteps before the run's
    first call, which image to image leaves out; the helper finds timesteps in the whole schedule, so where
    a scheduler calls twice at one timestep (Heun's, PNDM's first) and the run starts at the second call, it
    counts from the first. The first call is always whole: it fills the cache."""
    interval = check_interval(interval)
    first: dict[float, int] = {}
    for i, t in enumerate((*lead, *(float(t) for t in timesteps))):
        first.setdefault(float(t), i)
    start = first[float(timesteps[0])]
    return tuple((first[float(t)] - start) % interval == 0 for t in timesteps)
