"""Particle batches for training and reconstruction (stub: being implemented)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from relion_dynamight.imaging.ctf import CtfParams


@dataclass
class ParticleBatch:
    index: Tensor
    images: Tensor
    rotations: Tensor
    shifts: Tensor
    ctf: CtfParams
    ctf_premultiplied: Tensor

    def to(self, device: torch.device | str) -> "ParticleBatch":
        raise NotImplementedError


class ParticleData:
    def __init__(self, star_path, project_dir=None, preload: bool = False) -> None:
        raise NotImplementedError
