"""Fourier-slice projection of 3D maps, as RELION's ``Projector`` does it (relion-facts §7–9).

Own kernel rather than torch-fourier-slice: that library expects the transpose of RELION's matrix,
does not pad/gridding-correct like RELION and does not band-limit the slice the same way; we need
``relion_project`` to be reproduced to CC ≥ 0.999 (tests/imaging/test_projection.py).

Steps (RELION's ``Projector::computeFourierTransformMap`` + ``project``):

1. gridding pre-correction: divide the map by ``sinc²(r / (pad·N))`` (r = voxel radius from the centre),
   which undoes the blur of trilinear interpolation in Fourier space;
2. zero-pad to ``pad·N`` (centre kept at index ``pad·N // 2``) and take the centre-referenced rfft3;
3. for every rfft2 frequency ``(kx, ky)`` of the image with ``|k| ≤ N/2`` (in Fourier pixels; others are
   zero) sample the 3D transform at ``pad · Aᵀ (kx, ky, 0)`` with trilinear interpolation (Friedel
   symmetry for negative x);
4. scale so that the result is the centre-referenced rfft2 (divided by N², :mod:`.fourier`) of the
   line integral ``P(x, y) = Σ_z map`` along the viewing direction (band-limited to ``|k| ≤ N/2``; as in
   RELION the gridding correction makes it exactly ``Σ_z`` of the *corrected* map for axis-aligned
   views, i.e. up to ~2 % brighter away from the centre).

Verified against ``relion_project --ctf`` (RELION 3.1.3): per-image CC ≥ 0.99999 and the same scale
(tests/imaging/test_projection.py).

Shifts: ``shifts`` are RELION origins in pixels (``rlnOriginX/YAngst / pixel``); the returned image is
the projection **translated by −shift** (the experimental image), then multiplied by ``ctf``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from relion_dynamight.imaging.fourier import freq_grid_2d, irfft2_centered, rfft3_centered, shift_phase_2d


def gridding_correct(volume: Tensor, pad: int = 2) -> Tensor:
    """Divide an ``(N, N, N)`` map by ``sinc²(r / (pad·N))`` (trilinear interpolation kernel's transform)."""
    n = volume.shape[-1]
    c = torch.arange(n, device=volume.device, dtype=torch.float64) - n // 2
    r = torch.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    s = torch.sinc(r / (pad * n))  # torch.sinc is sin(pi x)/(pi x)
    return volume / (s * s).to(volume.dtype)


def fourier_map(volume: Tensor, pad: int = 2) -> Tensor:
    """Padded, gridding-corrected, centre-referenced 3D transform ``(P, P, P//2+1)``, ``P = pad·N``.

    Scaled so that :func:`slice_fourier_map` directly yields image spectra (see module docstring).
    Compute it once and reuse it for many batches of poses.
    """
    n = volume.shape[-1]
    p = pad * n
    corrected = gridding_correct(volume, pad)
    padded = torch.zeros((p, p, p), dtype=corrected.dtype, device=corrected.device)
    lo = p // 2 - n // 2
    padded[lo:lo + n, lo:lo + n, lo:lo + n] = corrected
    # rfft3_centered divides by P³; the image spectrum of the line integral is divided by N² only.
    return rfft3_centered(padded) * (p**3 / n**2)


def _trilinear_half(f3: Tensor, x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    """Trilinear interpolation of a half-complex 3D transform at frequency-index coordinates.

    ``f3`` is ``(P, P, P//2+1)`` in rfft layout ``[z, y, x]``; ``x, y, z`` (same shape) are in Fourier
    pixels of that grid and may be negative (Friedel symmetry is applied for ``x < 0``).
    """
    p = f3.shape[0]
    flip = x < 0
    x, y, z = torch.where(flip, -x, x), torch.where(flip, -y, y), torch.where(flip, -z, z)
    x0, y0, z0 = x.floor(), y.floor(), z.floor()
    fx, fy, fz = x - x0, y - y0, z - z0
    x0, y0, z0 = x0.long(), y0.long(), z0.long()
    xmax = f3.shape[-1] - 1
    flat = f3.reshape(-1)
    out = torch.zeros(x.shape, dtype=f3.dtype, device=f3.device)
    for dz, wz in ((0, 1 - fz), (1, fz)):
        iz = (z0 + dz) % p
        for dy, wy in ((0, 1 - fy), (1, fy)):
            iy = (y0 + dy) % p
            for dx, wx in ((0, 1 - fx), (1, fx)):
                ix = (x0 + dx).clamp(max=xmax)
                w = wz * wy * wx
                out = out + flat[(iz * p + iy) * f3.shape[-1] + ix] * w.to(f3.dtype)
    return torch.where(flip, out.conj(), out)


def slice_fourier_map(fmap: Tensor, rotations: Tensor, box: int, pad: int = 2) -> Tensor:
    """Central slices ``(B, box, box//2+1)`` of a :func:`fourier_map` for RELION matrices ``(B, 3, 3)``."""
    device = fmap.device
    real_dtype = torch.float64 if fmap.dtype == torch.complex128 else torch.float32
    ky, kx = freq_grid_2d(box, device=device, dtype=real_dtype)
    jx, jy = kx * box, ky * box  # integer Fourier pixels of the image
    inside = (jx**2 + jy**2) <= (box / 2) ** 2
    A = rotations.to(device=device, dtype=real_dtype)
    # 3D frequency = A^T (kx, ky, 0): component i = A[0, i] kx + A[1, i] ky, in padded Fourier pixels.
    coords = (A[:, 0, :, None, None] * jx + A[:, 1, :, None, None] * jy) * pad  # (B, 3, box, box//2+1)
    out = _trilinear_half(fmap, coords[:, 0], coords[:, 1], coords[:, 2])
    return out * inside


def project_map(volume: Tensor, rotations: Tensor, shifts: Tensor | None = None, ctf: Tensor | None = None,
                pad: int = 2) -> Tensor:
    """Project an ``(N, N, N)`` map in poses ``rotations`` ``(B, 3, 3)`` → ``(B, N, N//2+1)`` spectra.

    ``shifts`` ``(B, 2)`` are RELION origins (x, y) in pixels: the image is the projection translated
    by ``-shifts`` (relion-facts §7).  ``ctf`` ``(B, N, N//2+1)`` multiplies the spectrum.  Spectra are
    centre-referenced and divided by N² (:mod:`.fourier`); the real image is the line integral
    ``Σ_z map`` (map units × pixels), on RELION's scale.  Frequencies beyond ``N/2`` Fourier pixels are
    zero, as in RELION.  ``pad`` is RELION's padding factor (``relion_project --pad``, default 2).
    """
    n = volume.shape[-1]
    fmap = fourier_map(volume, pad)
    spectra = slice_fourier_map(fmap, rotations, n, pad)
    return apply_shift_ctf(spectra, shifts, ctf)


def apply_shift_ctf(spectra: Tensor, shifts: Tensor | None, ctf: Tensor | None) -> Tensor:
    """Translate spectra ``(B, N, N//2+1)`` by ``-shifts`` (RELION origins, pixels) and multiply by ``ctf``."""
    n = spectra.shape[-2]
    if shifts is not None:
        real_dtype = torch.float64 if spectra.dtype == torch.complex128 else torch.float32
        spectra = spectra * shift_phase_2d(n, -shifts.to(device=spectra.device, dtype=real_dtype))
    if ctf is not None:
        spectra = spectra * ctf.to(spectra.device)
    return spectra


def project_map_real(volume: Tensor, rotations: Tensor, shifts: Tensor | None = None, ctf: Tensor | None = None,
                     pad: int = 2) -> Tensor:
    """Real-space images ``(B, N, N)`` of :func:`project_map`."""
    n = volume.shape[-1]
    return irfft2_centered(project_map(volume, rotations, shifts, ctf, pad), n)


__all__ = ["project_map", "project_map_real", "fourier_map", "slice_fourier_map", "gridding_correct",
           "apply_shift_ctf"]
