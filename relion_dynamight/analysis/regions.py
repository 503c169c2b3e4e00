"""Per-region choice between two reconstructions of the same particles, judged by their own half maps.

The deformed backprojection only helps where the particles really move and where the learned deformations
are right; elsewhere its warps add interpolation and field errors.  :func:`regional_choice` splits the
model into regions, measures in each region how far each pair of half maps agrees (the masked half-map
FSC = 0.5 crossing, :func:`fsc_shell`), and :func:`blend` keeps, region by region, the better of the two (soft edges, the same
weights for both halves so that the result is still a pair of half maps).

Conventions: maps are ``(N, N, N)`` ``[z, y, x]``; points are ``(M, 3)`` ``(x, y, z)`` pixels from the box
centre (index ``N//2``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from relion_dynamight.imaging.fourier import crossing_shell, fsc

#: Voxels within this distance (px) of a model point belong to the model's regions.
REGION_REACH = 3.0
#: Width (px) of the raised-cosine edges of the region weights.
REGION_EDGE = 3.0
#: Half-map FSC level at which two reconstructions of a region are compared.  Measured on the AdK benchmark
#: (12 regions, deformed vs standard maps, choice against the truth's FSC = 0.5 resolution): the FSC = 0.5
#: crossing agreed with the truth in 11 of 12 regions, the FSC = 0.143 crossing in 9, the mean FSC difference over
#: the shells above 0.143 in 10, information Σ n_shell log(1 + SSNR) (dominated by the noisy outer shells) in 7.
CHOICE_THRESHOLD = 0.5


@dataclass
class RegionalChoice:
    """Region weights ``(K, N, N, N)`` (summing to ≤ 1, 0 in the solvent), per-region half-map FSC = 0.5
    crossing of the two half-map pairs ``(K,)`` in shells (:func:`fsc_shell`), and which pair each region takes
    (``use_second (K,)`` bool)."""

    weights: Tensor
    shell_first: Tensor
    shell_second: Tensor
    use_second: Tensor

    def alpha(self) -> Tensor:
        """Weight ``(N, N, N)`` of the second reconstruction (0 = first everywhere)."""
        return (self.weights * self.use_second.to(self.weights.dtype)[:, None, None, None]).sum(0)


def region_weights(points: Tensor, box: int, n_regions: int, seed: int = 0) -> Tensor:
    """Soft partition ``(K, N, N, N)`` float32 of the model's envelope into ``K`` spatial regions.

    The points are clustered by k-means (``K = min(n_regions, M)``); a voxel belongs to the region of its
    nearest point, with weight 1 within :data:`REGION_REACH` px of the model, falling to 0 over
    :data:`REGION_EDGE` px.  Region borders are softened by averaging the hard labels over a
    ``REGION_EDGE``-wide neighbourhood so the weights sum to the envelope.
    """
    from relion_dynamight.analysis.latent import kmeans

    pts = points.detach().float().cpu()
    k = max(1, min(int(n_regions), pts.shape[0]))
    labels = kmeans(pts, k, seed=seed)[1] if k > 1 else torch.zeros(pts.shape[0], dtype=torch.long)
    axis = torch.arange(box, dtype=torch.float32) - box // 2
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).flip(-1).reshape(-1, 3)
    dist, nearest = nearest_point(grid, pts)
    t = ((dist - REGION_REACH) / REGION_EDGE).clamp(0.0, 1.0)
    envelope = (0.5 + 0.5 * torch.cos(math.pi * t)).reshape(box, box, box)
    hard = torch.nn.functional.one_hot(labels[nearest], k).T.reshape(k, box, box, box).float()
    width = max(1, int(round(REGION_EDGE)))
    smooth = torch.nn.functional.avg_pool3d(hard[None], 2 * width + 1, stride=1, padding=width,
                                            count_include_pad=False)[0]
    smooth = smooth / smooth.sum(0, keepdim=True).clamp_min(1e-12)
    return smooth * envelope


def nearest_point(grid: Tensor, points: Tensor, chunk: int = 32768) -> tuple[Tensor, Tensor]:
    """Distance and index ``(G,)`` of the nearest of ``points (M, 3)`` to each of ``grid (G, 3)`` (chunked)."""
    dist, idx = [], []
    for i in range(0, grid.shape[0], chunk):
        d = torch.cdist(grid[i:i + chunk], points)
        v, j = d.min(dim=1)
        dist.append(v)
        idx.append(j)
    return torch.cat(dist), torch.cat(idx)


def fsc_shell(half1: Tensor, half2: Tensor, mask: Tensor, threshold: float = CHOICE_THRESHOLD) -> float:
    """Where the masked half-map FSC first falls below ``threshold``, in shells (linear between shells; the
    last shell if it never does).  Larger is better: a spatial frequency of ``shell / N`` per pixel."""
    curve = fsc(half1 * mask, half2 * mask)
    shell = crossing_shell(curve, threshold)
    return float(curve.shape[0] - 1) if shell is None else shell


def regional_choice(first: tuple[Tensor, Tensor], second: tuple[Tensor, Tensor], points: Tensor,
                    n_regions: int = 12, margin: float = 0.01) -> RegionalChoice:
    """Which of two half-map pairs resolves each region better: the masked half-map FSC = 0.5 crossing
    (:func:`fsc_shell`).  The second pair is taken where its crossing lies more than ``margin`` (a fraction)
    beyond the first's.  ``points``: the model that defines the regions (:func:`region_weights`).
    """
    weights = region_weights(points, first[0].shape[-1], n_regions)
    shell_1 = torch.tensor([fsc_shell(first[0], first[1], w) for w in weights], dtype=torch.float64)
    shell_2 = torch.tensor([fsc_shell(second[0], second[1], w) for w in weights], dtype=torch.float64)
    use = shell_2 > shell_1 * (1 + margin)
    return RegionalChoice(weights, shell_1, shell_2, use)


def blend(first: Tensor, second: Tensor, alpha: Tensor) -> Tensor:
    """``first + alpha · (second − first)`` (``alpha`` from :meth:`RegionalChoice.alpha`)."""
    return first + alpha.to(first.dtype) * (second - first)
