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
  ``DEFAULT_METHOD`` and tests/test_backprojection.py).
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
from typing import Literal

import torch
from torch import Tensor

from relion_dynamight.imaging.fourier import irfft3_centered, rfft2_centered, rfft3_centered, shift_phase_2d

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
        return self

    def add_(self, other: "FourierAccumulator") -> "FourierAccumulator":
        """Add another accumulator of the same geometry (in place)."""
        if (other.box, other.pad) != (self.box, self.pad):
            raise ValueError("accumulators differ in box or padding")
        self._acc += other._acc.to(self.device)
        self.count += other.count
        return self

    def reduce_(self, comm: object) -> "FourierAccumulator":
        """Sum ``data``, ``weight`` and ``count`` over MPI ranks (``parallel.mpi.Comm``), in place."""
        if getattr(comm, "size", 1) <= 1:
            return self
        import numpy as np

        total = comm.allreduce_sum(self._acc.cpu().numpy())  # type: ignore[attr-defined]
        count = comm.allreduce_sum(np.array([self.count], dtype=np.int64))  # type: ignore[attr-defined]
        self._acc = torch.from_numpy(np.ascontiguousarray(total)).to(self.device)
        self.count = int(count[0])
        return self

    # -- read-out -----------------------------------------------------------------------------
    def data_grid(self) -> Tensor:
        """``data`` with the ``kx = 0`` plane made Hermitian (a copy), ``(P, P, P//2+1)`` complex.

        Same values as ``_hermitian_x0(self.data)`` (same additions in the same order) with a single full
        copy of the grid instead of three.
        """
        p, h = self.size, self.size // 2 + 1
        acc = self._acc
        out = torch.view_as_complex(acc[:p, :p, :h, :2].contiguous())
        out[0] += torch.view_as_complex(acc[p, :p, :h, :2].contiguous())           # fold the kz = P plane
        column = torch.view_as_complex(acc[:p, p, :h, :2].contiguous())
        column[0] += torch.view_as_complex(acc[p, p, :h, :2].contiguous())
        out[:, 0] += column                                                          # fold the ky = P row
        plane = out[:, :, 0].clone()
        mirror = torch.roll(torch.flip(plane, dims=(0, 1)), shifts=(1, 1), dims=(0, 1))
        out[:, :, 0] = plane + mirror.conj()
        return out

    def weight_grid(self) -> Tensor:
        """``weight`` with the ``kx = 0`` plane symmetrised (a copy), ``(P, P, P//2+1)`` real.

        This Fourier-space grid is what :func:`normalise_backprojection` divides by.
        """
        return _hermitian_x0(self.weight, conj=False)

    #: Same as :meth:`weight_grid` (the weights are a Fourier-space grid, not a real-space map).
    weight_volume = weight_grid

    def reconstruct(self, wiener: float | Tensor | None = None, method: Method | None = None,
                    mask_corners: bool = True) -> Tensor:
        """The CTF-corrected map ``(N, N, N)`` float32 (see module docstring for the steps).

        wiener: added to the weights before inversion: a number, or a ``(N//2+1,)`` tensor per shell
        of the N grid (e.g. :func:`wiener_term_from_fsc`); None = RELION's unregularised default.
        method: ``"gridding"`` (RELION 3.1 default) or ``"floor"``; None = :data:`DEFAULT_METHOD`.
        """
        inv = inverse_weight(self.weight_grid(), self.box, self.pad, self.max_radius_px, method=method,
                             wiener=wiener)
        return _finish(self.data_grid() * inv, self.box, self.pad, mask_corners=mask_corners)

    def backprojection_volume(self, crop: bool = True, gridding_correct: bool = True) -> Tensor:
        """The un-normalised real-space backprojection: inverse FFT of the padded data grid.

        Returns ``(N, N, N)`` (``crop=True``) or the full padded ``(P, P, P)`` box, float32, with the
        trilinear apodisation removed (``gridding_correct=True``: divided by ``sinc²(r/P)``).
        Scaled so that :func:`normalise_backprojection` of the padded box (``crop=False``) reproduces
        :meth:`reconstruct`; the cropped box is for display only (see that function).
        """
        vol = irfft3_centered(self.data_grid() / self._scale, self.size)
        if crop:
            vol = _crop(vol, self.box)
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
                             mask_corners: bool = True) -> Tensor:
    """Divide a real-space backprojection by Fourier-space weights → the corrected map ``(N, N, N)``.

    bp_volume: ``(N, N, N)`` or padded ``(P, P, P)`` real-space backprojection as returned by
    :meth:`FourierAccumulator.backprojection_volume` (possibly warped and summed over groups);
    weight_grid: ``(P, P, P//2+1)`` from :meth:`FourierAccumulator.weight_grid` (summed over groups).
    ``gridding_corrected`` says whether the apodisation was already removed from ``bp_volume`` (the
    default of ``backprojection_volume``); it is re-applied before the FFT so that the division
    acts on the same quantity as in :meth:`FourierAccumulator.reconstruct`.

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
    if vol.shape[-1] != size:
        vol = _pad_to(vol, size)
    data = rfft3_centered(vol) * float(box * pad**3)
    radius = box / 2 if max_radius_px is None else min(float(max_radius_px), box / 2)
    inv = inverse_weight(weight_grid, box, pad, radius, method=method, wiener=wiener)
    return _finish(data.to(torch.complex64) * inv, box, pad, mask_corners=mask_corners)


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
    """
    method = method or DEFAULT_METHOD
    size = weight.shape[0]
    radius = box / 2 if max_radius_px is None else float(max_radius_px)
    r_pad = _radius_grid(size, weight.device)
    inside = r_pad < pad * radius
    shells = torch.round(r_pad / pad).long().clamp_max(box // 2)
    w = weight.double()
    if wiener is not None:
        term = torch.as_tensor(wiener, dtype=torch.float64, device=w.device)
        w = w + (term[shells] if term.ndim else term)
    w = torch.where(inside, w, torch.zeros_like(w))
    if method == "floor":
        avg = _shell_mean(w, shells, inside, box // 2 + 1)
        floor = (floor_fraction * avg)[shells].clamp_min(1e-30)
        inv = 1.0 / torch.maximum(w, floor)
    elif method == "gridding":
        inv = _pipe_menon(w, inside, size, pad, iterations)
    else:
        raise ValueError(f"unknown inverse-weight method {method!r}; use 'gridding' or 'floor'")
    return torch.where(inside, inv, torch.zeros_like(inv)).float()


def _pipe_menon(w: Tensor, inside: Tensor, size: int, pad: int, iterations: int) -> Tensor:
    """Density compensation of Pipe & Menon (1999), as RELION's ``BackProjector::reconstruct``."""
    blob_ft = _blob_fourier(size, BLOB_RADIUS * pad, BLOB_ALPHA, w.device).float()  # (P, P, P) real space
    new = inside.double()
    for _ in range(iterations):
        real = torch.fft.irfftn((new * w).float(), s=(size, size, size))
        real *= blob_ft
        conv = torch.fft.rfftn(real).abs().double()
        del real
        new = torch.where(inside, new / conv.clamp_min(1e-6), new)
    return new


def _blob_fourier(size: int, radius: float, alpha: float, device: torch.device) -> Tensor:
    """Normalised 3D Fourier transform of a Kaiser–Bessel blob (order 0) on the uncentred P³ box.

    For ``s = sqrt(alpha² - (2π a ω)²)``, ``FT ∝ (cosh s − sinh s / s) / s²`` (and the ``sin``/``cos``
    form when ``s`` is imaginary), with ``ω = |x| / P`` the real-space voxel distance over the box.
    """
    freq = torch.fft.fftfreq(size, d=1.0, device=device, dtype=torch.float64)   # = x / P, wrapped
    z, y, x = torch.meshgrid(freq, freq, freq, indexing="ij")
    omega = torch.sqrt(x**2 + y**2 + z**2)
    arg = alpha**2 - (2 * math.pi * radius * omega) ** 2

    def shape_fn(a: Tensor) -> Tensor:
        s = torch.sqrt(a.abs()).clamp_min(1e-6)
        real_branch = (torch.cosh(s) - torch.sinh(s) / s) / s**2
        imag_branch = (torch.sin(s) / s - torch.cos(s)) / s**2
        small = s < 1e-3
        out = torch.where(a >= 0, real_branch, imag_branch)
        return torch.where(small, torch.full_like(out, 1.0 / 3.0), out)

    return shape_fn(arg) / shape_fn(torch.tensor(alpha**2, dtype=torch.float64, device=device))


def wiener_term_from_fsc(weight_grid: Tensor, fsc: Tensor, box: int, pad: int = 2,
                         whole_map: bool = False) -> Tensor:
    """RELION's FSC-based regularisation as a per-shell term to add to the weights, ``(box//2+1,)``.

    ``tau² = SSNR · sigma²`` with ``SSNR = FSC / (1 − FSC)`` (FSC clamped to [0.001, 0.999]; for a map
    of all particles ``FSC' = sqrt(2 FSC / (1 + FSC))``) and ``1/sigma²`` the shell mean of the
    weights, so the term is ``<W>_shell / SSNR`` (RELION's ``1/tau²`` incl. its oversampling factor).
    """
    size = weight_grid.shape[0]
    r_pad = _radius_grid(size, weight_grid.device)
    inside = r_pad < pad * box / 2
    shells = torch.round(r_pad / pad).long().clamp_max(box // 2)
    avg = _shell_mean(weight_grid.double(), shells, inside, box // 2 + 1)
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


def _finish(grid: Tensor, box: int, pad: int, mask_corners: bool = True) -> Tensor:
    """Padded Fourier grid of the map → cropped, corner-masked, gridding-corrected ``(N, N, N)``."""
    size = pad * box
    vol = _crop(irfft3_centered(grid / float(box * pad**3), size), box)
    if mask_corners:
        vol = soft_mask_outside_map(vol)
    return (vol / gridding_function(box, size, device=vol.device)).float()


def _crop(vol: Tensor, n: int) -> Tensor:
    start = vol.shape[-1] // 2 - n // 2
    sl = slice(start, start + n)
    return vol[..., sl, sl, sl].contiguous()


def _pad_to(vol: Tensor, size: int) -> Tensor:
    n = vol.shape[-1]
    out = torch.zeros((size, size, size), dtype=vol.dtype, device=vol.device)
    start = size // 2 - n // 2
    out[start:start + n, start:start + n, start:start + n] = vol
    return out


def _radius_grid(size: int, device: torch.device) -> Tensor:
    """|k| in padded grid points for the ``(P, P, P//2+1)`` rfftn layout."""
    k = torch.fft.fftfreq(size, d=1.0 / size, device=device, dtype=torch.float64)
    kx = torch.arange(size // 2 + 1, device=device, dtype=torch.float64)
    z, y, x = torch.meshgrid(k, k, kx, indexing="ij")
    return torch.sqrt(x**2 + y**2 + z**2)


def _shell_mean(values: Tensor, shells: Tensor, inside: Tensor, nshell: int) -> Tensor:
    idx = shells[inside]
    total = torch.zeros(nshell, dtype=torch.float64, device=values.device).index_add_(0, idx, values[inside])
    count = torch.zeros(nshell, dtype=torch.float64, device=values.device).index_add_(
        0, idx, torch.ones_like(values[inside]))
    return total / count.clamp_min(1)


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
