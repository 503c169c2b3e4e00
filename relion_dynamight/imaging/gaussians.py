"""Isotropic 3D Gaussians: rendered as a map, and projected straight to CTF-modulated image spectra.

This is the forward model of training: batched, differentiable with respect to positions, amplitudes
and widths, device-agnostic.

Model
-----
Gaussian ``m`` has centre ``p_m`` (x, y, z) in pixels from the box centre, peak value ``a_m`` and width
``σ_m`` (standard deviation, pixels):  ``V(r) = Σ_m a_m exp(-|r - p_m|² / (2 σ_m²))``.
:func:`render_volume` samples ``V`` on the voxel grid.  Its projection along the viewing direction is
``P(x, y) = Σ_m a_m √(2π) σ_m exp(-|(x, y) - q_m|² / (2 σ_m²))`` with ``q_m = (A p_m)_xy`` and the
centre-referenced image spectrum (divided by N², :mod:`.fourier`) is

    F(k) = Σ_m a_m (2π)^{3/2} σ_m³ exp(-2π² σ_m² |k|²) exp(-2πi k·q_m) / N²        (k in cycles/pixel).

How :func:`project_gaussians` evaluates it (method ``"splat"``, the default)
---------------------------------------------------------------------------
Exact evaluation costs ``B·M·N²`` complex exponentials (10⁹ for a batch of 64 at box 64 with 10k
Gaussians).  Instead, per width class ``c`` the weights ``a_m`` are splatted bilinearly onto an
``oversample``-times finer image grid (``B·M·4`` adds), the grid is Fourier transformed, divided by the
transform of the bilinear kernel ``sinc²(kx/o)·sinc²(ky/o)``, cropped to the ``N`` grid and multiplied by
the class's analytic Gaussian transform above.  The only approximation is aliasing of the splat kernel,
which the fine grid pushes beyond the Gaussian's pass band (oversample 2: CC > 0.999 to exact
evaluation for σ ≥ 1 px; see tests).  Gradients reach positions through the bilinear weights,
amplitudes through the splat values and widths through the analytic kernel.

Width classes: Gaussians with equal width values form one class (``torch.unique``); the class width
is the mean of its members, so a shared width parameter receives the exact gradient.  DynaMight uses a
few classes; many distinct widths cost one FFT each (use ``method="exact"`` for small M instead).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from relion_dynamight.imaging.fourier import freq_grid_2d, irfft2_centered, rfft2_centered
from relion_dynamight.imaging.geometry import rotate_points
from relion_dynamight.imaging.projection import apply_shift_ctf


#: Most distinct widths the splat projector accepts (each costs one FFT per image).
MAX_WIDTH_CLASSES = 64


def _per_gaussian(values: Tensor | float, m: int, like: Tensor) -> Tensor:
    """Broadcast a scalar or ``(M,)`` parameter to ``(M,)`` on ``like``'s device and dtype."""
    v = torch.as_tensor(values, device=like.device, dtype=like.dtype)
    return v.expand(m) if v.dim() == 0 else v


def render_volume(positions: Tensor, amplitudes: Tensor | float, widths: Tensor | float, box: int,
                  chunk: int = 2048) -> Tensor:
    """Sample ``Σ_m a_m exp(-|r - p_m|²/(2σ_m²))`` on a ``box³`` grid → ``(box, box, box)`` ``[z, y, x]``.

    ``positions`` ``(M, 3)`` (x, y, z) pixels from the centre (index ``box//2``); ``amplitudes`` and
    ``widths`` (σ, pixels) are scalars or ``(M,)``.  Uses separability: ``Σ_m a gz ⊗ gy ⊗ gx`` as a
    matrix product, ``O(M·box³)`` flops in chunks of ``chunk`` Gaussians; differentiable.
    """
    m = positions.shape[0]
    amp = _per_gaussian(amplitudes, m, positions)
    sig = _per_gaussian(widths, m, positions)
    c = torch.arange(box, device=positions.device, dtype=positions.dtype) - box // 2
    volume = positions.new_zeros(box, box * box)
    for start in range(0, m, chunk):
        p = positions[start:start + chunk]
        inv = 1.0 / (2.0 * sig[start:start + chunk, None] ** 2)
        gx, gy, gz = (torch.exp(-(c[None] - p[:, i, None]) ** 2 * inv) for i in range(3))
        gyx = (gy[:, :, None] * gx[:, None, :]).reshape(p.shape[0], box * box)
        volume = volume + (gz * amp[start:start + chunk, None]).T @ gyx
    return volume.reshape(box, box, box)


def gaussian_transform_2d(widths: Tensor, box: int) -> Tensor:
    """``(2π)^{3/2} σ³ exp(-2π² σ² |k|²) / N²`` on the rfft2 grid for widths ``(C,)`` → ``(C, N, N//2+1)``."""
    ky, kx = freq_grid_2d(box, device=widths.device, dtype=widths.dtype)
    k2 = kx**2 + ky**2
    s = widths[:, None, None]
    return (2.0 * math.pi) ** 1.5 * s**3 * torch.exp(-2.0 * math.pi**2 * s**2 * k2) / box**2


def width_classes(widths: Tensor) -> tuple[Tensor, Tensor]:
    """Group ``(M,)`` widths by value → ``(class index (M,), class widths (C,) = mean of members)``."""
    values, inverse = torch.unique(widths.detach(), return_inverse=True)
    total = torch.zeros(values.shape[0], device=widths.device, dtype=widths.dtype).index_add(0, inverse, widths)
    count = torch.bincount(inverse, minlength=values.shape[0]).to(widths.dtype)
    return inverse, total / count


class _BilinearSplat(torch.autograd.Function):
    """Bilinear splat of weighted points onto a flat grid, with a hand-written backward.

    Written by hand because autograd of the gather/scatter formulation keeps eight ``(B, M)``
    intermediates and was about 2x slower on CPU.  Inputs: ``u`` ``(B, M, 2)`` fine-grid coordinates
    (x, y), ``w`` ``(B, M)`` weights, ``base`` ``(B, M)`` flat offset of each point's ``s×s`` grid.
    Points whose 2×2 neighbourhood leaves the grid are dropped.
    """

    @staticmethod
    def forward(ctx, u: Tensor, w: Tensor, base: Tensor, s: int, size: int) -> Tensor:
        u0 = u.floor()
        f = u - u0
        u0 = u0.long()
        valid = ((u0 >= 0) & (u0 <= s - 2)).all(-1)
        u0 = u0.clamp(0, s - 2)
        w = w * valid
        i00 = base + u0[..., 1] * s + u0[..., 0]
        fx, fy = f[..., 0], f[..., 1]
        gx, gy = 1 - fx, 1 - fy
        grid = u.new_zeros(size)
        for offset, weight in ((0, gy * gx), (1, gy * fx), (s, fy * gx), (s + 1, fy * fx)):
            grid.index_add_(0, (i00 + offset).reshape(-1), (weight * w).reshape(-1))
        ctx.save_for_backward(i00, f, w, valid)
        ctx.s = s
        return grid

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        i00, f, w, valid = ctx.saved_tensors
        s = ctx.s
        g00, g01, g10, g11 = (grad[i00 + o] for o in (0, 1, s, s + 1))
        fx, fy = f[..., 0], f[..., 1]
        gx, gy = 1 - fx, 1 - fy
        dw = (gy * (gx * g00 + fx * g01) + fy * (gx * g10 + fx * g11)) * valid
        dfx = w * (gy * (g01 - g00) + fy * (g11 - g10))
        dfy = w * (gx * (g10 - g00) + fx * (g11 - g01))
        return torch.stack([dfx, dfy], dim=-1), dw, None, None, None


def _splat_spectra(xy: Tensor, weights: Tensor, classes: Tensor, n_classes: int, box: int,
                   oversample: int) -> Tensor:
    """Bilinear splat of points ``xy`` ``(B, M, 2)`` (pixels from centre) with ``weights`` ``(M,)``.

    Returns ``Σ_m w_m exp(-2πi k·q_m)`` per class on the ``box`` rfft2 grid: ``(B, C, box, box//2+1)``.
    Points whose kernel leaves the fine grid are dropped.
    """
    b, m = xy.shape[:2]
    s = box * oversample
    u = xy * oversample + s // 2
    base = (torch.arange(b, device=xy.device)[:, None] * n_classes + classes[None]) * (s * s)  # (B, M)
    grid = _BilinearSplat.apply(u, weights[None].expand(b, m), base, s, b * n_classes * s * s)
    spec = rfft2_centered(grid.reshape(b, n_classes, s, s)) * (s * s)
    rows = (torch.fft.fftfreq(box, device=xy.device) * box).round().long() % s
    spec = spec[..., rows, : box // 2 + 1]
    ky, kx = freq_grid_2d(box, device=xy.device, dtype=xy.dtype)
    kernel = (torch.sinc(kx / oversample) * torch.sinc(ky / oversample)) ** 2
    return spec / kernel


def _exact_spectra(xy: Tensor, weights: Tensor, classes: Tensor, n_classes: int, box: int,
                   chunk: int = 256) -> Tensor:
    """Direct sum ``Σ_m w_m exp(-2πi k·q_m)`` per class (reference; ``O(B·M·N²)``)."""
    b = xy.shape[0]
    ky, kx = freq_grid_2d(box, device=xy.device, dtype=xy.dtype)
    out = []
    for c in range(n_classes):
        sel = (classes == c).nonzero().squeeze(1)
        acc = torch.zeros(b, *kx.shape, device=xy.device, dtype=torch.complex128 if xy.dtype == torch.float64
                          else torch.complex64)
        for start in range(0, sel.shape[0], chunk):
            idx = sel[start:start + chunk]
            q = xy[:, idx]  # (B, m, 2)
            phase = -2.0 * math.pi * (q[..., 0, None, None] * kx + q[..., 1, None, None] * ky)
            acc = acc + (torch.polar(torch.ones_like(phase), phase) * weights[idx, None, None]).sum(1)
        out.append(acc)
    return torch.stack(out, dim=1)


def project_gaussians(positions: Tensor, amplitudes: Tensor | float, widths: Tensor | float, rotations: Tensor,
                      box: int, shifts: Tensor | None = None, ctf: Tensor | None = None, oversample: int = 2,
                      method: str = "splat") -> Tensor:
    """Project Gaussians in poses ``rotations`` ``(B, 3, 3)`` → image spectra ``(B, box, box//2+1)`` complex.

    ``positions`` ``(M, 3)`` or per image ``(B, M, 3)`` (x, y, z pixels from the centre); ``amplitudes``
    (peak values) and ``widths`` (σ, pixels) scalars or ``(M,)``.  The image of point ``r`` lies at
    ``(A r)_xy``.  ``shifts`` ``(B, 2)`` are RELION origins in pixels: the image is translated by
    ``-shifts``.  ``ctf`` ``(B, box, box//2+1)`` multiplies the spectrum.  Spectra follow
    :mod:`.fourier` (centre-referenced, divided by N²) and match :func:`.projection.project_map` of
    :func:`render_volume` of the same Gaussians.  See the module docstring for ``method``/``oversample``.
    """
    if positions.dim() == 2:
        positions = positions[None]
    m = positions.shape[-2]
    rotations = rotations.to(device=positions.device, dtype=positions.dtype)
    xy = rotate_points(positions, rotations)[..., :2]
    if xy.shape[0] != rotations.shape[0]:
        xy = xy.expand(rotations.shape[0], -1, -1)
    amp = _per_gaussian(amplitudes, m, positions)
    sig = _per_gaussian(widths, m, positions)
    classes, class_widths = width_classes(sig)
    n_classes = class_widths.shape[0]
    if method == "splat" and n_classes > MAX_WIDTH_CLASSES:
        raise ValueError(f"{n_classes} distinct Gaussian widths: the splat projector makes one image per width "
                         f"class (at most {MAX_WIDTH_CLASSES}); share widths between Gaussians (e.g. "
                         f"widths = class_widths[class_index]) or use method='exact' for small models")
    if method == "splat":
        sums = _splat_spectra(xy, amp, classes, n_classes, box, oversample)
    elif method == "exact":
        sums = _exact_spectra(xy, amp, classes, n_classes, box)
    else:
        raise ValueError(f"unknown method {method!r}; use 'splat' or 'exact'")
    spectra = (sums * gaussian_transform_2d(class_widths, box)[None]).sum(1)
    return apply_shift_ctf(spectra, shifts, ctf)


def real_from_spectra(spectra: Tensor, box: int) -> Tensor:
    """Real images ``(B, box, box)`` ``[y, x]`` from centre-referenced spectra ``(B, box, box//2+1)``."""
    return irfft2_centered(spectra, box)


__all__ = ["render_volume", "project_gaussians", "real_from_spectra", "gaussian_transform_2d", "width_classes"]
