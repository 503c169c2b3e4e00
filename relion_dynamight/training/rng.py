"""Random-number streams that depend only on (seed, half, purpose), never on MPI rank or call order.

Every random draw of the training (network initialisation, particle order, reparameterisation noise)
comes from a half's own :class:`torch.Generator` on the CPU, so one rank alternating both halves and two
ranks training one half each produce identical models, and a resumed run continues the same streams.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

#: Purposes of the streams (part of the seed).
INIT, TRAIN = 1, 2


def stream_seed(seed: int, half: int, purpose: int) -> int:
    """A 63-bit seed mixing ``(seed, half, purpose)`` (SplitMix64 finaliser)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(half) * 0xBF58476D1CE4E5B9 + int(purpose) * 0x94D049BB133111EB)
    x &= (1 << 64) - 1
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & ((1 << 64) - 1)
    x ^= x >> 31
    return x & ((1 << 63) - 1)


def generator(seed: int, half: int, purpose: int) -> torch.Generator:
    """A CPU generator for one stream."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(stream_seed(seed, half, purpose))
    return gen


@contextlib.contextmanager
def seeded_global(seed: int, half: int, purpose: int) -> Iterator[None]:
    """Run a block (e.g. ``nn.Module`` construction, which uses the global RNG) with a seeded global
    CPU generator, restoring the global state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, half, purpose))
        yield


def randn(shape: tuple[int, ...], gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise drawn on the CPU from ``gen``, moved to ``like``'s device and dtype."""
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=like.device, dtype=like.dtype)
