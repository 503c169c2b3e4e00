"""Group particles whose deformations agree within a tolerance (the deformed backprojection's "group resolution").

Each particle is described by the displacements ``(m, 3)`` (pixels) its deformation gives to ``m`` probe
points (e.g. a subset of the Gaussian centres).  Two particles are close when the RMS, over probe points,
of the difference of their displacement vectors is small.  Groups are made by bisecting k-means: the
group with the largest RMS spread is split in two until every group's spread is at most ``tolerance``
pixels (or ``max_groups`` is reached); the spread of a group is the largest, over probe points, RMS
deviation of its members' displacements from the group mean.  One warp per group then stands in for the
warps of all its members, with an RMS position error of at most about the spread at every probe point.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _spread(features: Tensor) -> float:
    """Spread (pixels) of ``(P, m, 3)`` displacement sets: the largest, over probe points, RMS deviation of
    the members' displacement from the group mean (so a small moving domain is not diluted by static ones)."""
    if features.shape[0] < 2:
        return 0.0
    dev = features - features.mean(dim=0, keepdim=True)
    return float(dev.pow(2).sum(dim=-1).mean(dim=0).max().sqrt())


def _two_means(flat: Tensor, n_iter: int = 15) -> Tensor:
    """Split rows of ``flat (P, F)`` into two clusters; returns a bool mask of the second cluster."""
    mean = flat.mean(dim=0)
    a = flat[torch.argmax((flat - mean).pow(2).sum(dim=1))]
    b = flat[torch.argmax((flat - a).pow(2).sum(dim=1))]
    side = torch.zeros(flat.shape[0], dtype=torch.bool, device=flat.device)
    for _ in range(n_iter):
        new = (flat - b).pow(2).sum(dim=1) < (flat - a).pow(2).sum(dim=1)
        if new.all() or not new.any():
            break
        if torch.equal(new, side):
            break
        side = new
        a, b = flat[~side].mean(dim=0), flat[side].mean(dim=0)
    if side.all() or not side.any():  # identical rows: split in half deterministically
        side = torch.arange(flat.shape[0], device=flat.device) >= flat.shape[0] // 2
    return side


def group_by_deformation(features: Tensor, tolerance: float, max_groups: int | None = None) -> Tensor:
    """Group labels ``(P,)`` (``0 .. G-1``, deterministic) for displacement sets ``features (P, m, 3)`` px.

    ``tolerance <= 0`` gives one group per particle (the per-particle reference).
    """
    n = features.shape[0]
    if tolerance <= 0:
        return torch.arange(n, device=features.device)
    flat = features.reshape(n, -1).float()
    m = max(1, features.shape[1])
    groups: list[Tensor] = [torch.arange(n, device=features.device)]
    spreads = [_spread(features[groups[0]])]
    limit = max_groups if max_groups is not None else n
    while len(groups) < limit:
        worst = max(range(len(groups)), key=lambda g: spreads[g])
        if spreads[worst] <= tolerance or groups[worst].numel() < 2:
            break
        members = groups[worst]
        side = _two_means(flat[members] / m**0.5)
        parts = [members[~side], members[side]]
        groups[worst:worst + 1] = parts
        spreads[worst:worst + 1] = [_spread(features[p]) for p in parts]
    labels = torch.empty(n, dtype=torch.long, device=features.device)
    # order groups by their smallest member so labels do not depend on split order details
    for g, members in enumerate(sorted(groups, key=lambda t: int(t.min()))):
        labels[members] = g
    return labels


def group_spreads(features: Tensor, labels: Tensor) -> Tensor:
    """RMS spread (pixels) of every group, ``(G,)``."""
    n_groups = int(labels.max()) + 1 if labels.numel() else 0
    return torch.tensor([_spread(features[labels == g]) for g in range(n_groups)])


def group_representatives(features: Tensor, labels: Tensor) -> Tensor:
    """Index ``(G,)`` of the member of each group closest to the group's mean displacement (its medoid)."""
    n_groups = int(labels.max()) + 1 if labels.numel() else 0
    reps = torch.empty(n_groups, dtype=torch.long)
    for g in range(n_groups):
        members = torch.nonzero(labels == g).flatten()
        sub = features[members]
        d = (sub - sub.mean(dim=0, keepdim=True)).pow(2).sum(dim=(-1, -2))
        reps[g] = members[torch.argmin(d)]
    return reps
