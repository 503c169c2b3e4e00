"""Deformation-corrected weighted backprojection (paper: "Improved 3D reconstruction", eq. 7 approximation).

For particle ``i`` with forward deformation ``Γ_i`` (consensus → deformed frame) the improved map is::

    f = W⁻¹ · Σ_i  Γ_i^*( P_i^* (CTF_i · g_i) )

where ``P_i^*`` backprojects the CTF-multiplied image (in the particle's deformed frame), ``Γ_i^*`` pulls
that volume into the consensus frame (``B_cons(x) = B(Γ_i(x))``, see :mod:`.warp`) and ``W`` is the
*undeformed* sum of CTF² slices (the paper's approximation of the normal operator, applied as a division
in Fourier space with RELION's inverse-weight methods, :func:`.backprojection.inverse_weight`).

Algorithm (O(box²) per particle instead of the original's O(box³)):

* particles are grouped so that members share (approximately) one deformation (:mod:`.grouping`);
* the members of a group are Fourier-inserted into one :class:`~.backprojection.FourierAccumulator`
  (trilinear, 2× padded grid), inverse-FFT'd once into an un-normalised real-space backprojection;
* that volume is warped ONCE with the group's dense deformation, and added to a padded real-space sum;
  the warp acts on the central ``box³`` region (where the deformation lives), the padding keeps the
  unwarped streaks so that with the identity deformation the result is exactly the standard
  reconstruction;
* CTF² weights are summed without deformation; at the end the real-space sum is FFT'd, divided by the
  weights (Wiener/floor or Pipe–Menon) and gridding-corrected (:func:`.backprojection.normalise_backprojection`).

Both sums are plain sums over particles, so MPI ranks handle disjoint groups and add their sums.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from relion_dynamight.imaging.backprojection import FourierAccumulator, Method, normalise_backprojection
from relion_dynamight.imaging.warp import central_slices, warp_volume


def edge_taper(box: int, width: float = 3.0, device: torch.device | None = None) -> Tensor:
    """Weight ``(box,)*3`` that is 1 inside radius ``box/2 − width`` and falls to 0 at ``box/2`` (raised cosine).

    Multiplies displacements so that the warped central region joins the unwarped padding smoothly.
    """
    c = torch.arange(box, device=device, dtype=torch.float32) - box // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    r = torch.sqrt(x**2 + y**2 + z**2)
    inner = box / 2 - width
    t = ((r - inner) / width).clamp(0.0, 1.0)
    return 0.5 + 0.5 * torch.cos(math.pi * t)


def taper_positions(positions: Tensor, taper: Tensor) -> Tensor:
    """Blend a dense position field ``(n, n, n, 3)`` towards the identity with weights ``taper (n, n, n)``."""
    from relion_dynamight.imaging.geometry import grid_points_3d

    ident = grid_points_3d(positions.shape[0], device=positions.device, dtype=positions.dtype)
    return ident + taper[..., None].to(positions.dtype) * (positions - ident)


class DeformedBackprojector:
    """Accumulates warped group backprojections (real space, padded) and undeformed CTF² weights.

    ``add_group`` once per group, ``reduce_(comm)`` to sum over MPI ranks, ``reconstruct()`` for the map.
    Memory: two padded real/Fourier grids of ``(pad·box)³`` values plus one group accumulator,
    independent of the number of particles.
    """

    def __init__(self, box: int, pad: int = 2, device: torch.device | str | None = None,
                 max_radius_px: float | None = None, taper_width: float = 3.0) -> None:
        self.box, self.pad = int(box), int(pad)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.max_radius_px = max_radius_px
        self._group = self._new_accumulator()
        # undeformed sums of all groups: its weights are the W of the division; its data, left unwarped,
        # give the standard reconstruction of the same particles for free (:meth:`standard_reconstruction`)
        self.undeformed = self._new_accumulator()
        size = self._group.size
        self.volume = torch.zeros((size, size, size), dtype=torch.float32, device=self.device)
        self._taper = edge_taper(self.box, taper_width, self.device) if taper_width > 0 else None
        self.count = 0
        self.n_groups = 0

    # -- accumulation -------------------------------------------------------------------------
    def insert(self, spectra: Tensor, weights: Tensor, rotations: Tensor) -> None:
        """Insert a batch of the current group (see :meth:`.FourierAccumulator.insert`)."""
        self._group.insert(spectra, weights, rotations)

    def finish_group(self, positions: Tensor | None) -> None:
        """Warp the current group's backprojection with ``positions`` and add it to the sum.

        ``positions``: ``(box, box, box, 3)`` deformed-frame position ``Γ(x)`` (pixels from the centre)
        of every consensus voxel ``x``, or None for the identity.
        """
        acc = self._group
        if acc.count == 0:
            return
        bp = acc.backprojection_volume(crop=False, gridding_correct=True)
        self.volume += bp
        if positions is not None:
            pos = positions.to(self.device, torch.float32)
            if self._taper is not None:
                pos = taper_positions(pos, self._taper)
            sl = central_slices(bp.shape[-1], self.box)
            self.volume[sl] += warp_volume(bp, pos) - bp[sl]
        self.undeformed.add_(acc)
        self.count += acc.count
        self.n_groups += 1
        self._group = self._new_accumulator()

    def _new_accumulator(self) -> FourierAccumulator:
        return FourierAccumulator(self.box, self.pad, self.device, self.max_radius_px)

    def add_group(self, spectra: Tensor, weights: Tensor, rotations: Tensor, positions: Tensor | None) -> None:
        """Insert one whole group and warp it (:meth:`insert` + :meth:`finish_group`)."""
        self.insert(spectra, weights, rotations)
        self.finish_group(positions)

    def reduce_(self, comm: object) -> "DeformedBackprojector":
        """Sum the real-space volume, the weights and the counts over MPI ranks (in place)."""
        if getattr(comm, "size", 1) <= 1:
            return self
        vol = comm.allreduce_sum(self.volume.cpu().numpy())  # type: ignore[attr-defined]
        self.volume = torch.from_numpy(vol).to(self.device)
        counts = comm.allreduce_sum(np.array([self.count, self.n_groups], dtype=np.int64))  # type: ignore[attr-defined]
        self.count, self.n_groups = int(counts[0]), int(counts[1])
        self.undeformed.reduce_(comm)
        return self

    # -- read-out -----------------------------------------------------------------------------
    def weight_grid(self) -> Tensor:
        """Summed, Hermitian-symmetrised CTF² weights ``(P, P, P//2+1)``."""
        if self._group.count:
            raise RuntimeError("finish_group() must be called before reading the weights")
        return self.undeformed.weight_grid()

    def reconstruct(self, wiener: float | Tensor | None = None, method: Method | None = None,
                    mask_corners: bool = True) -> Tensor:
        """The deformation-corrected map ``(box, box, box)`` float32."""
        return normalise_backprojection(self.volume, self.weight_grid(), self.box, self.pad, self.max_radius_px,
                                        wiener=wiener, method=method, gridding_corrected=True,
                                        mask_corners=mask_corners)

    def standard_reconstruction(self, wiener: float | Tensor | None = None, method: Method | None = None,
                                mask_corners: bool = True) -> Tensor:
        """The ordinary (undeformed) reconstruction of the same particles, for comparison."""
        return self.undeformed.reconstruct(wiener=wiener, method=method, mask_corners=mask_corners)

