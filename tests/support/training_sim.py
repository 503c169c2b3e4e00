"""In-memory particle data for training tests (no files): the hinge simulation of ``deformed_sim``."""

from __future__ import annotations

import numpy as np
import torch

from relion_dynamight.relion.particles import ParticleBatch
from deformed_sim import HingeSim, simulate_hinge


class MemoryData:
    """Duck-typed ``ParticleData``: ``box``, ``__len__``, ``batch(indices)``."""

    def __init__(self, sim: HingeSim) -> None:
        self.sim = sim
        self.box = sim.box
        self.images = sim.images.float()

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, indices) -> ParticleBatch:
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64).reshape(-1))
        s = self.sim
        return ParticleBatch(index=idx, images=self.images[idx], rotations=s.rotations[idx].float(),
                             shifts=s.shifts[idx].float(), ctf=s.ctf.index(idx),
                             ctf_premultiplied=torch.zeros(len(idx), dtype=torch.bool))


def make_data(n: int = 1000, box: int = 32, snr: float = 1.0, motion: bool = True, seed: int = 0) -> MemoryData:
    return MemoryData(simulate_hinge(n_particles=n, box=box, snr=snr, motion=motion, seed=seed))
