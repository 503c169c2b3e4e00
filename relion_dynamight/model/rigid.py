"""Rigid-body deformations: one rotation and translation per body per particle (the original's rigid mode).

The user gives one soft mask per body (RELION masks, values in [0, 1], the consensus map's box).  For a latent
code ``z`` a small network outputs, per body ``k``, an axis-angle rotation ``ω_k`` (radians; its direction is
the axis) and a translation ``t_k`` (pixels).  The displacement of a point ``x`` (pixels from the box centre,
(x, y, z)) is the mask-weighted sum of the bodies' rigid motions about their centres ``c_k``::

    d(x, z) = Σ_k w_k(x) · (R(ω_k) (x − c_k) + c_k + t_k − x)

with ``w_k(x)`` body ``k``'s mask at ``x`` (trilinear, :func:`~relion_dynamight.imaging.warp.sample_volume`; where masks overlap to more than 1 they are normalised).
Points outside every mask stay put.  ``d`` is a field, defined everywhere, so the inverse deformation, the
deformed backprojection and the exploration use a :class:`RigidBodyDecoder` exactly as the flexible decoder.

The masks are kept in the decoder (buffers, saved with every checkpoint) on a grid of at most
:data:`MASK_GRID` ³ voxels (a soft mask is smooth), so later tasks need not find the mask files again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from relion_dynamight.imaging.warp import sample_volume

#: Largest grid on which the body masks are kept (and saved with the checkpoints).
MASK_GRID = 64


def rotation_matrices(omega: Tensor) -> Tensor:
    """Rodrigues' formula: axis-angle vectors ``(..., 3)`` (radians) → rotation matrices ``(..., 3, 3)`` acting on
    column vectors (x, y, z); exact and differentiable at ``ω = 0``."""
    theta2 = (omega * omega).sum(-1, keepdim=True)[..., None]              # (..., 1, 1)
    small = theta2 < 1e-8
    theta = torch.sqrt(torch.where(small, torch.ones_like(theta2), theta2))
    a = torch.where(small, 1.0 - theta2 / 6.0, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24.0, (1.0 - torch.cos(theta)) / torch.where(small, 1.0, theta2))
    x, y, z = omega.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(*omega.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device).expand_as(k)
    return eye + a * k + b * (k @ k)


def body_masks(maps: Sequence[Tensor], box: int) -> tuple[Tensor, Tensor]:
    """Soft masks ``(box,)*3`` → ``(masks (K, G, G, G) on a grid of at most MASK_GRID³, centres (K, 3))``, the
    centres being each mask's weighted centroid in pixels from the box centre (x, y, z)."""
    stack = torch.stack([m.float() for m in maps])
    grid = min(box, MASK_GRID)
    small = stack if grid == box else F.interpolate(stack[None], size=(grid,) * 3, mode="trilinear",
                                                    align_corners=True)[0]
    axis = torch.arange(box, dtype=torch.float32) - box // 2
    zz, yy, xx = torch.meshgrid(axis, axis, axis, indexing="ij")
    total = stack.sum(dim=(1, 2, 3)).clamp_min(1e-12)
    centres = torch.stack([(stack * c).sum(dim=(1, 2, 3)) / total for c in (xx, yy, zz)], dim=-1)
    return small.clamp(0.0, 1.0), centres


def mask_paths(text: str | None) -> list[Path]:
    """``--rigid-body-masks a.mrc,b.mrc`` → the paths ([] when the option is not given)."""
    if text is None:
        return []
    paths = [Path(p.strip()) for p in str(text).split(",") if p.strip()]
    if not paths:
        from relion_dynamight.errors import InputError

        raise InputError(f"--rigid-body-masks {text!r}: give the body masks as FILE1.mrc,FILE2.mrc")
    return paths


def read_body_masks(paths: Sequence[str | Path], box: int) -> tuple[Tensor, Tensor]:
    """The masks of ``--rigid-body-masks`` files (each checked as a RELION soft mask) → :func:`body_masks`."""
    from relion_dynamight.relion.mrc import read_soft_mask

    return body_masks([torch.from_numpy(read_soft_mask(p, box, "--rigid-body-masks")) for p in paths], box)


class RigidBodyDecoder(nn.Module):
    """``forward(positions (M, 3) px, z (B, L)) -> displacements (B, M, 3) px`` of ``n_bodies`` rigid bodies.

    ``masks`` ``(K, G, G, G)`` (sampled with :func:`~relion_dynamight.imaging.warp.sample_volume`) and ``centres``
    ``(K, 3)`` from :func:`body_masks` (zeros until
    :meth:`set_bodies` or ``load_state_dict`` fills them).  The last layer starts at zero: every particle starts
    at the identity, as the flexible decoder does.
    """


    masks: Tensor
    centres: Tensor
    def __init__(self, latent_dim: int, box: int, n_bodies: int, hidden: int = 64, n_layers: int = 3,
                 grid: int | None = None) -> None:
        super().__init__()
        self.box = int(box)
        self.n_bodies = int(n_bodies)
        self._latent_dim = int(latent_dim)
        g = int(grid or min(box, MASK_GRID))
        layers: list[nn.Module] = []
        width = latent_dim
        for _ in range(n_layers):
            layers += [nn.Linear(width, hidden), nn.ELU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, 6 * n_bodies)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.register_buffer("masks", torch.zeros(n_bodies, g, g, g))
        self.register_buffer("centres", torch.zeros(n_bodies, 3))

    @property
    def latent_dim(self) -> int:
        return self._latent_dim

    def set_bodies(self, masks: Tensor, centres: Tensor) -> None:
        """Use these body masks ``(K, G, G, G)`` and centres ``(K, 3)`` (see :func:`body_masks`)."""
        if masks.shape[0] != self.n_bodies:
            raise ValueError(f"{masks.shape[0]} body masks for a decoder of {self.n_bodies} bodies")
        self.masks = masks.detach().to(self.centres.device, torch.float32).clone()
        self.centres = centres.detach().to(self.centres.device, torch.float32).clone()

    def transforms(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(axis-angle ω (B, K, 3) radians, translation t (B, K, 3) pixels)`` for latent codes ``z (B, L)``."""
        params = self.out(self.body(z)).reshape(z.shape[0], self.n_bodies, 6)
        return params[..., :3], params[..., 3:]

    def displace(self, points: Tensor, z: Tensor, source: Tensor | None = None) -> Tensor:
        """Displacements ``(B, K, 3)`` of points ``(B, K, 3)`` or ``(K, 3)`` (shared); ``source`` is unused (the
        weights are the masks at the points themselves)."""
        omega, shift = self.transforms(z.to(self.centres.dtype))
        rot = rotation_matrices(omega)                                           # (B, K_b, 3, 3)
        pts = points if points.dim() == 3 else points.unsqueeze(0).expand(z.shape[0], -1, -1)
        weights = sample_volume(self.masks, pts, box=self.box).clamp(0.0, 1.0)   # (K_b, B, P)
        total = weights.sum(0, keepdim=True)
        weights = weights / total.clamp_min(1.0)
        rel = pts[:, None] - self.centres[None, :, None]                         # (B, K_b, P, 3)
        moved = rel @ rot.transpose(-1, -2) + self.centres[None, :, None] + shift[:, :, None]
        motion = moved - pts[:, None]
        return (weights.permute(1, 0, 2)[..., None] * motion).sum(1)

    def forward(self, positions: Tensor, z: Tensor) -> Tensor:
        return self.displace(positions, z)
