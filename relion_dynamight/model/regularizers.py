"""Geometric regularisation of the deformed Gaussian models (paper, "Loss functions and regularization").

* :func:`neighbour_graph` connects Gaussians closer than ``factor × c_mean``, where ``c_mean`` is the mean
  distance of every Gaussian to its two nearest neighbours (the paper's rule, factor 1.5).  Both searches
  use a cell list (spatial hashing, pure torch): ``O(M)`` time and memory, no ``M × M`` matrix.
* :func:`edge_length_loss` penalises changes of edge lengths (local isometry; zero for rigid motions).
* :func:`repulsion_loss` penalises listed pairs that come closer than a minimum distance.
* :func:`mask_to_gaussian_weights` turns a user mask into per-Gaussian weights for the decoder.

All positions are ``(x, y, z)`` in pixels from the box centre.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor
from torch.nn import functional as F

from relion_dynamight.imaging.warp import sample_volume

_CHUNK_ELEMENTS = 1 << 22  # candidate pairs handled at once (a few tens of MiB)

# 27 cell offsets (dx, dy, dz) of a cell and its neighbours
_OFFSETS = [(dx, dy, dz) for dz in (-1, 0, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


class _CellList:
    """Points ``(M, 3)`` hashed into cubic cells of side ``h`` (spatial hashing, no dense cell grid).

    Points are sorted by cell key (``order``; ``sorted_points`` in that order, for local memory access);
    ``starts``/``counts`` give each occupied cell's run.  Every point within distance ``h`` of a query lies
    in the query's cell or one of its 26 neighbours.
    """

    def __init__(self, points: Tensor, h: float) -> None:
        self.origin = points.min(0).values
        extent = float((points.max(0).values - self.origin).max())
        self.h = max(h, extent / 2**20, 1e-12)  # at most 2^20 cells per axis: keys stay within int64
        cells = torch.floor((points - self.origin) / self.h).long()
        self.dims = cells.max(0).values + 3  # room for the -1 / +1 neighbours of every occupied cell
        keys = self._key(cells)
        self.order = torch.argsort(keys)
        self.sorted_points = points[self.order]
        self.cell_keys, self.counts = torch.unique_consecutive(keys[self.order], return_counts=True)
        self.starts = torch.cumsum(self.counts, 0) - self.counts

    def _key(self, cells: Tensor) -> Tensor:
        c = cells + 1
        return (c[..., 2] * self.dims[1] + c[..., 1]) * self.dims[0] + c[..., 0]

    def _neighbour_runs(self, queries: Tensor) -> tuple[Tensor, Tensor]:
        """Start (in sorted order) and count of the 27 cells around each query point → ``(Q, 27)`` each."""
        cells = torch.floor((queries - self.origin) / self.h).long()
        offsets = torch.tensor(_OFFSETS, device=queries.device)
        keys = self._key(cells[:, None] + offsets[None])
        pos = torch.searchsorted(self.cell_keys, keys).clamp_max(self.cell_keys.numel() - 1)
        hit = self.cell_keys[pos] == keys
        return self.starts[pos], torch.where(hit, self.counts[pos], torch.zeros_like(pos))

    def candidates(self, queries: Tensor) -> Iterator[tuple[int, Tensor, Tensor]]:
        """For query points ``(Q, 3)``, yield ``(q0, local, j)`` chunks of at most ~``_CHUNK_ELEMENTS``
        candidate pairs: query ``q0 + local`` and sorted point ``j`` (index into ``sorted_points``) in one of
        its 27 cells.  Pairs come grouped by query, queries in increasing order."""
        starts, counts = self._neighbour_runs(queries)
        bounds = torch.cumsum(counts.sum(1), 0)
        q0 = 0
        while q0 < queries.shape[0]:
            limit = (int(bounds[q0 - 1]) if q0 > 0 else 0) + _CHUNK_ELEMENTS
            q1 = max(q0 + 1, int(torch.searchsorted(bounds, torch.tensor([limit], device=bounds.device),
                                                    right=True)))
            n = counts[q0:q1].reshape(-1)
            run = torch.repeat_interleave(torch.arange(n.numel(), device=n.device), n)
            within = torch.arange(run.numel(), device=n.device) - (torch.cumsum(n, 0) - n)[run]
            yield q0, run // len(_OFFSETS), starts[q0:q1].reshape(-1)[run] + within
            q0 = q1


def _distances(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise Euclidean distances of ``(P, 3)`` points, in float64 (independent of the search order)."""
    return (a.double() - b.double()).norm(dim=1)


def _initial_cell_size(pos: Tensor) -> float:
    """Cell side holding about one point on average over the points' bounding box."""
    extent = (pos.max(0).values - pos.min(0).values).double()
    volume = float(extent.clamp_min(float(extent.max()) * 1e-3 + 1e-6).prod())
    return max((volume / pos.shape[0]) ** (1.0 / 3.0), 1e-6)


def _k_smallest_per_group(local: Tensor, d: Tensor, n_groups: int, k: int) -> Tensor:
    """The ``k`` smallest ``d`` per group ``local`` (ints ``0 .. n_groups-1``) → ``(n_groups, k)``, inf-padded."""
    out = torch.full((n_groups, k), float("inf"), dtype=d.dtype, device=d.device)
    if d.numel() == 0:
        return out
    key = local.double() + d / (2.0 * float(d.max()) + 1e-300)  # group, then distance
    sorted_d = d[torch.argsort(key)]
    counts = torch.bincount(local, minlength=n_groups)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(k, device=d.device)
    take = rank[None] < counts[:, None]
    out[take] = sorted_d[(first[:, None] + rank[None])[take]]
    return out


def nearest_neighbour_distances(positions: Tensor, k: int = 2) -> Tensor:
    """Distances of each point ``(M, 3)`` to its ``k`` nearest other points → ``(M, k)`` ascending.

    Cell-list search: each point looks in its 27 cells; its result is final once the ``k``-th distance is
    at most the cell side (nothing closer can lie outside those cells); the others retry with cells twice
    as large.  Memory ``O(M)``; distances in float64, returned in the positions' dtype.
    """
    m = positions.shape[0]
    if m <= k:
        raise ValueError(f"need more than {k} points for {k} nearest neighbours, got {m}")
    pos = positions.detach()
    out = torch.full((m, k), float("inf"), dtype=torch.float64, device=pos.device)
    todo = torch.arange(m, device=pos.device)
    h = _initial_cell_size(pos)
    span = float((pos.max(0).values - pos.min(0).values).double().norm())
    while todo.numel() > 0:
        cells = _CellList(pos, h)
        query = cells.order[torch.isin(cells.order, todo)]  # the points still to do, in cell order
        best = []
        for q0, local, j in cells.candidates(pos[query]):
            i_sorted = query[q0 + local]
            keep = cells.order[j] != i_sorted
            n_groups = int(local.max()) + 1
            d = _distances(pos[i_sorted[keep]], cells.sorted_points[j[keep]])
            best.append(_k_smallest_per_group(local[keep], d, n_groups, k))
        best_t = torch.cat(best)
        done = (best_t[:, k - 1] <= cells.h) | (cells.h > span)
        out[query[done]] = best_t[done]
        todo = query[~done]
        h = cells.h * 2.0
    return out.to(positions.dtype)


def neighbour_graph(positions: Tensor, factor: float = 1.5) -> tuple[Tensor, Tensor]:
    """Edges between Gaussians closer than ``factor × c_mean`` → ``(edges (E, 2) long, rest_lengths (E,))``.

    ``c_mean`` = mean over all Gaussians of the distance to their two nearest neighbours.  Each
    undirected edge appears once with ``edges[:, 0] < edges[:, 1]``, sorted by ``(i, j)``; rest lengths are
    the current distances.  Cell-list search with cells of side ``factor × c_mean``: ``O(M)`` time and
    memory for evenly spread points; pair distances in float64.
    """
    pos = positions.detach()
    m = pos.shape[0]
    c_mean = float(nearest_neighbour_distances(pos, 2).double().mean())
    radius = factor * c_mean
    pieces = []
    if radius > 0:
        cells = _CellList(pos, radius)
        for q0, local, j in cells.candidates(cells.sorted_points):
            i = cells.order[q0 + local]
            jj = cells.order[j]
            keep = i < jj
            close = _distances(cells.sorted_points[(q0 + local)[keep]], cells.sorted_points[j[keep]]) < radius
            pieces.append(torch.stack([i[keep][close], jj[keep][close]], dim=1))
    edges = torch.cat(pieces) if pieces else torch.zeros(0, 2, dtype=torch.long, device=pos.device)
    edges = edges[torch.argsort(edges[:, 0] * m + edges[:, 1])]
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
    """Trilinear lookup of a map ``mask[z, y, x]`` ``(N, N, N)`` at positions ``(M, 3)`` px → ``(M,)``
    (:func:`~relion_dynamight.imaging.warp.sample_volume`).

    Values are clamped to ``[0, 1]``; positions outside the box get 0.
    """
    return sample_volume(mask, positions.detach()).clamp(0.0, 1.0)
