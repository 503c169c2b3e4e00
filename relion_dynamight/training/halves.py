"""Gold-standard half sets and per-half validation particles.

The halves follow ``rlnRandomSubset`` (1/2) when the STAR file has it, as RELION's refinement does.
Otherwise whole micrographs are assigned to a half with a seeded generator (particles of one
micrograph share a half, so neighbouring, possibly overlapping, particles never straddle halves) and
the split is recorded in the outputs and checkpoints.  Inside each half, a seeded fraction of particles
is held out as validation particles: they never train the decoder or the consensus model of their
half; they serve the noise spectrum, the stopping rule and the cross-half error estimates.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from relion_dynamight.errors import InputError

HALVES = (1, 2)


@dataclass
class HalfSplit:
    """``half[i]`` in {1, 2} and ``validation[i]`` for every particle ``i`` (input order)."""

    half: np.ndarray
    validation: np.ndarray
    source: str

    def __len__(self) -> int:
        return int(self.half.shape[0])

    def indices(self, half: int, validation: bool | None = False) -> np.ndarray:
        """Sorted particle indices of ``half``: training (False), validation (True) or all (None)."""
        keep = self.half == half
        if validation is not None:
            keep &= self.validation == validation
        return np.flatnonzero(keep)

    def summary(self) -> str:
        parts = []
        for h in HALVES:
            parts.append(f"half {h}: {len(self.indices(h))} training + {len(self.indices(h, True))} validation")
        return f"{'; '.join(parts)} (split from {self.source})"


def _half_rng(seed: int, half: int, purpose: int) -> np.random.Generator:
    """A generator that depends only on ``(seed, half, purpose)`` (never on rank or call order)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(half), int(purpose)])


def split_by_groups(groups: Sequence[Any] | np.ndarray, seed: int) -> np.ndarray:
    """Assign whole groups (micrographs) alternately to halves 1/2 in a seeded random order.

    Groups are ordered by name first, so the result does not depend on the particle order.
    Returns ``(n,)`` int8 half numbers.
    """
    names = np.asarray([str(g) for g in groups])
    unique, inverse = np.unique(names, return_inverse=True)
    order = _half_rng(seed, 0, 1).permutation(len(unique))
    group_half = np.empty(len(unique), dtype=np.int8)
    group_half[order] = 1 + (np.arange(len(unique)) % 2)
    if len(unique) == 1:  # one micrograph (synthetic data): alternate particles instead
        return (1 + _half_rng(seed, 0, 2).permutation(len(names)) % 2).astype(np.int8)
    return group_half[inverse]


def choose_validation(half: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Seeded validation flags: ``round(fraction * n_h)`` particles of each half (at least 1 if fraction > 0)."""
    if not 0.0 <= fraction < 1.0:
        raise InputError(f"--validation-fraction {fraction} must be in [0, 1); the default is 0.1")
    flags = np.zeros(half.shape[0], dtype=bool)
    for h in HALVES:
        members = np.flatnonzero(half == h)
        k = int(round(fraction * len(members)))
        if fraction > 0 and len(members) > 1:
            k = max(k, 1)
        chosen = _half_rng(seed, h, 3).choice(len(members), size=k, replace=False)
        flags[members[chosen]] = True
    return flags


def make_split(table: Any, seed: int, validation_fraction: float) -> HalfSplit:
    """Half sets for a particle table (``relion.star.ParticleTable``) and validation flags.

    Uses ``table.random_subset`` when present (values must be 1 or 2); else a seeded split grouped by
    ``rlnMicrographName`` (or one group when the column is absent).
    """
    n = len(table)
    subset = getattr(table, "random_subset", None)
    if subset is not None:
        half = np.asarray(subset).astype(np.int64)
        bad = ~np.isin(half, HALVES)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise InputError(f"rlnRandomSubset of particle {i + 1} is {half[i]}; only 1 and 2 are valid "
                             "(remove the column to let relion_dynamight split the particles)")
        half = half.astype(np.int8)
        source = "rlnRandomSubset"
    else:
        frame = table.particles
        groups = frame["rlnMicrographName"].to_numpy() if "rlnMicrographName" in frame else np.zeros(n)
        half = split_by_groups(groups, seed)
        source = f"seeded split by micrograph (seed {seed})"
    for h in HALVES:
        if not (half == h).any():
            raise InputError(f"half set {h} has no particles (rlnRandomSubset); a gold-standard run needs both "
                             "halves: use the run_data.star of a 3D auto-refine job")
    return HalfSplit(half=half, validation=choose_validation(half, validation_fraction, seed), source=source)


def fingerprint(image_names: Sequence[str]) -> tuple[int, str]:
    """``(count, sha256 of the newline-joined image names)``: identifies a particle set in checkpoints."""
    digest = hashlib.sha256()
    for name in image_names:
        digest.update(str(name).encode())
        digest.update(b"\n")
    return len(image_names), digest.hexdigest()
