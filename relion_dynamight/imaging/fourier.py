"""Fourier conventions shared by projection, reconstruction and the loss (relion-facts §9).

* Transforms are taken with the real-space centre (index ``N // 2``) moved to the origin first, so
  phases refer to the box centre, and the forward transform is divided by the number of real-space
  samples like RELION's (``rfftn(x) / x.size``).
* Half-complex layout (``rfft``): the last axis holds ``kx = 0 .. N//2``; other axes use ``fftfreq``
  order.  Frequencies below are in cycles per pixel unless stated.
* FSC shells: shell index ``round(|k| * N)``; resolution of shell ``i`` is ``N * pixel / i``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def rfft2_centered(images: Tensor) -> Tensor:
    """``(..., N, N)`` real images → ``(..., N, N//2+1)`` complex, centre-referenced, divided by N²."""
    n = images.shape[-1]
    return torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1))) / (n * n)


def irfft2_centered(spectra: Tensor, n: int) -> Tensor:
    """Inverse of :func:`rfft2_centered` for an ``n × n`` image."""
    return torch.fft.fftshift(torch.fft.irfft2(spectra * (n * n), s=(n, n)), dim=(-2, -1))


def rfft3_centered(volume: Tensor) -> Tensor:
    """``(..., N, N, N)`` real map → ``(..., N, N, N//2+1)`` complex, centre-referenced, divided by N³."""
    n = volume.shape[-1]
    return torch.fft.rfftn(torch.fft.ifftshift(volume, dim=(-3, -2, -1)), dim=(-3, -2, -1)) / n**3


def irfft3_centered(spectrum: Tensor, n: int) -> Tensor:
    """Inverse of :func:`rfft3_centered` for an ``n³`` map."""
    vol = torch.fft.irfftn(spectrum * n**3, s=(n, n, n), dim=(-3, -2, -1))
    return torch.fft.fftshift(vol, dim=(-3, -2, -1))


def freq_grid_2d(n: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """``(ky, kx)`` in cycles/pixel for the rfft layout, each of shape ``(n, n//2+1)``."""
    ky = torch.fft.fftfreq(n, device=device, dtype=dtype)
    kx = torch.fft.rfftfreq(n, device=device, dtype=dtype)
    grid_y, grid_x = torch.meshgrid(ky, kx, indexing="ij")
    return grid_y, grid_x


def freq_grid_3d(n: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """``(kz, ky, kx)`` in cycles/pixel for the 3D rfft layout, each ``(n, n, n//2+1)``."""
    k = torch.fft.fftfreq(n, device=device, dtype=dtype)
    kx = torch.fft.rfftfreq(n, device=device, dtype=dtype)
    grid_z, grid_y, grid_x = torch.meshgrid(k, k, kx, indexing="ij")
    return grid_z, grid_y, grid_x


def shift_phase_2d(n: int, shifts: Tensor) -> Tensor:
    """Phase factors translating images by ``shifts`` ``(B, 2)`` = (sx, sy) pixels: ``(B, n, n//2+1)``.

    Multiplying a centre-referenced spectrum by this moves the image content by ``+shift``.
    """
    ky, kx = freq_grid_2d(n, device=shifts.device, dtype=shifts.dtype)
    phase = -2.0 * math.pi * (kx[None] * shifts[:, 0, None, None] + ky[None] * shifts[:, 1, None, None])
    return torch.polar(torch.ones_like(phase), phase)


def shell_index_2d(n: int, device: torch.device | None = None) -> Tensor:
    """Integer radial shell ``round(|k| * n)`` of each rfft2 coefficient, ``(n, n//2+1)``."""
    ky, kx = freq_grid_2d(n, device=device, dtype=torch.float64)
    return torch.round(torch.sqrt(kx**2 + ky**2) * n).long()


def shell_index_3d(n: int, device: torch.device | None = None) -> Tensor:
    """Integer radial shell ``round(|k| * n)`` of each rfft3 coefficient, ``(n, n, n//2+1)``."""
    kz, ky, kx = freq_grid_3d(n, device=device, dtype=torch.float64)
    return torch.round(torch.sqrt(kx**2 + ky**2 + kz**2) * n).long()


def _rfft_weights_3d(n: int, device: torch.device | None) -> Tensor:
    """Multiplicity of each rfft coefficient in the full transform (2 except the kx=0 / Nyquist planes)."""
    w = torch.full((n // 2 + 1,), 2.0, device=device, dtype=torch.float64)
    w[0] = 1.0
    if n % 2 == 0:
        w[-1] = 1.0
    return w


def fsc(map1: Tensor, map2: Tensor) -> Tensor:
    """Fourier shell correlation of two ``n³`` maps, shells ``0 .. n//2`` → ``(n//2+1,)`` float64."""
    n = map1.shape[-1]
    f1 = rfft3_centered(map1.double())
    f2 = rfft3_centered(map2.double())
    shells = shell_index_3d(n, device=map1.device).flatten()
    w = _rfft_weights_3d(n, map1.device).expand(n, n, -1).flatten()
    nshell = n // 2 + 1
    keep = shells < nshell
    shells, w = shells[keep], w[keep]
    num = torch.zeros(nshell, dtype=torch.float64, device=map1.device)
    d1, d2 = torch.zeros_like(num), torch.zeros_like(num)
    f1, f2 = f1.flatten()[keep], f2.flatten()[keep]
    num.index_add_(0, shells, w * (f1 * f2.conj()).real)
    d1.index_add_(0, shells, w * f1.abs() ** 2)
    d2.index_add_(0, shells, w * f2.abs() ** 2)
    out = num / torch.sqrt(d1 * d2).clamp_min(1e-30)
    out[0] = 1.0
    return out


def resolution_at(curve: Tensor, threshold: float, n: int, pixel_size: float) -> float:
    """Resolution (Å) of the last shell before ``curve`` first drops below ``threshold``.

    Returns ``2 * pixel_size`` (Nyquist) when it never drops.
    """
    values = curve.tolist()
    for i in range(1, len(values)):
        if values[i] < threshold:
            return n * pixel_size / max(i - 1, 1) if i > 1 else n * pixel_size
    return 2.0 * pixel_size


def crossing_shell(curve: Tensor, threshold: float) -> float | None:
    """Fractional shell where ``curve`` first falls below ``threshold`` (linear between shells), or None if it
    never does."""
    values = curve.double().tolist()
    for i in range(1, len(values)):
        if values[i] < threshold:
            lo, hi = values[i - 1], values[i]
            return (i - 1) + ((lo - threshold) / (lo - hi) if lo > hi else 0.0)
    return None


def radial_average_2d(values: Tensor, n: int) -> Tensor:
    """Mean of ``(..., n, n//2+1)`` real values per shell ``0 .. n//2`` → ``(..., n//2+1)``."""
    shells = shell_index_2d(n, device=values.device).flatten()
    nshell = n // 2 + 1
    keep = shells < nshell
    flat = values.reshape(*values.shape[:-2], -1)[..., keep]
    idx = shells[keep]
    total = torch.zeros(*values.shape[:-2], nshell, dtype=values.dtype, device=values.device)
    total.index_add_(-1, idx, flat)
    count = torch.zeros(nshell, dtype=values.dtype, device=values.device).index_add_(0, idx, torch.ones_like(idx, dtype=values.dtype))
    return total / count.clamp_min(1)
