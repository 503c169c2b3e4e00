"""Particle batches (images + pose + CTF) for training and reconstruction.

A :class:`ParticleBatch` holds, for particle rows ``index``: images ``(B, N, N)`` float32 ``[y, x]``,
RELION Euler matrices ``(B, 3, 3)`` (:func:`~relion_dynamight.imaging.geometry.euler_to_matrix`),
``+origin`` shifts ``(B, 2)`` (x, y) in pixels (translating an image by them centres the particle), the
CTF parameters and whether the images are CTF-premultiplied. :class:`ParticleData` makes them from a
STAR file, streaming images from disk (or from RAM with ``preload``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from relion_dynamight.imaging.ctf import CtfParams
from relion_dynamight.imaging.geometry import euler_to_matrix
from relion_dynamight.relion.stacks import ImageSource
from relion_dynamight.relion.star import ParticleTable, load_particles


@dataclass
class ParticleBatch:
    """One batch of ``B`` particles; see the module docstring for shapes and conventions."""

    index: Tensor
    images: Tensor
    rotations: Tensor
    shifts: Tensor
    ctf: CtfParams
    ctf_premultiplied: Tensor

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def to(self, device: torch.device | str) -> "ParticleBatch":
        return ParticleBatch(index=self.index.to(device), images=self.images.to(device),
                             rotations=self.rotations.to(device), shifts=self.shifts.to(device),
                             ctf=self.ctf.to(device), ctf_premultiplied=self.ctf_premultiplied.to(device))


class ParticleData:
    """Particles of a STAR file: metadata in memory, images read per batch (memory independent of count).

    ``project_dir`` is where image paths are resolved first (default: the working directory);
    ``pixel_size`` (Å) is needed only for RELION 3.0 files without a pixel-size column.
    """

    def __init__(self, star_path: str | Path, project_dir: str | Path | None = None, preload: bool = False,
                 pixel_size: float | None = None) -> None:
        self.table: ParticleTable = load_particles(star_path, pixel_size=pixel_size)
        self.images = ImageSource(self.table, Path(project_dir) if project_dir is not None else None, preload)
        angles = torch.as_tensor(self.table.angles_deg, dtype=torch.float64)
        self._angles = angles
        self._shifts = torch.as_tensor(self.table.origins_px, dtype=torch.float32)
        self._ctf = self.table.ctf_params()
        self._premultiplied = torch.as_tensor(self.table.ctf_premultiplied, dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def box(self) -> int:
        """Image size ``N`` in pixels."""
        return self.images.image_size

    @property
    def pixel_sizes(self) -> Tensor:
        """Å/pixel of every particle ``(n,)`` float32."""
        return self._ctf.pixel_size

    def batch(self, indices: Sequence[int] | np.ndarray | Tensor) -> ParticleBatch:
        """The particles of rows ``indices`` (any order, repeats allowed) on the CPU."""
        if isinstance(indices, Tensor):
            indices = indices.detach().cpu()
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64).reshape(-1))
        images = torch.from_numpy(self.images.read(idx.numpy()))
        a = self._angles[idx]
        rotations = euler_to_matrix(a[:, 0], a[:, 1], a[:, 2]).to(torch.float32)
        return ParticleBatch(index=idx, images=images, rotations=rotations, shifts=self._shifts[idx],
                             ctf=self._ctf.index(idx), ctf_premultiplied=self._premultiplied[idx])

    def iter_batches(self, indices: Sequence[int] | np.ndarray | Tensor | None = None,
                     batch_size: int = 64) -> Iterator[ParticleBatch]:
        """Batches of at most ``batch_size`` particles over ``indices`` (all rows when ``None``), in order."""
        if isinstance(indices, Tensor):
            indices = indices.detach().cpu()
        idx = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        for start in range(0, idx.size, batch_size):
            yield self.batch(idx[start:start + batch_size])
