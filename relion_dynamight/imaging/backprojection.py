"""Fourier-space backprojection (RELION's ``BackProjector``) as batched torch code.

Conventions (relion-facts §7–9, :mod:`.fourier`)
------------------------------------------------
* Images are ``(B, N, N)`` indexed ``[y, x]``; their spectra come from :func:`.fourier.rfft2_centered`
  (centre-referenced, divided by N²).  A 2D coefficient at integer frequency ``(kx, ky)`` (pixels of
  the N box) is the sample of the 3D transform at ``A.T @ (kx, ky, 0)`` (RELION matrix ``A``).
* The accumulators live on a ``pad``-times finer grid of ``P = pad * N`` points per axis in torch's
  ``rfftn`` layout ``(P, P, P//2 + 1)`` (``kz, ky`` in ``fftfreq`` order, ``kx = 0 .. P/2``).  A sample
  lands at ``p = pad * A.T @ (kx, ky, 0)`` and is spread over its 8 neighbours with trilinear weights;
  samples with ``p_x < 0`` are stored as their Friedel mate (``-p``, complex conjugate), as in RELION.
* Like RELION, only the 2D coefficients with ``kx² + ky² <= r_max²`` are inserted (``r_max = N/2``
  unless ``max_radius_px`` is given), and of the ``kx = 0`` column only ``ky >= 0`` (its other half
  holds the Friedel mates).  Before use the ``kx = 0`` plane of the 3D grid is made Hermitian by
  adding each point to the conjugate of its mirror (RELION's ``enforceHermitianSymmetry``).

Reconstruction = ``crop(IFFT(data × inverse_weight)) / gridding``:

* ``inverse_weight`` (see :func:`inverse_weight`) is either RELION 3.1 ``relion_reconstruct``'s
  default, 10 iterations of Pipe & Menon density compensation with a Kaiser–Bessel blob
  (``method="gridding"``), or the plain division with a floor of 1/1000 of the shell-averaged weight
  (RELION 4/5's ``--skip_gridding``, ``method="floor"``).  An optional Wiener term (a number or a
  per-shell tensor, e.g. from :func:`wiener_term_from_fsc`) is added to the weight first, like
  RELION's ``--fsc`` / tau² regularisation.  The default is chosen by measurement (see
  ``DEFAULT_METHOD`` and tests/imaging/test_backprojection.py).
* The inverse FFT of the padded grid is cropped to the central N box, the corners outside the
  inscribed sphere are softly set to their mean (RELION's ``softMaskOutsideMap``, 3-pixel cosine
  edge), and the map is divided by ``sinc²(r / P)`` (RELION's radial trilinear gridding correction).

Scale: the map has the density units of the projections it was made from (a noise-free
reconstruction of ``relion_project`` images reproduces the projected map, scale 1).

Deformable backprojection (engineer E) uses :meth:`FourierAccumulator.backprojection_volume`
(real-space, un-normalised) and :func:`normalise_backprojection`; see that function for how the two
relate to :meth:`FourierAccumulator.reconstruct`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal, Protocol

import torch
from torch import Tensor

from relion_dynamight.imaging.fourier import irfft3_centered, rfft2_centered, shift_phase_2d

Method = Literal["gridding", "floor"]

#: Inverse-weight method used when none is given (measured against relion_reconstruct, see module doc).
DEFAULT_METHOD: Method = "gridding"
#: RELION's defaults: floor fraction of ``--skip_gridding``, Pipe & Menon iterations, blob r/alpha/order.
FLOOR_FRACTION = 1e-3
GRIDDING_ITERATIONS = 10
BLOB_RADIUS, BLOB_ALPHA = 1.9, 15.0
#: Samples (B·M·8) handled per scatter call, to bound memory for large boxes and batches.
_SCATTER_CHUNK = 4_000_000


# ---------------------------------------------------------------------------------------------
# image preparation
# ---------------------------------------------------------------------------------------------
def prepare_spectra(images: Tensor, shifts: Tensor, ctf: Tensor | None = None,
                    premultiplied: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Images → ``(spectra, weights)`` ready for :meth:`FourierAccumulator.insert`.

    images: ``(B, N, N)`` real; shifts: ``(B, 2)`` the ``+origin`` (x, y) in pixels (the particle is
    centred by translating the image by ``+origin``); ctf: ``(B, N, N//2+1)`` on the rfft2 grid or
    None (no CTF correction: weights are ones); premultiplied: ``(B,)`` bool, images already
    multiplied by their CTF (then the spectrum is not multiplied again, the weight is still CTF²).

    Returns spectra ``(B, N, N//2+1)`` complex64 (= FFT · shift · CTF) and weights ``(B, N, N//2+1)``
    float32 (CTF² or ones).  No real-space mask is applied (``relion_reconstruct`` applies none).
    """
    n = images.shape[-1]
    spectra = rfft2_centered(images.float())
    phase = shift_phase_2d(n, shifts.to(device=images.device, dtype=torch.float64))
    spectra = spectra * phase.to(spectra.dtype)
    if ctf is None:
        return spectra, torch.ones(spectra.shape, dtype=torch.float32, device=spectra.device)
    ctf = ctf.to(device=spectra.device, dtype=torch.float32)
    if premultiplied is None:
        factor = ctf
    else:
        pre = torch.as_tensor(premultiplied, dtype=torch.bool, device=spectra.device)[:, None, None]
        factor = torch.where(pre, torch.ones_like(ctf), ctf)
    return spectra * factor, ctf * ctf


# ---------------------------------------------------------------------------------------------
# the accumulator
# ---------------------------------------------------------------------------------------------
if TYPE_CHECKING:
    import numpy as np


class Reducer(Protocol):
    """What a reduction over MPI ranks needs (``relion_dynamight.parallel.mpi.Comm``; imaging imports nothing of
    ours)."""

    size: int

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray: ...


class FourierAccumulator:
    """Sums of CTF-weighted image spectra (``data``) and CTF² (``weight``) on a padded 3D grid.

    ``data``: ``(P, P, P//2+1)`` complex64, ``weight``: same shape float32, ``P = pad * box``, in
    the rfftn layout described in the module docstring.  Both are plain sums over the inserted
    images, so accumulators of disjoint particle sets add (:meth:`add_`, :meth:`reduce_`).
    ``max_radius_px``: insert only 2D frequencies up to this radius (pixels of the ``box`` grid);
    default and maximum ``box / 2`` (Nyquist), as RELION.

    Internally the sums live in one float32 array ``(P+1, P+1, P//2+2, 3)`` (real, imaginary, weight)
    whose extra last plane on each axis takes the ``+1`` neighbours of the trilinear kernel without a
    modulo; ``data`` and ``weight`` fold it back (they are computed copies, read-only).
    """

    def __init__(self, box: int, pad: int = 2, device: torch.device | str | None = None,
                 max_radius_px: float | None = None) -> None:
        if box < 2 or box % 2:
            raise ValueError(f"box must be an even number >= 2, got {box}")
        self.box, self.pad = int(box), int(pad)
        self.size = self.pad * self.box
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        nyquist = self.box / 2
        self.max_radius_px = nyquist if max_radius_px is None else float(min(max_radius_px, nyquist))
        p, h = self.size, self.size // 2 + 1
        self._acc = torch.zeros((p + 1, p + 1, h + 1, 3), dtype=torch.float32, device=self.device)
        strides = torch.tensor([(p + 1) * (h + 1), h + 1, 1], device=self.device)
        corners = torch.tensor([[dz, dy, dx] for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)],
                               device=self.device)
        self._strides = strides
        self._corner_offsets = (corners * strides).sum(1)          # (8,)
        self._channels = torch.arange(3, device=self.device)
        self.count = 0
        self._slice_index, self._slice_coords = _slice_samples(self.box, self.max_radius_px, self.device)
        self._version = 0                                   # bumped by every change of the sums
        self._inverse_cache: tuple[tuple, Tensor] | None = None

    # -- accumulation -------------------------------------------------------------------------
    def insert(self, spectra: Tensor, weights: Tensor, rotations: Tensor) -> None:
        """Add ``B`` slices: spectra ``(B, N, N//2+1)`` complex, weights same shape real, rotations ``(B, 3, 3)``.

        Spectra follow :func:`prepare_spectra` (shifted by +origin, multiplied by the CTF).
        """
        b, n = spectra.shape[0], spectra.shape[-2]
        if n != self.box or spectra.shape[-1] != n // 2 + 1:
            raise ValueError(f"spectra of shape {tuple(spectra.shape)} do not fit box {self.box}")
        if b == 0:
            return
        vals = torch.view_as_real(spectra.to(self.device, torch.complex64).reshape(b, -1)[:, self._slice_index])
        wts = weights.to(self.device, torch.float32).reshape(b, -1)[:, self._slice_index]
        samples = torch.cat([vals, wts[..., None]], dim=-1)                     # (B, M, 3)
        rot = rotations.to(self.device, torch.float32)
        step = max(1, _SCATTER_CHUNK // max(self._slice_index.numel() * 8, 1))
        for start in range(0, b, step):
            self._scatter(samples[start:start + step], rot[start:start + step])
        self.count += b
        self._changed()

    def _scatter(self, samples: Tensor, rot: Tensor) -> None:
        """Trilinear splatting of ``(b, M, 3)`` samples (re, im, weight) at ``pad * A.T @ (kx, ky, 0)``."""
        p = self.pad * torch.matmul(self._slice_coords, rot[:, :2, :])          # (b, M, 3) = (x, y, z)
        sign = torch.where(p[..., 0] < 0, -1.0, 1.0)
        p = (p * sign[..., None]).flip(-1).reshape(-1, 3)                         # (K, 3) = (z, y, x)
        samples = samples.reshape(-1, 3).clone()
        samples[:, 1] *= sign.reshape(-1)                                         # conjugate the mates
        lo = torch.floor(p)
        frac = p - lo
        lo = lo.long()
        lo[:, :2] += (lo[:, :2] < 0) * self.size                                  # wrap kz, ky into [0, P)
        base = (lo * self._strides).sum(1)                                        # (K,)
        idx = base[None, :] + self._corner_offsets[:, None]                       # (8, K)
        wz, wy, wx = (torch.stack([1 - frac[:, i], frac[:, i]]) for i in range(3))   # each (2, K)
        w8 = (wz[:, None, None] * wy[None, :, None] * wx[None, None, :]).reshape(8, -1)
        # 1D index_add_ over interleaved (re, im, weight): much faster on CPU than adding rows of 3.
        flat_idx = (idx[..., None] * 3 + self._channels).reshape(-1)
        self._acc.view(-1).index_add_(0, flat_idx, (w8[..., None] * samples[None]).reshape(-1))

    @property
    def data(self) -> Tensor:
        """Sum of inserted spectra, ``(P, P, P//2+1)`` complex64 (a computed copy)."""
        return torch.view_as_complex(self._folded()[..., :2].contiguous())

    @property
    def weight(self) -> Tensor:
        """Sum of inserted weights, ``(P, P, P//2+1)`` float32 (a computed copy)."""
        return self._folded()[..., 2].contiguous()

    def _folded(self) -> Tensor:
        p = self.size
        acc = self._acc[:, :, :-1].clone()
        acc[0] += acc[p]
        acc[:, 0] += acc[:, p]
        return acc[:p, :p]

    def reset_(self) -> "FourierAccumulator":
        """Zero the sums and the count in place (reuses the buffer: no new allocation)."""
        self._acc.zero_()
        self.count = 0
        self._changed()
        return self

    def add_(self, other: "FourierAccumulator") -> "FourierAccumulator":
        """Add another accumulator of the same geometry (in place)."""
        if (other.box, other.pad) != (self.box, self.pad):
            raise ValueError("accumulators differ in box or padding")
        self._acc += other._acc.to(self.device)
        self.count += other.count
        self._changed()
        return self

    def reduce_(self, comm: Reducer) -> "FourierAccumulator":
        """Sum ``data``, ``weight`` and ``count`` over MPI ranks (``parallel.mpi.Comm``), in place."""
        if getattr(comm, "size", 1) <= 1:
            return self
        import numpy as np

        total = comm.allreduce_sum(self._acc.cpu().numpy())
        count = comm.allreduce_sum(np.array([self.count], dtype=np.int64))
        self._acc = torch.from_numpy(np.ascontiguousarray(total)).to(self.device)
        self.count = int(count[0])
        self._changed()
        return self

    def _changed(self) -> None:
        self._version += 1
        self._inverse_cache = None

    # -- read-out -----------------------------------------------------------------------------
    def data_grid(self) -> Tensor:
        """``data`` with the ``kx = 0`` plane made Hermitian (a copy), ``(P, P, P//2+1)`` complex.

        Same values as ``_hermitian_x0(self.data)`` (same additions in the same order) with a single full
        copy of the grid instead of three.
        """
        return self._folded_grid(complex_data=True)

    def weight_grid(self) -> Tensor:
        """``weight`` with the ``kx = 0`` plane symmetrised (a copy), ``(P, P, P//2+1)`` real.

        This Fourier-space grid is what :func:`normalise_backprojection` divides by.  Same values as
        ``_hermitian_x0(self.weight, conj=False)`` with one full copy of the grid instead of three.
        """
        return self._folded_grid(complex_data=False)

    def _folded_grid(self, complex_data: bool) -> Tensor:
        """Data (complex) or weight channel folded (``+1`` planes added back) and made Hermitian at ``kx = 0``."""
        p, h = self.size, self.size // 2 + 1
        acc = self._acc

        def channel(t: Tensor) -> Tensor:
            return torch.view_as_complex(t[..., :2].contiguous()) if complex_data else t[..., 2].contiguous()

        out = channel(acc[:p, :p, :h])
        out[0] += channel(acc[p, :p, :h])                                            # fold the kz = P plane
        column = channel(acc[:p, p, :h])
        column[0] += channel(acc[p, p, :h])
        out[:, 0] += column                                                          # fold the ky = P row
        plane = out[:, :, 0].clone()
        mirror = torch.roll(torch.flip(plane, dims=(0, 1)), shifts=(1, 1), dims=(0, 1))
        out[:, :, 0] = plane + (mirror.conj() if complex_data else mirror)
        return out

    #: Same as :meth:`weight_grid` (the weights are a Fourier-space grid, not a real-space map).
    weight_volume = weight_grid

    def reconstruct(self, wiener: float | Tensor | None = None, method: Method | None = None,
                    mask_corners: bool = True) -> Tensor:
        """The CTF-corrected map ``(N, N, N)`` float32 (see module docstring for the steps).

        wiener: added to the weights before inversion: a number, or a ``(N//2+1,)`` tensor per shell
        of the N grid (e.g. :func:`wiener_term_from_fsc`); None = RELION's unregularised default.
        method: ``"gridding"`` (RELION 3.1 default) or ``"floor"``; None = :data:`DEFAULT_METHOD`.
        The inverse weights of the last call are kept (:meth:`inverse_weight`), so reconstructing again with
        the same ``wiener`` and ``method`` (e.g. the standard map beside the deformed one) does not redo them.
        """
        inv = self.inverse_weight(wiener=wiener, method=method)
        grid = self.data_grid()
        grid *= inv
        del inv
        return _finish(grid, self.box, self.pad, mask_corners=mask_corners, inplace=True)

    def inverse_weight(self, wiener: float | Tensor | None = None, method: Method | None = None) -> Tensor:
        """:func:`inverse_weight` of :meth:`weight_grid`, ``(P, P, P//2+1)`` float32 (do not modify it).

        The result of the last call is cached (one grid) until the sums change or another ``wiener`` /
        ``method`` is asked for; set ``cache_inverse = False`` on the instance to keep none.
        """
        key = (self._version, method or DEFAULT_METHOD, wiener_key(wiener))
        if self._inverse_cache is not None and self._inverse_cache[0] == key:
            return self._inverse_cache[1]
        self._inverse_cache = None                                   # free the old grid before computing
        inv = inverse_weight(self.weight_grid(), self.box, self.pad, self.max_radius_px, method=method,
                             wiener=wiener)
        if self.cache_inverse:
            self._inverse_cache = (key, inv)
        return inv

    #: Keep the last inverse weights (one float32 half grid) for the next :meth:`reconstruct`.
    cache_inverse: bool = True

    def backprojection_volume(self, crop: bool = True, gridding_correct: bool = True) -> Tensor:
        """The un-normalised real-space backprojection: inverse FFT of the padded data grid.

        Returns ``(N, N, N)`` (``crop=True``) or the full padded ``(P, P, P)`` box, float32, with the
        trilinear apodisation removed (``gridding_correct=True``: divided by ``sinc²(r/P)``).
        Scaled so that :func:`normalise_backprojection` of the padded box (``crop=False``) reproduces
        :meth:`reconstruct`; the cropped box is for display only (see that function).
        """
        grid = self.data_grid()
        grid /= self._scale
        if crop:
            vol = centred_irfft3_crop(grid, self.size, self.box)
        else:
            vol = irfft3_centered(grid, self.size)
        del grid
        if gridding_correct:
            vol = vol / gridding_function(vol.shape[-1], self.size, device=vol.device)
        return vol

    @property
    def _scale(self) -> float:
        # data / weight ≈ N · F3 (slice theorem with /N² and /N³ FFTs); the padded grid adds pad³.
        return float(self.box * self.pad**3)


# ---------------------------------------------------------------------------------------------
# normalisation of a (possibly warped) real-space backprojection
# ---------------------------------------------------------------------------------------------
def normalise_backprojection(bp_volume: Tensor, weight_grid: Tensor, box: int | None = None, pad: int = 2,
                             max_radius_px: float | None = None, wiener: float | Tensor | None = None,
                             method: Method | None = None, gridding_corrected: bool = True,
                             mask_corners: bool = True, inv: Tensor | None = None) -> Tensor:
    """Divide a real-space backprojection by Fourier-space weights → the corrected map ``(N, N, N)``.

    bp_volume: ``(N, N, N)`` or padded ``(P, P, P)`` real-space backprojection as returned by
    :meth:`FourierAccumulator.backprojection_volume` (possibly warped and summed over groups);
    weight_grid: ``(P, P, P//2+1)`` from :meth:`FourierAccumulator.weight_grid` (summed over groups).
    ``gridding_corrected`` says whether the apodisation was already removed from ``bp_volume`` (the
    default of ``backprojection_volume``); it is re-applied before the FFT so that the division
    acts on the same quantity as in :meth:`FourierAccumulator.reconstruct`.  ``inv``: the
    :func:`inverse_weight` of these weights if the caller already has it (then ``wiener``/``method``
    are not used).

    Steps: zero-pad to P (if N given), FFT, multiply by :func:`inverse_weight`, inverse FFT, crop,
    corner mask, gridding correction.  ``normalise_backprojection(acc.backprojection_volume(crop=False),
    acc.weight_grid())`` equals ``acc.reconstruct()`` to float precision (tested).  Do NOT crop the
    backprojection to N before normalising: the un-normalised backprojection of each image is a streak
    through the whole padded box, and cutting it off breaks the division (measured, box 48-64, 300-500
    relion_project particles: CC with the uncropped result 0.87 noise-free and 0.06 with noise).
    """
    size = weight_grid.shape[0]
    box = box if box is not None else size // pad
    if size != pad * box:
        raise ValueError(f"weight grid of size {size} does not match box {box} and pad {pad}")
    vol = bp_volume.to(weight_grid.device, torch.float32)
    if gridding_corrected:
        vol = vol * gridding_function(vol.shape[-1], size, device=vol.device)
    data = _centred_rfft3_padded(vol, size)
    del vol
    data *= float(box * pad**3) / size**3
    if inv is None:
        radius = box / 2 if max_radius_px is None else min(float(max_radius_px), box / 2)
        inv = inverse_weight(weight_grid, box, pad, radius, method=method, wiener=wiener)
    data *= inv
    del inv
    return _finish(data, box, pad, mask_corners=mask_corners, inplace=True)


def _centred_rfft3_padded(vol: Tensor, size: int) -> Tensor:
    """:func:`.fourier.rfft3_centered` of ``vol`` ``(n, n, n)`` zero-padded to ``size³`` (centres kept), NOT /size³.

    The volume is written straight into its ``ifftshift``-ed place in the padded box (one padded copy).
    """
    n = vol.shape[-1]
    shifted = torch.zeros((size, size, size), dtype=torch.float32, device=vol.device)
    idx = (torch.arange(n, device=vol.device) - n // 2) % size
    shifted[idx[:, None, None], idx[None, :, None], idx[None, None, :]] = vol
    return torch.fft.rfftn(shifted)


# ---------------------------------------------------------------------------------------------
# inverse weights
# ---------------------------------------------------------------------------------------------
def inverse_weight(weight: Tensor, box: int, pad: int = 2, max_radius_px: float | None = None,
                   method: Method | None = None, wiener: float | Tensor | None = None,
                   floor_fraction: float = FLOOR_FRACTION, iterations: int = GRIDDING_ITERATIONS) -> Tensor:
    """Multiplier that turns the data grid into the map's Fourier grid, ``(P, P, P//2+1)`` float32.

    Zero at padded radius ``>= pad * max_radius_px``.  ``wiener`` (number or ``(box//2+1,)`` per shell)
    is added to the weight first.  ``method="floor"``: ``1 / max(W, floor_fraction · <W>_shell)``.
    ``method="gridding"``: Pipe & Menon iterations (RELION 3.1 ``relion_reconstruct``): starting from
    ``w = 1``, repeat ``w /= (w·W) ⊛ blob`` (convolution with a Kaiser–Bessel blob of radius
    ``1.9·pad`` grid points, alpha 15, via FFTs of the padded grid), which approximates ``1/W`` while
    staying bounded where the sampling is sparse.

    Memory: works in float32 (the FFTs always were float32) on a few half grids; the shell index is
    int32 and built slab by slab (:func:`_shell_grid`), the blob from a 1D radial table.
    """
    method = method or DEFAULT_METHOD
    if method not in ("floor", "gridding"):
        raise ValueError(f"unknown inverse-weight method {method!r}; use 'gridding' or 'floor'")
    size = weight.shape[0]
    radius = box / 2 if max_radius_px is None else float(max_radius_px)
    shells, inside = _shell_grid(size, box, pad, radius, weight.device)
    w = weight.to(torch.float32, copy=True)
    if wiener is not None:
        term = torch.as_tensor(wiener, dtype=torch.float64, device=w.device)
        if term.ndim:
            w += term.float()[shells]
        else:
            w += float(term)
    w.masked_fill_(~inside, 0.0)
    if method == "floor":
        avg = _shell_mean(w, shells, inside, box // 2 + 1)
        inv = (floor_fraction * avg).clamp_min(1e-30).float()[shells]
        del shells
        torch.maximum(w, inv, out=inv)
        inv.reciprocal_()
    else:
        del shells
        inv = _pipe_menon(w, inside, size, pad, iterations)
    del w
    return inv.masked_fill_(~inside, 0.0)


def wiener_key(wiener: float | Tensor | None) -> object:
    """A hashable key equal for equal ``wiener`` arguments (None, a number, or a small per-shell tensor)."""
    if wiener is None:
        return None
    t = torch.as_tensor(wiener, dtype=torch.float64)
    return (tuple(t.shape), tuple(t.detach().cpu().reshape(-1).tolist()))


def _pipe_menon(w: Tensor, inside: Tensor, size: int, pad: int, iterations: int) -> Tensor:
    """Density compensation of Pipe & Menon (1999), as RELION's ``BackProjector::reconstruct``.

    ``w`` is zero outside ``inside``, so ``new`` stays zero there (``0 / conv``) without a mask.  Inside, at
    voxels without any weight, ``new`` grows by up to 10⁶ per iteration (as in RELION, which works in
    double); it is capped at the largest float32 so that it never becomes inf: ``inf · 0`` in ``new · w`` or in
    ``data · inv`` (the data are zero there too) used to turn the whole map into NaN (measured: 64 random
    views, box 96-160, no Wiener term).
    """
    blob_ft = _blob_fourier(size, BLOB_RADIUS * pad, BLOB_ALPHA, w.device)   # (P, P, P) real space, float32
    new = inside.to(torch.float32)
    del inside
    cap = torch.finfo(torch.float32).max
    for _ in range(iterations):
        real = torch.fft.irfftn(new * w, s=(size, size, size))
        real *= blob_ft
        spectrum = torch.fft.rfftn(real)
        del real
        conv = spectrum.abs()
        del spectrum
        new /= conv.clamp_min_(1e-6)
        new.clamp_max_(cap)
        del conv
    return new


def _blob_fourier(size: int, radius: float, alpha: float, device: torch.device,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """Normalised 3D Fourier transform of a Kaiser–Bessel blob (order 0) on the uncentred P³ box.

    For ``s = sqrt(alpha² - (2π a ω)²)``, ``FT ∝ (cosh s − sinh s / s) / s²`` (and the ``sin``/``cos``
    form when ``s`` is imaginary), with ``ω = |x| / P`` the real-space voxel distance over the box.
    Evaluated in float64 on the integer squared distances ``|x|²`` (a 1D table) and gathered slab by
    slab into a ``dtype`` grid.
    """
    k2 = _wrapped_int_freq(size, device) ** 2
    d2 = torch.arange(int(3 * k2.max()) + 1, device=device, dtype=torch.float64)
    arg = alpha**2 - (2 * math.pi * radius / size) ** 2 * d2

    def shape_fn(a: Tensor) -> Tensor:
        s = torch.sqrt(a.abs()).clamp_min(1e-6)
        real_branch = (torch.cosh(s) - torch.sinh(s) / s) / s**2
        imag_branch = (torch.sin(s) / s - torch.cos(s)) / s**2
        small = s < 1e-3
        out = torch.where(a >= 0, real_branch, imag_branch)
        return torch.where(small, torch.full_like(out, 1.0 / 3.0), out)

    table = (shape_fn(arg) / shape_fn(torch.tensor(alpha**2, dtype=torch.float64, device=device))).to(dtype)
    out = torch.empty((size, size, size), dtype=dtype, device=device)
    yx2 = k2[:, None] + k2[None, :]
    for sl in _slabs(size, size * size):
        out[sl] = table[k2[sl, None, None] + yx2]
    return out


def wiener_term_from_fsc(weight_grid: Tensor, fsc: Tensor, box: int, pad: int = 2,
                         whole_map: bool = False) -> Tensor:
    """RELION's FSC-based regularisation as a per-shell term to add to the weights, ``(box//2+1,)``.

    ``tau² = SSNR · sigma²`` with ``SSNR = FSC / (1 − FSC)`` (FSC clamped to [0.001, 0.999]; for a map
    of all particles ``FSC' = sqrt(2 FSC / (1 + FSC))``) and ``1/sigma²`` the shell mean of the
    weights, so the term is ``<W>_shell / SSNR`` (RELION's ``1/tau²`` incl. its oversampling factor).
    """
    size = weight_grid.shape[0]
    shells, inside = _shell_grid(size, box, pad, box / 2, weight_grid.device)
    avg = _shell_mean(weight_grid, shells, inside, box // 2 + 1)
    f = fsc.to(device=weight_grid.device, dtype=torch.float64).clamp_min(0.001)
    if whole_map:
        f = torch.sqrt(2 * f / (f + 1))
    f = f.clamp_max(0.999)
    return avg / (f / (1 - f))


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def gridding_function(n: int, padded_size: int, device: torch.device | None = None) -> Tensor:
    """RELION's trilinear gridding function ``sinc²(r / P)`` on an ``n³`` box (centre ``n//2``)."""
    c = torch.arange(n, device=device, dtype=torch.float64) - n // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    r = torch.sqrt(x**2 + y**2 + z**2) / padded_size
    return (torch.sinc(r) ** 2).float()


def soft_mask_outside_map(vol: Tensor, radius: float | None = None, width: float = 3.0) -> Tensor:
    """RELION's ``softMaskOutsideMap``: beyond ``radius`` (default N/2) blend to the mean outside.

    Voxels at ``r > radius + width`` become the (edge-weighted) background mean; between ``radius``
    and ``radius + width`` a raised cosine blends the map into it.
    """
    n = vol.shape[-1]
    radius = n / 2 if radius is None else radius
    c = torch.arange(n, device=vol.device, dtype=torch.float64) - n // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    r = torch.sqrt(x**2 + y**2 + z**2)
    outer = radius + width
    blend = torch.where(r > outer, torch.ones_like(r), 0.5 + 0.5 * torch.cos(math.pi * (outer - r) / width))
    blend = torch.where(r < radius, torch.zeros_like(r), blend)
    total = blend.sum()
    if total <= 0:
        return vol
    bg = (blend * vol.double()).sum() / total
    return ((1 - blend) * vol.double() + blend * bg).to(vol.dtype)


def _finish(grid: Tensor, box: int, pad: int, mask_corners: bool = True, inplace: bool = False) -> Tensor:
    """Padded Fourier grid of the map → cropped, corner-masked, gridding-corrected ``(N, N, N)``.

    ``inplace``: the caller gives ``grid`` away (it is scaled in place instead of copied).
    """
    size = pad * box
    grid = grid.div_(float(box * pad**3)) if inplace else grid / float(box * pad**3)
    vol = centred_irfft3_crop(grid, size, box)
    del grid
    if mask_corners:
        vol = soft_mask_outside_map(vol)
    return (vol / gridding_function(box, size, device=vol.device)).float()


def _radius_grid(size: int, device: torch.device) -> Tensor:
    """|k| in padded grid points for the ``(P, P, P//2+1)`` rfftn layout."""
    k = torch.fft.fftfreq(size, d=1.0 / size, device=device, dtype=torch.float64)
    kx = torch.arange(size // 2 + 1, device=device, dtype=torch.float64)
    z, y, x = torch.meshgrid(k, k, kx, indexing="ij")
    return torch.sqrt(x**2 + y**2 + z**2)


def _shell_mean(values: Tensor, shells: Tensor, inside: Tensor, nshell: int) -> Tensor:
    """Mean of ``values`` over the ``inside`` voxels of each shell ``0 .. nshell-1``, float64 ``(nshell,)``.

    Summed in float64 slab by slab (voxels outside go to an extra, dropped bin), so no full-size copies.
    """
    total = torch.zeros(nshell + 1, dtype=torch.float64, device=values.device)
    count = torch.zeros(nshell + 1, dtype=torch.float64, device=values.device)
    plane = values[0].numel()
    for sl in _slabs(values.shape[0], plane):
        idx = torch.where(inside[sl], shells[sl], nshell).reshape(-1).long()
        total.index_add_(0, idx, values[sl].reshape(-1).double())
        count.index_add_(0, idx, torch.ones(idx.shape, dtype=torch.float64, device=values.device))
    return total[:nshell] / count[:nshell].clamp_min(1)


def _shell_grid(size: int, box: int, pad: int, radius: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """Shell index ``round(|k| / pad)`` clamped to ``box//2`` (int32) and ``inside = |k| < pad·radius`` (bool).

    Both ``(P, P, P//2+1)`` in the rfftn layout (``|k|`` in padded grid points, as :func:`_radius_grid`);
    built slab by slab from exact integer ``|k|²`` so that no float64 full-size grid is needed.
    """
    k = _wrapped_int_freq(size, device)
    kx2 = torch.arange(size // 2 + 1, device=device) ** 2
    yx2 = (k**2)[:, None] + kx2[None, :]
    limit = math.ceil((pad * radius) ** 2)           # integer r² < (pad·radius)²  ⇔  r² < ceil(...)
    shells = torch.empty((size, size, size // 2 + 1), dtype=torch.int32, device=device)
    inside = torch.empty(shells.shape, dtype=torch.bool, device=device)
    for sl in _slabs(size, yx2.numel()):
        r2 = (k[sl] ** 2)[:, None, None] + yx2
        inside[sl] = r2 < limit
        shells[sl] = torch.round(torch.sqrt(r2.double()) / pad).clamp_max(box // 2).int()
    return shells, inside


def _wrapped_int_freq(size: int, device: torch.device | None) -> Tensor:
    """Integer frequencies ``0, 1, …, -1`` of a ``size`` axis in fftfreq order (int64)."""
    k = torch.arange(size, device=device)
    return torch.where(k < (size + 1) // 2, k, k - size)


def _slabs(n: int, plane: int, target: int = 1 << 21) -> list[slice]:
    """Slices of the first axis (``n`` planes of ``plane`` elements) of about ``target`` elements each."""
    step = max(1, target // max(plane, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def centred_irfft3_crop(spectrum: Tensor, n: int, region: int) -> Tensor:
    """The central ``region³`` of :func:`.fourier.irfft3_centered` ``(spectrum, n)`` (its centre at ``region//2``).

    One 1D inverse transform per axis, cropping after each, so the later axes transform fewer lines (about
    2/3 of the work of the full transform for ``region ≈ n/2``) and no full ``n³`` real grid is made.
    ``spectrum``: ``(n, n, n//2+1)``.
    """
    if region >= n:
        return irfft3_centered(spectrum, n)
    idx = (torch.arange(region, device=spectrum.device) - region // 2) % n     # unshifted index of each kept voxel
    vol = torch.fft.ifft(spectrum, dim=0).index_select(0, idx)
    vol = torch.fft.ifft(vol, dim=1).index_select(1, idx)
    vol = torch.fft.irfft(vol, n=n, dim=2).index_select(2, idx)
    return vol.mul_(float(n**3))


def _hermitian_x0(grid: Tensor, conj: bool) -> Tensor:
    """Add to every ``kx = 0`` point the (conjugated) value of its mirror ``(-kz, -ky, 0)``."""
    out = grid.clone()
    plane = grid[:, :, 0]
    mirror = torch.roll(torch.flip(plane, dims=(0, 1)), shifts=(1, 1), dims=(0, 1))
    out[:, :, 0] = plane + (mirror.conj() if conj else mirror)
    return out


def _slice_samples(box: int, radius: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """Flat indices into the ``(N, N//2+1)`` rfft2 grid of the coefficients RELION inserts, and their
    ``(kx, ky)`` integer frequencies ``(M, 2)`` float32.  Row ``N/2`` counts as ``ky = +N/2``."""
    ky = torch.arange(box, device=device)
    ky = torch.where(ky <= box // 2, ky, ky - box)
    kx = torch.arange(box // 2 + 1, device=device)
    yy, xx = torch.meshgrid(ky, kx, indexing="ij")
    keep = (xx**2 + yy**2 <= radius**2 + 1e-9) & ~((xx == 0) & (yy < 0))
    index = torch.nonzero(keep.reshape(-1)).squeeze(1)
    coords = torch.stack([xx.reshape(-1)[index], yy.reshape(-1)[index]], dim=1).float()
    return index, coords
