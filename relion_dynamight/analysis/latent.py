"""Latent-space analysis as pure torch functions: embeddings, clustering, paths, deformation statistics.

Conventions
-----------
* ``z`` is a ``(n, L)`` tensor of latent means (one row per particle, rows in input order of the subset).
* A :class:`DeformableModel` is one half set's trained model: consensus Gaussian ``positions`` ``(M, 3)`` (x, y, z)
  in pixels from the box centre, ``amplitudes`` ``(M,)``, ``widths`` ``(M,)`` (standard deviations, pixels),
  and a ``decoder`` callable ``(positions (M, 3), z (B, L)) -> displacements (B, M, 3)`` in pixels.
* Embeddings are 2D (or kD) coordinates per particle; the PCA embedding is ``(z - mean) @ components.T``.

Nothing here reads or writes files; :mod:`relion_dynamight.jobs.explore` does the I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from relion_dynamight.errors import InputError

Decoder = Callable[[Tensor, Tensor], Tensor]


@dataclass
class DeformableModel:
    """One half set's consensus Gaussian model and deformation decoder (see module docstring)."""

    positions: Tensor
    amplitudes: Tensor
    widths: Tensor
    decoder: Decoder
    encoder: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None

    @property
    def device(self) -> torch.device:
        return self.positions.device


class MaskedDecoder(torch.nn.Module):
    """``decoder`` restricted to a soft mask: ``d(x, z) · m(x)``, with ``m`` the mask ``(N, N, N)`` ``[z, y, x]``
    (values in [0, 1]) looked up trilinearly at the undeformed positions ``x`` ``(M, 3)`` (pixels from the box
    centre, (x, y, z)).  Outside the mask nothing moves, inside the motion is the decoder's, blended in the soft
    edge: the same rule as ``deformable-backprojection --mask-file``, so analysis and maps agree."""


    mask: Tensor
    def __init__(self, decoder: Decoder, mask: Tensor) -> None:
        super().__init__()
        self.decoder = decoder
        self.register_buffer("mask", mask.detach().float())

    def forward(self, positions: Tensor, z: Tensor) -> Tensor:
        from relion_dynamight.model.regularizers import mask_to_gaussian_weights

        weights = mask_to_gaussian_weights(self.mask.to(positions.device), positions).to(positions.dtype)
        return self.decoder(positions, z) * weights[None, :, None]


def restrict_to_mask(model: DeformableModel, mask: Tensor) -> DeformableModel:
    """``model`` whose deformations act only inside ``mask`` (:class:`MaskedDecoder`); the encoder is unchanged."""
    import dataclasses

    return dataclasses.replace(model, decoder=MaskedDecoder(model.decoder, mask.to(model.device)))


# -- embeddings ------------------------------------------------------------------------------------
@dataclass
class Pca:
    """``embedding = (z - mean) @ components.T``; ``explained`` = variance fraction per component."""

    mean: Tensor
    components: Tensor
    explained: Tensor
    std: Tensor

    def transform(self, z: Tensor) -> Tensor:
        return (z - self.mean) @ self.components.T

    def inverse(self, coords: Tensor) -> Tensor:
        """Embedding coordinates ``(P, k)`` → latent points ``(P, L)`` in the PCA plane through the mean."""
        k = coords.shape[-1]
        return self.mean + coords @ self.components[:k]


def pca(z: Tensor, k: int = 2) -> Pca:
    """Principal components of ``z`` ``(n, L)``; signs fixed so each component's largest loading is positive.

    ``k`` is clipped to ``L``; with L = 1 the second axis is zero so 2D plots still work.
    """
    n, dim = z.shape
    mean = z.mean(dim=0)
    centred = z - mean
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    var = s**2 / max(n - 1, 1)
    total = var.sum().clamp_min(torch.finfo(z.dtype).tiny)
    sign = torch.sign(vh.gather(1, vh.abs().argmax(dim=1, keepdim=True))).squeeze(1)
    sign[sign == 0] = 1
    vh = vh * sign[:, None]
    kk = min(k, dim)
    comps, expl, std = vh[:kk], var[:kk] / total, var[:kk].sqrt()
    if kk < k:  # pad with zero components (1D latent shown in 2D)
        pad = k - kk
        comps = torch.cat([comps, torch.zeros(pad, dim, dtype=z.dtype, device=z.device)])
        expl = torch.cat([expl, torch.zeros(pad, dtype=z.dtype, device=z.device)])
        std = torch.cat([std, torch.zeros(pad, dtype=z.dtype, device=z.device)])
    return Pca(mean=mean, components=comps, explained=expl, std=std)


def umap_embedding(z: Tensor, seed: int = 0) -> Tensor | None:
    """2D UMAP embedding when the optional ``umap-learn`` package is installed, else None."""
    try:
        import umap
    except ImportError:
        return None
    coords = umap.UMAP(n_components=2, random_state=seed).fit_transform(z.detach().cpu().numpy())
    return torch.as_tensor(coords, dtype=z.dtype, device=z.device)


def density_2d(coords: Tensor, bins: int = 64) -> Tensor:
    """Particle density at each 2D point ``(n, 2)``: count of its cell in a ``bins²`` histogram, / n.

    A histogram lookup (not pairwise kernels) so that it scales to 10⁶ particles.
    """
    lo, hi = coords.min(dim=0).values, coords.max(dim=0).values
    span = (hi - lo).clamp_min(1e-12)
    cell = ((coords - lo) / span * bins).long().clamp(0, bins - 1)
    flat = cell[:, 0] * bins + cell[:, 1]
    counts = torch.bincount(flat, minlength=bins * bins).to(coords.dtype)
    return counts[flat] / coords.shape[0]


# -- clustering -------------------------------------------------------------------------------------
def kmeans(z: Tensor, k: int, seed: int = 0, n_iter: int = 100, n_init: int = 4) -> tuple[Tensor, Tensor]:
    """k-means (k-means++ starts, Lloyd iterations; best of ``n_init``) → ``(centres (k, L), labels (n,))``.

    Clusters are numbered by increasing first principal coordinate of their centre, so the numbering is
    reproducible and ordered along the main axis of variation.
    """
    n = z.shape[0]
    if k < 1:
        raise InputError(f"--clusters {k}: give at least 1 cluster")
    if k > n:
        raise InputError(f"--clusters {k} is more than the {n} particles of this half set; ask for at most {n}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    best: tuple[float, Tensor, Tensor] | None = None
    for _ in range(max(1, n_init)):
        centres = _kmeans_pp(z, k, gen)
        labels = torch.zeros(n, dtype=torch.long, device=z.device)
        for _ in range(n_iter):
            labels_new = torch.cdist(z, centres).argmin(dim=1)
            for c in range(k):
                members = labels_new == c
                if members.any():
                    centres[c] = z[members].mean(dim=0)
            if torch.equal(labels_new, labels):
                break
            labels = labels_new
        labels = torch.cdist(z, centres).argmin(dim=1)
        inertia = float(((z - centres[labels]) ** 2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, centres.clone(), labels.clone())
    assert best is not None
    _, centres, labels = best
    order = torch.argsort(pca(z, 1).transform(centres)[:, 0])
    rank = torch.empty_like(order)
    rank[order] = torch.arange(k, device=order.device)
    return centres[order], rank[labels]


def _kmeans_pp(z: Tensor, k: int, gen: torch.Generator) -> Tensor:
    n = z.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centres = [z[first]]
    d2 = ((z - z[first]) ** 2).sum(dim=1)
    for _ in range(1, k):
        weights = d2.detach().cpu().double()
        if float(weights.sum()) <= 0:
            idx = int(torch.randint(n, (1,), generator=gen))
        else:
            idx = int(torch.multinomial(weights, 1, generator=gen))
        centres.append(z[idx])
        d2 = torch.minimum(d2, ((z - z[idx]) ** 2).sum(dim=1))
    return torch.stack(centres).clone()


# -- paths ------------------------------------------------------------------------------------------
def interpolate_path(waypoints: Tensor, n_frames: int) -> Tensor:
    """Points ``(n_frames, L)`` equally spaced by arc length along the polyline through ``waypoints (P, L)``."""
    if n_frames < 2:
        raise InputError(f"--n-frames {n_frames}: a movie needs at least 2 frames")
    if waypoints.shape[0] == 1:
        return waypoints.expand(n_frames, -1).clone()
    seg = (waypoints[1:] - waypoints[:-1]).norm(dim=1)
    cum = torch.cat([seg.new_zeros(1), seg.cumsum(0)])
    if float(cum[-1]) == 0.0:
        return waypoints[:1].expand(n_frames, -1).clone()
    t = torch.linspace(0, float(cum[-1]), n_frames, dtype=waypoints.dtype, device=waypoints.device)
    i = torch.searchsorted(cum, t, right=True).clamp(1, len(cum) - 1)
    frac = ((t - cum[i - 1]) / seg[i - 1].clamp_min(1e-12)).clamp(0, 1)[:, None]
    return waypoints[i - 1] + frac * (waypoints[i] - waypoints[i - 1])


def pc_path(p: Pca, component: int, n_frames: int, extent: float = 2.0) -> Tensor:
    """Latent points from ``mean - extent·σ·pc`` to ``mean + extent·σ·pc`` along principal component
    ``component`` (0-based), ``(n_frames, L)``."""
    s = float(p.std[component]) * extent
    ends = torch.stack([p.mean - s * p.components[component], p.mean + s * p.components[component]])
    return interpolate_path(ends, n_frames)


# -- deformations -----------------------------------------------------------------------------------
@torch.no_grad()
def displacements(model: DeformableModel, z: Tensor, positions: Tensor | None = None) -> Tensor:
    """Decoder displacements ``(B, M, 3)`` in pixels for latent points ``z (B, L)`` at ``positions``
    (default: the model's consensus positions)."""
    pos = model.positions if positions is None else positions
    return model.decoder(pos, z.to(pos.device, pos.dtype))


@dataclass
class MotionStats:
    """Deformation statistics of a set of particles, in pixels.

    Per particle: ``rms`` (RMS displacement over Gaussians), ``mean_vector`` (mean displacement over
    Gaussians, ``(n, 3)``).  Per Gaussian: ``mean_abs`` (mean |displacement| over particles), ``std``
    (RMS deviation from the Gaussian's mean displacement: how much it moves between particles).
    """

    rms: Tensor
    mean_vector: Tensor
    mean_abs: Tensor
    std: Tensor

    def direction(self) -> Tensor:
        """Signed motion direction per particle: the mean displacement vector projected on its main axis."""
        v = self.mean_vector - self.mean_vector.mean(dim=0)
        if v.shape[0] < 2 or float(v.abs().max()) == 0.0:
            return torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
        return pca(v, 1).transform(self.mean_vector)[:, 0]


@torch.no_grad()
def motion_statistics(model: DeformableModel, z: Tensor, batch: int = 64,
                      on_batch: Callable[[], None] | None = None) -> MotionStats:
    """Accumulate :class:`MotionStats` over ``z (n, L)`` in batches (memory O(batch·M))."""
    n, m = z.shape[0], model.positions.shape[0]
    dev, dt = model.positions.device, model.positions.dtype
    rms = torch.empty(n, dtype=dt, device=dev)
    mean_vec = torch.empty(n, 3, dtype=dt, device=dev)
    sum_abs = torch.zeros(m, dtype=torch.float64, device=dev)
    sum_d = torch.zeros(m, 3, dtype=torch.float64, device=dev)
    sum_d2 = torch.zeros(m, dtype=torch.float64, device=dev)
    for start in range(0, n, batch):
        d = displacements(model, z[start:start + batch])
        norm = d.norm(dim=-1)
        rms[start:start + len(d)] = norm.pow(2).mean(dim=1).sqrt()
        mean_vec[start:start + len(d)] = d.mean(dim=1)
        sum_abs += norm.sum(dim=0).double()
        sum_d += d.sum(dim=0).double()
        sum_d2 += norm.pow(2).sum(dim=0).double()
        if on_batch is not None:
            on_batch()
    mean_d = sum_d / n
    var = (sum_d2 / n - mean_d.pow(2).sum(dim=1)).clamp_min(0)
    return MotionStats(rms=rms, mean_vector=mean_vec, mean_abs=(sum_abs / n).to(dt), std=var.sqrt().to(dt))


def correlations(values: Tensor, embedding: Tensor) -> Tensor:
    """Pearson correlation of each column of ``values (n, a)`` with each column of ``embedding (n, b)``
    → ``(a, b)``; a constant column gives 0."""
    v = values - values.mean(dim=0)
    e = embedding - embedding.mean(dim=0)
    denom = v.norm(dim=0)[:, None] * e.norm(dim=0)[None, :]
    return torch.where(denom > 0, (v.T @ e) / denom.clamp_min(1e-30), torch.zeros_like(denom))


def angular_features(degrees: Tensor) -> Tensor:
    """``(n,)`` angles → ``(n, 2)`` (cos, sin): angles correlate as circular quantities."""
    rad = torch.deg2rad(degrees)
    return torch.stack([rad.cos(), rad.sin()], dim=1)


def linear_r2(values: Tensor, z: Tensor) -> Tensor:
    """Fraction of the variance of each column of ``values (n, a)`` explained by a linear function of
    ``z (n, L)`` (least squares with intercept) → ``(a,)``; near 0 when the latent ignores the quantity."""
    v = (values - values.mean(dim=0)).double()
    x = (z - z.mean(dim=0)).double()
    coef = torch.linalg.lstsq(x, v).solution
    resid = v - x @ coef
    total = v.pow(2).sum(dim=0)
    return torch.where(total > 0, 1 - resid.pow(2).sum(dim=0) / total.clamp_min(1e-300), torch.zeros_like(total))


def max_abs_correlation(values: Tensor, embedding: Tensor) -> float:
    return float(correlations(values, embedding).abs().max()) if values.numel() else math.nan


# -- maps ---------------------------------------------------------------------------------------------
def render(positions: Tensor, amplitudes: Tensor, widths: Tensor, box: int) -> Tensor:
    """Map ``(box, box, box)`` [z, y, x] of the Gaussians (``imaging.gaussians.render_volume``)."""
    from relion_dynamight.imaging.gaussians import render_volume

    return render_volume(positions, amplitudes, widths, box)


@torch.no_grad()
def deformed_maps(model: DeformableModel, z: Tensor, box: int) -> Tensor:
    """Maps ``(B, box, box, box)`` of the model deformed by the decoder at latent points ``z (B, L)``."""
    d = displacements(model, z)
    return torch.stack([render(model.positions + d[b], model.amplitudes, model.widths, box) for b in range(len(d))])


@torch.no_grad()
def gaussian_value_map(model: DeformableModel, values: Tensor, box: int) -> Tensor:
    """Map of a per-Gaussian quantity ``values (M,)``: Gaussian-weighted local average of the values,
    i.e. ``render(a·v) / render(a)``, set to 0 where the model has under 5 % of its peak density."""
    num = render(model.positions, model.amplitudes * values, model.widths, box)
    den = render(model.positions, model.amplitudes.expand_as(values), model.widths, box)
    inside = den > 0.05 * den.max()
    return torch.where(inside, num / den.clamp_min(1e-30), torch.zeros_like(num))
