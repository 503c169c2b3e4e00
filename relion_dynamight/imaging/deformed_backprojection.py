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
  (trilinear, 2× padded grid, one buffer zeroed and reused for every group), inverse-FFT'd once into an
  un-normalised real-space backprojection ``B`` (for cubic interpolation the spectrum is first divided by
  the sampled cubic B-spline's DFT, so the IFFT directly gives ``B``'s exact B-spline coefficients); the
  IFFT is cropped axis by axis to the central box plus the group's largest displacement
  (:func:`centred_irfft3_crop`);
* only the central ``box³`` region (where the deformation lives; the taper blends it to the identity at
  radius ``box/2``) is warped, and only its CHANGE ``Γ^*B − B`` is kept (``delta``, ``box³``): the sum of
  the unwarped ``B`` over groups is the inverse FFT of the undeformed sum, computed once at the end.  With
  the identity deformation the result is exactly the standard reconstruction;
* the warp samples the apodised ``B`` (trilinear gridding of the insertion) and moves the apodisation
  with it, so each warped value is multiplied by ``g(x) / g(Γ(x))`` (``g = sinc²(r/P)``) to keep the
  apodisation that the final gridding correction removes at ``x``;
* CTF² weights are summed without deformation; at the end the unwarped sum is reconstructed as usual
  (the standard map) and the summed change ``delta`` is FFT'd, divided by the weights floored at
  :data:`DEFAULT_WEIGHT_FLOOR` × their shell mean (warped data do not sit on the Fourier voxels where their
  weights were summed: unfloored, sparse voxels blow them up) and gridding-corrected
  (:func:`.backprojection.normalise_backprojection`); the two are added.

Interpolation (``interpolation=``): ``"cubic"`` (default: cubic B-spline, exact at the voxels, keeps the
high frequencies) or ``"linear"`` (trilinear; at fractional offsets it low-passes, e.g. amplitude 0.71 at
½ Nyquist for a half-voxel offset).  Measured in README "Deformed backprojection".

Both sums are plain sums over particles, so MPI ranks handle disjoint groups and add their sums.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from relion_dynamight.imaging.backprojection import (FourierAccumulator, Method, Reducer, centred_irfft3_crop,  # noqa: F401
                                                     inverse_weight, normalise_backprojection, wiener_key)
from relion_dynamight.imaging.geometry import grid_points_3d
from relion_dynamight.imaging.warp import (DEFAULT_INTERPOLATION, Interpolation, bspline_node_values,
                                           bspline_prefilter_3d, central_slices, sample_bspline, sample_volume)


#: Fraction of the shell-mean CTF² weight below which the weights of the deformed map are floored.
DEFAULT_WEIGHT_FLOOR = 0.5


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


def taper_positions(positions: Tensor, taper: Tensor, identity: Tensor | None = None) -> Tensor:
    """Blend a dense position field ``(n, n, n, 3)`` towards the identity with weights ``taper (n, n, n)``.

    ``identity``: the voxel positions (:func:`.geometry.grid_points_3d`), if the caller has them cached.
    """
    ident = grid_points_3d(positions.shape[0], device=positions.device, dtype=positions.dtype) \
        if identity is None else identity.to(positions.dtype)
    return torch.addcmul(ident, taper[..., None].to(positions.dtype), positions - ident)


def floor_weights(weight_grid: Tensor, box: int, pad: int, fraction: float) -> Tensor:
    """``max(W, fraction · <W>_shell)`` on the padded ``(P, P, P//2+1)`` weight grid (shells of the box grid).

    The warped data of a group no longer sit exactly on the Fourier voxels where its CTF² weights were
    summed, so dividing by a near-empty voxel's weight amplifies them without bound; the floor bounds it.
    """
    from relion_dynamight.imaging.backprojection import _shell_grid, _shell_mean

    if fraction <= 0:
        return weight_grid
    size = weight_grid.shape[0]
    shells, inside = _shell_grid(size, box, pad, box / 2, weight_grid.device)
    avg = _shell_mean(weight_grid, shells, inside, box // 2 + 1).float()
    del inside
    floor = (fraction * avg)[shells]
    del shells
    return torch.maximum(weight_grid, floor, out=floor)


def gridding_at(points: Tensor, padded_size: int) -> Tensor:
    """RELION's trilinear gridding function ``sinc²(|p| / P)`` at points ``(..., 3)`` (pixels from the centre)."""
    r = points.norm(dim=-1) * (1.0 / padded_size)
    return torch.sinc(r) ** 2


class DeformedBackprojector:
    """Accumulates warped group backprojections (real space) and undeformed CTF² weights.

    ``add_group`` (or ``insert`` … ``finish_group``) once per group, ``reduce_(comm)`` to sum over MPI ranks,
    ``reconstruct()`` for the map.  State: the undeformed Fourier sums of all groups (``undeformed``), the
    summed change made by the warps on the central box (``delta``, ``box³``, real space, un-normalised and
    still apodised), and one group accumulator reused for every group.  Memory: two padded accumulators
    plus, per group, one padded real-space grid; independent of the number of particles.
    """

    def __init__(self, box: int, pad: int = 2, device: torch.device | str | None = None,
                 max_radius_px: float | None = None, taper_width: float = 3.0,
                 interpolation: Interpolation = DEFAULT_INTERPOLATION) -> None:
        if interpolation not in ("linear", "cubic"):
            raise ValueError(f"unknown interpolation {interpolation!r}; use 'linear' or 'cubic'")
        self.box, self.pad = int(box), int(pad)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.max_radius_px = max_radius_px
        self.interpolation: Interpolation = interpolation
        self._group = self._new_accumulator()
        # undeformed sums of all groups: its weights are the W of the division; its data, left unwarped,
        # give the standard reconstruction of the same particles for free (:meth:`standard_reconstruction`)
        self.undeformed = self._new_accumulator()
        self.delta = torch.zeros((self.box,) * 3, dtype=torch.float32, device=self.device)
        taper = edge_taper(self.box, taper_width, self.device) if taper_width > 0 else None
        self._taper = taper
        # voxels whose position can differ from the identity (the taper is 0 beyond radius box/2)
        self._moving = taper > 0 if taper is not None else torch.ones_like(self.delta, dtype=torch.bool)
        self._spectral_filter: Tensor | None = None      # (P, P, P//2+1): B-spline prefilter / scale
        self._node_cache: tuple[Tensor, Tensor] | None = None
        self._change_cache: tuple[tuple, Tensor] | None = None   # last inverse of the floored weights
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
        if positions is not None:
            pos = positions.to(self.device, torch.float32)
            if self._taper is not None:
                pos = taper_positions(pos, self._taper, self._nodes(self._group.size)[0])
            self._add_warp_change(acc, pos)
        self.undeformed.add_(acc)
        self.count += acc.count
        self.n_groups += 1
        acc.reset_()

    def _add_warp_change(self, acc: FourierAccumulator, pos: Tensor) -> None:
        """``delta += g(x)/g(Γ(x)) · B(Γ(x)) − B(x)`` on the central box, for the group in ``acc``."""
        size = acc.size
        nodes, g_nodes = self._nodes(size)
        shift = pos - nodes
        inside = self._moving & (shift != 0).any(dim=-1)
        points = pos[inside]
        if points.shape[0] == 0:                                   # the identity: nothing changes
            return
        # only the central box plus the largest displacement (and the kernel's reach) is needed: one host sync
        reach = int(math.ceil(float(shift.abs().amax()))) + 3
        region = min(size, self.box + 2 * reach)
        grid = acc.data_grid()
        cubic = self.interpolation == "cubic"
        grid *= self._filter(size) if cubic else 1.0 / acc._scale
        coeffs = centred_irfft3_crop(grid, size, region)           # B (linear) or its B-spline coefficients
        del grid
        sl = central_slices(region, self.box)
        if cubic:
            wide = tuple(slice(s.start - 1, s.stop + 1) for s in sl)
            unwarped = bspline_node_values(coeffs[wide])[inside]   # B at the voxels
            warped = sample_bspline(coeffs, points)
        else:
            unwarped = coeffs[sl][inside]
            warped = sample_volume(coeffs, points, padding_mode="zeros")
        self.delta[inside] += warped * (g_nodes[inside] / gridding_at(points, size)) - unwarped

    def _nodes(self, size: int) -> tuple[Tensor, Tensor]:
        """Voxel positions ``(box³, 3)`` of the central box and the gridding function there (cached)."""
        if self._node_cache is None:
            nodes = grid_points_3d(self.box, device=self.device)
            self._node_cache = (nodes, gridding_at(nodes, size))
        return self._node_cache

    def _filter(self, size: int) -> Tensor:
        if self._spectral_filter is None:
            self._spectral_filter = bspline_prefilter_3d(size, self.device) / self._group._scale
        return self._spectral_filter

    def _new_accumulator(self) -> FourierAccumulator:
        return FourierAccumulator(self.box, self.pad, self.device, self.max_radius_px)

    def add_group(self, spectra: Tensor, weights: Tensor, rotations: Tensor, positions: Tensor | None) -> None:
        """Insert one whole group and warp it (:meth:`insert` + :meth:`finish_group`)."""
        self.insert(spectra, weights, rotations)
        self.finish_group(positions)

    def reduce_(self, comm: Reducer) -> "DeformedBackprojector":
        """Sum the warp changes, the undeformed sums and the counts over MPI ranks (in place)."""
        if getattr(comm, "size", 1) <= 1:
            return self
        delta = comm.allreduce_sum(self.delta.cpu().numpy())
        self.delta = torch.from_numpy(np.ascontiguousarray(delta)).to(self.device)
        counts = comm.allreduce_sum(np.array([self.count, self.n_groups], dtype=np.int64))
        self.count, self.n_groups = int(counts[0]), int(counts[1])
        self.undeformed.reduce_(comm)
        return self

    # -- read-out -----------------------------------------------------------------------------
    def weight_grid(self) -> Tensor:
        """Summed, Hermitian-symmetrised CTF² weights ``(P, P, P//2+1)``."""
        if self._group.count:
            raise RuntimeError("finish_group() must be called before reading the weights")
        return self.undeformed.weight_grid()

    def backprojection_volume(self) -> Tensor:
        """The summed warped backprojection, padded ``(P, P, P)``, un-normalised and NOT gridding-corrected."""
        volume = self.undeformed.backprojection_volume(crop=False, gridding_correct=False)
        volume[central_slices(volume.shape[-1], self.box)] += self.delta
        return volume

    def reconstruct(self, wiener: float | Tensor | None = None, method: Method | None = None,
                    mask_corners: bool = True, weight_floor: float | None = None) -> Tensor:
        """The deformation-corrected map ``(box, box, box)`` float32.

        = the standard reconstruction of all groups' unwarped sum (divided by the CTF² weights ``W``) plus
        the warp changes ``delta`` divided by ``W`` floored at ``weight_floor`` × its shell mean
        (:func:`floor_weights`; None = :data:`DEFAULT_WEIGHT_FLOOR`).  The warped data do not sit exactly on
        the Fourier voxels where their weights were summed, so dividing them by a nearly empty voxel's
        weight would amplify them without bound (measured: the maps of 200-particle half sets at box
        48–64 were noise); the unwarped part is consistent with ``W`` and keeps the plain division, so the
        identity deformation still gives exactly the standard map.
        """
        floor = DEFAULT_WEIGHT_FLOOR if weight_floor is None else weight_floor
        if floor <= 0:
            weights = floor_weights(self.weight_grid(), self.box, self.pad, floor)
            return normalise_backprojection(self.backprojection_volume(), weights, self.box, self.pad,
                                            self.max_radius_px, wiener=wiener, method=method,
                                            gridding_corrected=False, mask_corners=mask_corners)
        standard = self.standard_reconstruction(wiener=wiener, method=method, mask_corners=mask_corners)
        inv = self._change_inverse(wiener, method, floor)
        # with ``inv`` given, the weight-grid argument only supplies the grid size and device
        change = normalise_backprojection(self.delta, inv, self.box, self.pad, self.max_radius_px,
                                          gridding_corrected=False, mask_corners=mask_corners, inv=inv)
        return standard + change

    def _change_inverse(self, wiener: float | Tensor | None, method: Method | None, floor: float) -> Tensor:
        """Inverse of the floored weights for ``delta`` (the last one is cached, like the standard map's)."""
        key = (self.undeformed._version, method, wiener_key(wiener), floor)
        if self._change_cache is not None and self._change_cache[0] == key:
            return self._change_cache[1]
        self._change_cache = None
        if self._group.count:
            raise RuntimeError("finish_group() must be called before reading the weights")
        weights = floor_weights(self.undeformed.weight_grid(), self.box, self.pad, floor)
        radius = self.box / 2 if self.max_radius_px is None else min(float(self.max_radius_px), self.box / 2)
        inv = inverse_weight(weights, self.box, self.pad, radius, method=method, wiener=wiener)
        del weights
        if self.undeformed.cache_inverse:
            self._change_cache = (key, inv)
        return inv

    def standard_reconstruction(self, wiener: float | Tensor | None = None, method: Method | None = None,
                                mask_corners: bool = True) -> Tensor:
        """The ordinary (undeformed) reconstruction of the same particles, for comparison."""
        return self.undeformed.reconstruct(wiener=wiener, method=method, mask_corners=mask_corners)
