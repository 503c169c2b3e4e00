"""Rigid-body reading of a flexible model (the original's mask-based rigid-transform steps).

For every particle and every body mask, the rotation ``R`` and translation that best move the body's Gaussians
(weights: the mask at their consensus positions) onto their deformed positions, in the weighted least-squares
sense (Kabsch), reported as a motion about the body's centre ``c``: ``x' = R (x − c) + c + t``.  The weighted RMS
of what is left (``residual``) says how far the learned motion of that body is from rigid.  Positions are pixels
from the box centre, (x, y, z).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class RigidFit:
    """Per particle ``n`` and body ``k``: ``rotation (n, k, 3, 3)``, ``shift (n, k, 3)`` px about ``centres (k, 3)``
    and ``residual (n, k)`` px (weighted RMS distance left after the fit)."""

    rotation: Tensor
    shift: Tensor
    residual: Tensor
    centres: Tensor

    def axis_angle_deg(self) -> np.ndarray:
        """Rotations as axis-angle vectors ``(n, k, 3)`` in degrees (length = angle, direction = axis)."""
        from scipy.spatial.transform import Rotation

        mats = self.rotation.double().cpu().numpy().reshape(-1, 3, 3)
        return np.degrees(Rotation.from_matrix(mats).as_rotvec()).reshape(*self.rotation.shape[:2], 3)


def weighted_kabsch(source: Tensor, target: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """``R (B, 3, 3)`` and ``d (B, 3)`` minimising ``Σ_m w_m |R source_m + d − target_bm|²``.

    ``source (M, 3)``, ``target (B, M, 3)``, ``weights (M,)`` ≥ 0 with a positive sum.
    """
    w = weights / weights.sum()
    cs = (w[:, None] * source).sum(0)                                  # (3,)
    ct = (w[None, :, None] * target).sum(1)                            # (B, 3)
    h = ((source - cs) * w[:, None]).T[None] @ (target - ct[:, None])   # (B, 3, 3)
    u, _, vt = torch.linalg.svd(h)
    sign = torch.sign(torch.linalg.det(vt.transpose(-1, -2) @ u.transpose(-1, -2)))
    fix = torch.diag_embed(torch.stack([torch.ones_like(sign), torch.ones_like(sign), sign], dim=-1))
    rot = vt.transpose(-1, -2) @ fix @ u.transpose(-1, -2)
    return rot, ct - (rot @ cs[None, :, None])[..., 0]


def rigid_fit(positions: Tensor, deformed: Tensor, weights: Tensor, centres: Tensor) -> RigidFit:
    """Fit every body ``k`` (``weights (K, M)``: its mask at the consensus ``positions (M, 3)``) to ``deformed
    (B, M, 3)``; motions about ``centres (K, 3)``."""
    rots, shifts, residuals = [], [], []
    for k in range(weights.shape[0]):
        w = weights[k]
        rot, d = weighted_kabsch(positions, deformed, w)
        moved = positions[None] @ rot.transpose(-1, -2) + d[:, None]
        residuals.append(torch.sqrt((w[None] * ((moved - deformed) ** 2).sum(-1)).sum(-1) / w.sum()))
        c = centres[k]
        shifts.append(d + (rot @ c[:, None])[..., 0] - c)          # x' = R (x − c) + c + t
        rots.append(rot)
    return RigidFit(torch.stack(rots, 1), torch.stack(shifts, 1), torch.stack(residuals, 1), centres)


def body_columns(omega_deg: np.ndarray, shift_angstrom: np.ndarray,
                 residual_angstrom: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """STAR columns of per-particle rigid motions ``(n, K, 3)``, body ``k`` numbered from 1: ``dmBody<k>RotX/Y/Z``
    (axis-angle, degrees), ``dmBody<k>Angle`` (degrees), ``dmBody<k>ShiftX/Y/Z`` (Å) and, when given,
    ``dmBody<k>Residual`` (Å ``(n, K)``, the RMS motion that is not rigid)."""
    columns: dict[str, np.ndarray] = {}
    for k in range(omega_deg.shape[1]):
        b = f"dmBody{k + 1}"
        columns.update({f"{b}Rot{a}": omega_deg[:, k, i] for i, a in enumerate("XYZ")})
        columns[f"{b}Angle"] = np.linalg.norm(omega_deg[:, k], axis=1)
        columns.update({f"{b}Shift{a}": shift_angstrom[:, k, i] for i, a in enumerate("XYZ")})
        if residual_angstrom is not None:
            columns[f"{b}Residual"] = residual_angstrom[:, k]
    return columns

