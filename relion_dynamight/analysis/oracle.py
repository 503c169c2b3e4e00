"""What any method could learn from a simulated data set: the Bayes oracle (ceilings for the science benchmark).

The oracle knows everything the simulation used — the true model and its motion, every particle's pose,
origin, CTF, the hidden envelope and the white-noise σ — and only has to infer each particle's conformation
coordinate ``t`` from its noisy image.  On a grid of coordinates it computes the likelihood of the image,
``log p(image | t) = −‖image − clean(t)‖² / 2σ²``, and the posterior under the simulation's uniform prior:

* :func:`posterior_conformations` → posterior mean and standard deviation per particle.  Their |Spearman ρ| with
  the truth bounds the latent order any encoder can reach (an encoder also has to find the pose, which the
  oracle is given); the regression slope of the posterior mean on the truth (``E[t̂ t] / E[t²]``, the R² of the
  best estimate) bounds the share of the true displacement a decoder trained on squared errors recovers
  (:attr:`.truth_scores.DeformationScore.amplitude`): it predicts the *expected* displacement given the image,
  which shrinks towards the mean when the image says little.
* :func:`true_field` → the true deformation at a coordinate as a dense position field, for a deformed
  backprojection with the oracle's coordinates: the gap closure it reaches bounds what a per-particle
  deformation estimate can give (``scripts/bench_science.py``).

Units: coordinates as in ``truth/particles.csv`` (``hinge_angle``; −0.5 … 0.5 for ``--motion adk``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from relion_dynamight.analysis.phantom import Phantom
from relion_dynamight.imaging.warp import grid_nodes

#: Coordinates the posterior is evaluated on (the simulation's adk range, −0.5 … 0.5, in steps of 0.025).
DEFAULT_GRID = np.linspace(-0.5, 0.5, 41)


@dataclass(frozen=True)
class Posterior:
    mean: np.ndarray     # (n,) posterior mean coordinate
    sd: np.ndarray       # (n,) posterior standard deviation


def posterior_conformations(images: Tensor, clean_at: Callable[[float], Tensor], sigma: float,
                            grid: np.ndarray = DEFAULT_GRID) -> Posterior:
    """Posterior of each particle's conformation coordinate on ``grid`` (uniform prior on the grid).

    ``images`` ``(n, N, N)`` real images; ``clean_at(t)`` the noise-free images ``(n, N, N)`` of the same
    particles at coordinate ``t``; ``sigma`` the white noise standard deviation per pixel.
    """
    obs = images.double()
    loglik = np.empty((obs.shape[0], len(grid)))
    for j, t in enumerate(grid):
        loglik[:, j] = (-((obs - clean_at(float(t)).double()) ** 2).sum(dim=(1, 2)) / (2.0 * sigma**2)).numpy()
    loglik -= loglik.max(axis=1, keepdims=True)
    post = np.exp(loglik)
    post /= post.sum(axis=1, keepdims=True)
    mean = post @ grid
    sd = np.sqrt(np.clip(post @ grid**2 - mean**2, 0.0, None))
    return Posterior(mean, sd)


def shrinkage(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Regression slope through the origin of ``estimate`` on ``truth`` (``Σ e t / Σ t²``): the share of the true
    coordinate (for small motions, of the true displacement) an estimate recovers."""
    return float((estimate * truth).sum() / max(float((truth * truth).sum()), 1e-30))


def field_weights(phantom: Phantom, box: int, smoothing: float = 2.0, chunk: int = 8192) -> Tensor:
    """Interpolation weights ``(box³, M)`` from the phantom's Gaussians to every voxel centre: normalised
    ``exp(−d² / 2 s²)`` with ``s = smoothing`` px (a smooth field, like a decoder's: the piecewise-rigid
    nearest-atom field has seams that both half maps share)."""
    nodes = grid_nodes(box, box, dtype=torch.float64).reshape(-1, 3)
    ref = phantom.positions.double()
    out = []
    for i in range(0, nodes.shape[0], chunk):
        d2 = torch.cdist(nodes[i:i + chunk], ref) ** 2
        w = torch.exp(-(d2 - d2.min(dim=1, keepdim=True).values) / (2.0 * smoothing**2))
        out.append((w / w.sum(dim=1, keepdim=True)).float())
    return torch.cat(out)


def true_field(phantom: Phantom, coordinate: float, weights: Tensor) -> Tensor:
    """Deformed-frame position ``Γ_t(x)`` of every voxel ``x`` of the reference conformation, ``(N, N, N, 3)``
    (``[z, y, x]`` voxels, ``(x, y, z)`` pixels from the centre, as :func:`.warp.grid_nodes`), from the true
    displacements of the Gaussians at ``coordinate`` interpolated with :func:`field_weights`."""
    box = phantom.box
    disp = (phantom.true_positions(float(coordinate)) - phantom.true_positions(0.0)).float()
    nodes = grid_nodes(box, box).reshape(-1, 3)
    return (nodes + weights @ disp).reshape(box, box, box, 3)


def coordinate_groups(coords: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """``(labels (n,), centre coordinate per group)``: equal-count bins of ``coords``."""
    edges = np.quantile(coords, np.linspace(0.0, 1.0, n_groups + 1))
    labels = np.clip(np.searchsorted(edges, coords, side="right") - 1, 0, n_groups - 1)
    centres = np.array([coords[labels == g].mean() if np.any(labels == g) else 0.0 for g in range(n_groups)])
    return labels, centres
