"""RELION's geometry conventions (relion-facts §7), as pure torch functions.

Coordinates
-----------
* A map is indexed ``map[z, y, x]``; its real-space centre is index ``N // 2`` on every axis.
* Points are ``(x, y, z)`` in **pixels relative to that centre** (the Gaussian model uses the same).
* An image is indexed ``img[y, x]`` with centre ``(N // 2, N // 2)``.

Euler angles
------------
``(rot, tilt, psi)`` in degrees give ``A = Rz(psi) @ Ry(tilt) @ Rz(rot)`` with
``Rz(t) = [[c, s, 0], [-s, c, 0], [0, 0, 1]]`` and ``Ry(t) = [[c, 0, -s], [0, 1, 0], [s, 0, c]]``.
A map point ``r`` appears in the projection image at ``(A @ r)[:2]``; the Fourier slice of the image
samples the 3D transform at ``A.T @ (kx, ky, 0)``.

Origins
-------
The experimental image is the projection translated by ``-(rlnOriginXAngst, rlnOriginYAngst) / pixel``;
translating the image by ``+origin`` centres the particle.
"""

from __future__ import annotations

import torch
from torch import Tensor


def euler_to_matrix(rot: Tensor, tilt: Tensor, psi: Tensor) -> Tensor:
    """RELION's Euler matrix ``A`` for angles in degrees; shapes ``(...)`` → ``(..., 3, 3)``."""
    a, b, g = (torch.deg2rad(torch.as_tensor(t)) for t in (rot, tilt, psi))
    ca, sa, cb, sb, cg, sg = a.cos(), a.sin(), b.cos(), b.sin(), g.cos(), g.sin()
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    rows = [
        torch.stack([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb], dim=-1),
        torch.stack([-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb], dim=-1),
        torch.stack([sc, ss, cb], dim=-1),
    ]
    return torch.stack(rows, dim=-2)


def matrix_to_euler(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`euler_to_matrix` (degrees), following RELION's ``Euler_matrix2angles``."""
    tilt = torch.rad2deg(torch.acos(A[..., 2, 2].clamp(-1.0, 1.0)))
    sb = torch.sqrt(A[..., 0, 2] ** 2 + A[..., 1, 2] ** 2)
    gimbal = sb <= 16 * torch.finfo(A.dtype).eps
    rot = torch.where(gimbal, torch.zeros_like(tilt), torch.rad2deg(torch.atan2(A[..., 2, 1], A[..., 2, 0])))
    psi = torch.where(
        gimbal,
        torch.rad2deg(torch.atan2(-A[..., 1, 0], A[..., 0, 0])),
        torch.rad2deg(torch.atan2(A[..., 1, 2], -A[..., 0, 2])),
    )
    return rot, tilt, psi


def rotate_points(points: Tensor, A: Tensor) -> Tensor:
    """Rotate points ``(..., M, 3)`` (x, y, z) by matrices ``(..., 3, 3)``: returns ``A @ r`` per point."""
    return points @ A.transpose(-1, -2)


def grid_points_3d(box: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Voxel centres of a ``box**3`` map as ``(box, box, box, 3)`` (x, y, z) in pixels from the centre.

    Indexing follows the map: ``grid[z, y, x] == (x - box//2, y - box//2, z - box//2)``.
    """
    c = torch.arange(box, device=device, dtype=dtype) - box // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    return torch.stack([x, y, z], dim=-1)
