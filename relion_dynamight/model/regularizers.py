"""Geometric regularisation of the deformed Gaussian models (paper, "Loss functions and regularization").

* :func:`neighbour_graph` connects Gaussians closer than ``factor × c_mean``, where ``c_mean`` is the mean
  distance of every Gaussian to its two nearest neighbours (the paper's rule, factor 1.5).  Distances are
  computed in row chunks so 30 k Gaussians never need an ``M × M`` matrix at once.
* :func:`edge_length_loss` penalises changes of edge lengths (local isometry; zero for rigid motions).
* :func:`repulsion_loss` penalises listed pairs that come closer than a minimum distance.
* :func:`mask_to_gaussian_weights` turns a user mask into per-Gaussian weights for the decoder.

All positions are ``(x, y, z)`` in pixels from the box centre.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

_CHUNK_ELEMENTS = 1 << 22  # entries of one distance block (16 MiB in float32)


def _row_chunks(m: int, n: int) -> tuple[range, int]:
    """Row blocks of an ``m × n`` distance matrix with at most ``_CHUNK_ELEMENTS`` entries each."""
    step = max(1, _CHUNK_ELEMENTS // max(n, 1))
    return range(0, m, step), step


def nearest_neighbour_distances(positions: Tensor, k: int = 2) -> Tensor:
    """Distances of each point ``(M, 3)`` to its ``k`` nearest other points → ``(M, k)`` (chunked)."""
    m = positions.shape[0]
    if m <= k:
        raise ValueError(f"need more than {k} points for {k} nearest neighbours, got {m}")
    pos = positions.detach()
    starts, step = _row_chunks(m, m)
    out = []
    for i0 in starts:
        d = torch.cdist(pos[i0 : i0 + step], pos)
        rows = torch.arange(d.shape[0], device=pos.device)
        d[rows, rows + i0] = float("inf")
        out.append(torch.topk(d, k, dim=1, largest=False).values)
    return torch.cat(out)


def neighbour_graph(positions: Tensor, factor: float = 1.5) -> tuple[Tensor, Tensor]:
    """Edges between Gaussians closer than ``factor × c_mean`` → ``(edges (E, 2) long, rest_lengths (E,))``.

    ``c_mean`` = mean over all Gaussians of the distance to their two nearest neighbours.  Each
    undirected edge appears once with ``edges[:, 0] < edges[:, 1]``; rest lengths are the current distances.
    """
    pos = positions.detach()
    c_mean = float(nearest_neighbour_distances(pos, 2).mean())
    radius = factor * c_mean
    m = pos.shape[0]
    starts, step = _row_chunks(m, m)
    pieces = []
    for i0 in starts:
        d = torch.cdist(pos[i0 : i0 + step], pos)
        i, j = torch.nonzero(d < radius, as_tuple=True)
        i = i + i0
        keep = i < j
        pieces.append(torch.stack([i[keep], j[keep]], dim=1))
    edges = torch.cat(pieces) if pieces else torch.zeros(0, 2, dtype=torch.long, device=pos.device)
    rest = (pos[edges[:, 0]] - pos[edges[:, 1]]).norm(dim=1)
    return edges, rest


def mean_neighbour_distance(positions: Tensor) -> float:
    """``c_mean`` of :func:`neighbour_graph` (the paper's repulsion distance τ)."""
    return float(nearest_neighbour_distances(positions.detach(), 2).mean())


def _edge_lengths(deformed: Tensor, edges: Tensor) -> Tensor:
    diff = deformed[:, edges[:, 0]] - deformed[:, edges[:, 1]]
    return torch.sqrt((diff**2).sum(-1) + 1e-12)


def edge_length_loss(deformed: Tensor, edges: Tensor, rest_lengths: Tensor) -> Tensor:
    """Mean over particles and edges of ``(|d_ij| − rest_ij)²`` (px²) for deformed models ``(B, M, 3)``."""
    if edges.numel() == 0:
        return deformed.sum() * 0.0
    lengths = _edge_lengths(deformed, edges)
    return ((lengths - rest_lengths.to(lengths.dtype)) ** 2).mean()


def repulsion_loss(deformed: Tensor, pairs: Tensor, min_distance: float | Tensor) -> Tensor:
    """Mean over particles and pairs of ``relu(min_distance − |d_ij|)²`` (px²).

    ``pairs (P, 2)``: candidate pairs (e.g. the edges of :func:`neighbour_graph`, possibly built with a
    larger factor); ``min_distance``: scalar or per-pair ``(P,)`` distance below which a pair is pushed
    apart (the paper uses ``c_mean``).  Pairs farther apart contribute exactly zero.
    """
    if pairs.numel() == 0:
        return deformed.sum() * 0.0
    lengths = _edge_lengths(deformed, pairs)
    limit = torch.as_tensor(min_distance, dtype=lengths.dtype, device=lengths.device)
    return (F.relu(limit - lengths) ** 2).mean()


def mask_to_gaussian_weights(mask: Tensor, positions: Tensor) -> Tensor:
    """Trilinear lookup of a map ``mask[z, y, x]`` ``(N, N, N)`` at positions ``(M, 3)`` px → ``(M,)``.

    Values are clamped to ``[0, 1]``; positions outside the box get 0.
    """
    n = mask.shape[-1]
    idx = positions.detach().to(mask.dtype) + n // 2  # voxel index (x, y, z)
    grid = idx / (n - 1) * 2.0 - 1.0  # align_corners=True: -1 ↔ index 0, +1 ↔ index n-1
    out = F.grid_sample(
        mask[None, None], grid[None, None, None], mode="bilinear", padding_mode="zeros", align_corners=True
    )
    return out.reshape(-1).clamp(0.0, 1.0)
