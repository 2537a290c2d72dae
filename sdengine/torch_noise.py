"""PyTorch's CPU random normal draws, without PyTorch: the same seed gives the same noise, hence the same
image, as diffusers run with one CPU generator per image,
``generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]`` (the generator diffusers'
documentation recommends for reproducible results), and as the AUTOMATIC1111 web UI with its random number
source set to "CPU".

``torch.randn(shape, generator=g)`` on the CPU, for float32 tensors of 16 values or more, is:

1. ``n`` uniforms in [0, 1), each the low 24 bits of one 32-bit output of ``g``'s Mersenne Twister
   (MT19937, seeded with the seed's low 32 bits, as ``init_genrand`` seeds it), times 2**-24;
2. Box-Muller on each block of 16: ``u1 = 1 - d[j]``, ``u2 = d[j + 8]`` for ``j < 8``, then
   ``d[j] = sqrt(-2 log u1) cos(2 pi u2)`` and ``d[j + 8] = sqrt(-2 log u1) sin(2 pi u2)``;
3. where ``n`` is not a multiple of 16, 16 more uniforms overwrite the last 16 values, transformed as one
   more block.

(aten's ``normal_fill``.) numpy's legacy ``RandomState`` is the same Mersenne Twister with the same seeding,
so its raw outputs are ``g``'s. The Box-Muller step runs here in float64 and is rounded once; PyTorch's own
uses its vectorised log and sincos approximations, so the two agree to about 1e-6, not bit for bit (the
tests bound it against PyTorch itself).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BLOCK = 16


class TorchCpuGenerator:
    """``torch.Generator("cpu").manual_seed(seed)``'s normal draws, one :meth:`randn` after another."""

    def __init__(self, seed: int) -> None:
        self._mt = np.random.RandomState(int(seed) & 0xFFFFFFFF)

    def _uniforms(self, n: int) -> np.ndarray:
        bits = self._mt.randint(0, 2**32, size=n, dtype=np.uint32) & np.uint32(0xFFFFFF)
        return bits.astype(np.float64) * 2.0**-24

    def randn(self, shape: Sequence[int]) -> np.ndarray:
        """The next ``torch.randn(shape, generator=...)``, float32."""
        n = int(np.prod(shape))
        if n < BLOCK:
            raise ValueError(f"PyTorch draws fewer than {BLOCK} values another way; {n} asked for")
        values = self._uniforms(n)
        whole = n - n % BLOCK
        values[:whole] = _box_muller(values[:whole].reshape(-1, BLOCK)).reshape(-1)
        if n % BLOCK:
            values[n - BLOCK :] = _box_muller(self._uniforms(BLOCK))
        return values.astype(np.float32).reshape(tuple(shape))


def _box_muller(blocks: np.ndarray) -> np.ndarray:
    """Blocks of 16 uniforms -> 16 standard normals each (aten's ``normal_fill_16``)."""
    radius = np.sqrt(-2.0 * np.log(1.0 - blocks[..., : BLOCK // 2]))
    theta = 2.0 * np.pi * blocks[..., BLOCK // 2 :]
    return np.concatenate([radius * np.cos(theta), radius * np.sin(theta)], axis=-1)
