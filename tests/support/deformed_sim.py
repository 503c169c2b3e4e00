"""A tiny, self-contained hinge simulation with a KNOWN dense deformation field (tests of the deformed backprojection).

Two domains of Gaussians; the right one rotates about the z axis through a pivot by a per-particle angle.
The forward map (consensus → deformed) is ``Γ(x) = x + w(x) (R_θ (x − p) + p − x)`` with a smooth weight
``w`` that is 1 on the moving domain and 0 on the static one, so the field is defined (and invertible) at
every voxel and the Gaussians themselves move exactly by ``Γ``.  Images are analytic projections of the
deformed Gaussians, CTF-multiplied, translated by −origin, plus white noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from relion_dynamight.imaging.ctf import CtfParams, ctf_2d
from relion_dynamight.imaging.fourier import irfft2_centered, rfft2_centered, shift_phase_2d
from relion_dynamight.imaging.geometry import euler_to_matrix, grid_points_3d


@dataclass
class HingeSim:
    box: int
    centres: Tensor          # (M, 3) consensus Gaussian centres, px
    amplitudes: Tensor       # (M,)
    sigma: float             # px
    moving: Tensor           # (M,) bool
    pivot: Tensor            # (3,)
    angles: Tensor           # (P,) degrees
    rotations: Tensor        # (P, 3, 3)
    shifts: Tensor           # (P, 2) origins px
    ctf: CtfParams
    images: Tensor           # (P, N, N)
    boundary: float          # x position of the hinge
    width: float

    def weight(self, points: Tensor) -> Tensor:
        """Smooth 0 → 1 weight of the moving domain along x."""
        return torch.sigmoid((points[..., 0] - self.boundary) / self.width)

    def forward_map(self, points: Tensor, angle_deg: float | Tensor) -> Tensor:
        """Γ_θ(points) for points ``(..., 3)``."""
        return hinge_map(points, angle_deg, self.pivot, self.weight(points))

    def volume(self, angle_deg: float = 0.0) -> Tensor:
        """Map of the Gaussians deformed by angle (0 = consensus / reference conformation)."""
        c = self.forward_map(self.centres, angle_deg) if angle_deg else self.centres
        return render(c, self.amplitudes, self.sigma, self.box)

    def moving_mask(self, threshold: float = 0.5) -> Tensor:
        """Voxels near moving-domain Gaussians of the consensus, (N, N, N) bool."""
        v = render(self.centres[self.moving], self.amplitudes[self.moving], self.sigma * 1.5, self.box)
        return v > threshold * v.max() * 0.2


def hinge_map(points: Tensor, angle_deg: float | Tensor, pivot: Tensor, w: Tensor) -> Tensor:
    t = torch.deg2rad(torch.as_tensor(angle_deg, dtype=points.dtype))
    c, s = torch.cos(t), torch.sin(t)
    rel = points - pivot
    rx = c * rel[..., 0] - s * rel[..., 1]
    ry = s * rel[..., 0] + c * rel[..., 1]
    rotated = torch.stack([rx, ry, rel[..., 2].expand_as(rx)], dim=-1) + pivot
    return points + w[..., None] * (rotated - points)


def render(centres: Tensor, amplitudes: Tensor, sigma: float, box: int) -> Tensor:
    grid = grid_points_3d(box, dtype=centres.dtype).reshape(-1, 3)
    out = torch.zeros(grid.shape[0], dtype=centres.dtype)
    for i in range(0, centres.shape[0], 64):
        d2 = torch.cdist(grid, centres[i:i + 64]).pow(2)
        out += (amplitudes[i:i + 64] * torch.exp(-d2 / (2 * sigma**2))).sum(dim=1)
    return out.reshape(box, box, box)


def _project(centres: Tensor, amplitudes: Tensor, sigma: float, box: int) -> Tensor:
    """Analytic line integrals ``(P, N, N)`` of Gaussians at rotated centres ``(P, M, 3)``."""
    c = torch.arange(box, dtype=centres.dtype) - box // 2
    gx = torch.exp(-(c[None, None, :] - centres[..., 0:1]) ** 2 / (2 * sigma**2))  # (P, M, N)
    gy = torch.exp(-(c[None, None, :] - centres[..., 1:2]) ** 2 / (2 * sigma**2))
    scale = amplitudes * math.sqrt(2 * math.pi) * sigma
    return torch.bmm(gy.transpose(1, 2) * scale, gx)


def make_ctf(n: int, pixel: float, gen: torch.Generator) -> CtfParams:
    du = 8000.0 + 12000.0 * torch.rand(n, generator=gen, dtype=torch.float64)
    full = lambda v: torch.full((n,), v, dtype=torch.float64)  # noqa: E731
    return CtfParams(defocus_u=du, defocus_v=du - 500.0, defocus_angle=torch.rand(n, generator=gen) * 180,
                     voltage=full(300.0), cs=full(2.7), amplitude_contrast=full(0.1), phase_shift=full(0.0),
                     bfactor=full(0.0), scale=full(1.0), pixel_size=full(pixel))


def simulate_hinge(n_particles: int = 600, box: int = 32, max_angle: float = 25.0, snr: float | None = 1.0,
                   seed: int = 0, pixel: float = 3.0, motion: bool = True) -> HingeSim:
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float64
    # static domain: a block on the left; moving domain: an arm on the right
    left = torch.stack(torch.meshgrid(torch.arange(-8.0, -1.0, 2.5), torch.arange(-5.0, 6.0, 2.5),
                                      torch.arange(-4.0, 5.0, 2.5), indexing="ij"), -1).reshape(-1, 3)
    right = torch.stack(torch.meshgrid(torch.arange(2.0, 11.0, 2.2), torch.arange(-3.0, 4.0, 2.2),
                                       torch.arange(-3.0, 4.0, 2.2), indexing="ij"), -1).reshape(-1, 3)
    jitter = 0.4 * torch.randn(left.shape[0] + right.shape[0], 3, generator=gen, dtype=dtype)
    centres = torch.cat([left, right]).to(dtype) + jitter
    moving = torch.cat([torch.zeros(left.shape[0], dtype=torch.bool), torch.ones(right.shape[0], dtype=torch.bool)])
    amplitudes = 0.7 + 0.6 * torch.rand(centres.shape[0], generator=gen, dtype=dtype)
    sigma = 1.3
    pivot = torch.tensor([0.5, 0.0, 0.0], dtype=dtype)
    angles = ((2 * torch.rand(n_particles, generator=gen, dtype=dtype) - 1) * max_angle if motion
              else torch.zeros(n_particles, dtype=dtype))
    rot = torch.rand(n_particles, generator=gen, dtype=dtype) * 360 - 180
    tilt = torch.rad2deg(torch.acos(2 * torch.rand(n_particles, generator=gen, dtype=dtype) - 1))
    psi = torch.rand(n_particles, generator=gen, dtype=dtype) * 360 - 180
    rotations = euler_to_matrix(rot, tilt, psi)
    shifts = (torch.rand(n_particles, 2, generator=gen, dtype=dtype) - 0.5) * 4
    ctf = make_ctf(n_particles, pixel, gen)
    sim = HingeSim(box=box, centres=centres, amplitudes=amplitudes, sigma=sigma, moving=moving, pivot=pivot,
                   angles=angles, rotations=rotations, shifts=shifts, ctf=ctf,
                   images=torch.empty(0), boundary=0.5, width=0.8)
    w = sim.weight(centres)
    deformed = hinge_map(centres[None], angles[:, None], pivot, w[None])  # (P, M, 3)
    rotated = deformed @ rotations.transpose(-1, -2)
    proj = _project(rotated, amplitudes, sigma, box)
    spectra = rfft2_centered(proj) * ctf_2d(ctf, box, dtype=dtype) * shift_phase_2d(box, -shifts)
    images = irfft2_centered(spectra, box)
    if snr is not None:
        noise_sd = images.std() / math.sqrt(snr)
        images = images + noise_sd * torch.randn(images.shape, generator=gen, dtype=dtype)
    sim.images = images.float()
    return sim
