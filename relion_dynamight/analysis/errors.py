"""Deformation error estimates from the two independently trained half sets (paper, Discussion and Fig. 6).

The validation particles never trained either decoder.  Each is embedded by both encoders (``z1``, ``z2``);
both decoders then predict its displacements at the *same* consensus positions, and the distance between
the two predictions estimates the error of the deformation.  Because the two halves have their own
consensus models (same Gaussians, numbered alike, started from one initial model), the distance is
evaluated at both consensus models and averaged:

    e_ij = ½ Σ_{c ∈ {c¹, c²}} | D₁(z1_i, c_j) − D₂(z2_i, c_j) |      (pixels; × pixel size → Å)

Reported per particle (mean and RMS over Gaussians) and per Gaussian (mean and RMS over particles), next
to the motion itself (mean of the two halves' |displacement|), so that a region whose error is as large as
its motion is visibly untrustworthy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from relion_dynamight.analysis.latent import DeformableModel, displacements


@dataclass
class HalfSetErrors:
    """Per particle ``(n,)`` and per Gaussian ``(M,)`` distances between the halves' deformations, in Å."""

    particle_mean: Tensor
    particle_rms: Tensor
    particle_motion: Tensor
    gaussian_mean: Tensor
    gaussian_rms: Tensor
    gaussian_motion: Tensor

    def summary(self) -> dict[str, float]:
        return {
            "particles": int(self.particle_mean.numel()),
            "gaussians": int(self.gaussian_mean.numel()),
            "mean_error_A": float(self.particle_mean.mean()),
            "median_particle_error_A": float(self.particle_mean.median()),
            "max_gaussian_error_A": float(self.gaussian_mean.max()),
            "mean_motion_A": float(self.particle_motion.mean()),
        }


@torch.no_grad()
def half_set_errors(models: dict[int, DeformableModel], z1: Tensor, z2: Tensor, pixel_size: float, batch: int = 32,
                    on_batch: Callable[[], None] | None = None) -> HalfSetErrors:
    """Distances between the two halves' predicted deformations for particles with latents ``z1``/``z2``
    ``(n, L)`` from encoder 1/2 (see module docstring).  Both models must have the same number of Gaussians."""
    m1, m2 = models[1], models[2]
    if m1.positions.shape != m2.positions.shape:
        raise ValueError(f"the half models have different Gaussians ({m1.positions.shape[0]} and "
                         f"{m2.positions.shape[0]}); error estimates need the same model numbering")
    n, m = z1.shape[0], m1.positions.shape[0]
    dev, dt = m1.positions.device, m1.positions.dtype
    p_mean = torch.empty(n, dtype=dt, device=dev)
    p_sq = torch.empty(n, dtype=dt, device=dev)
    p_motion = torch.empty(n, dtype=dt, device=dev)
    g_sum = torch.zeros(m, dtype=torch.float64, device=dev)
    g_sq = torch.zeros(m, dtype=torch.float64, device=dev)
    g_motion = torch.zeros(m, dtype=torch.float64, device=dev)
    m2_positions = m2.positions.to(dev, dt)
    for start in range(0, n, batch):
        a, b = z1[start:start + batch].to(dev, dt), z2[start:start + batch].to(dev, dt)
        err = torch.zeros(len(a), m, dtype=dt, device=dev)
        motion = torch.zeros_like(err)
        for pos in (m1.positions, m2_positions):
            d1, d2 = displacements(m1, a, pos), displacements(m2, b, pos.to(m2.device)).to(dev)
            err += 0.5 * (d1 - d2).norm(dim=-1)
            motion += 0.25 * (d1.norm(dim=-1) + d2.norm(dim=-1))
        sl = slice(start, start + len(a))
        p_mean[sl], p_sq[sl], p_motion[sl] = err.mean(dim=1), err.pow(2).mean(dim=1), motion.mean(dim=1)
        g_sum += err.sum(dim=0).double()
        g_sq += err.pow(2).sum(dim=0).double()
        g_motion += motion.sum(dim=0).double()
        if on_batch is not None:
            on_batch()
    s = float(pixel_size)
    return HalfSetErrors(
        particle_mean=p_mean * s, particle_rms=p_sq.sqrt() * s, particle_motion=p_motion * s,
        gaussian_mean=(g_sum / n).to(dt) * s, gaussian_rms=(g_sq / n).sqrt().to(dt) * s,
        gaussian_motion=(g_motion / n).to(dt) * s,
    )
