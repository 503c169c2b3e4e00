"""RELION's CTF (relion-facts §8), batched in torch for the rfft2 layout of :mod:`.fourier`.

``lambda = 12.2643247 / sqrt(V (1 + 0.978466e-6 V))`` Å (V in volts), Cs in Å = mm · 1e7, spatial
frequency ``u`` in Å⁻¹ at azimuth ``phi`` (from +x):

    defocus(phi) = dU cos²(phi - a) + dV sin²(phi - a)        a = rlnDefocusAngle
    gamma = -pi lambda defocus u² + pi/2 Cs lambda³ u⁴ - phase_shift - atan(Q0 / sqrt(1 - Q0²))
    CTF = -sin(gamma) · exp(-B u² / 4) · scale                (= +Q0 at u = 0)

Written here rather than taken from torch-ctf because that library returns NaN for dV > dU and
does not take the phase shift, B-factor and scale together in RELION's sign conventions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from relion_dynamight.imaging.fourier import freq_grid_2d


def electron_wavelength(voltage_kv: Tensor) -> Tensor:
    """Relativistic electron wavelength in Å for an acceleration voltage in kV."""
    v = torch.as_tensor(voltage_kv, dtype=torch.float64) * 1e3
    return 12.2643247 / torch.sqrt(v * (1.0 + 0.978466e-6 * v))


@dataclass
class CtfParams:
    """Per-particle CTF parameters, each a ``(B,)`` tensor, in RELION's units.

    defocus_u/v: Å (positive = underfocus); defocus_angle: degrees; voltage: kV; cs: mm;
    amplitude_contrast: fraction; phase_shift: degrees; bfactor: Å²; scale: dimensionless;
    pixel_size: Å/pixel of each particle's optics group.
    """

    defocus_u: Tensor
    defocus_v: Tensor
    defocus_angle: Tensor
    voltage: Tensor
    cs: Tensor
    amplitude_contrast: Tensor
    phase_shift: Tensor
    bfactor: Tensor
    scale: Tensor
    pixel_size: Tensor

    def to(self, device: torch.device | str) -> "CtfParams":
        return CtfParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def index(self, idx: Tensor | slice) -> "CtfParams":
        return CtfParams(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})


def ctf_2d(params: CtfParams, box: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """CTF values ``(B, box, box//2+1)`` on the rfft2 grid of a ``box``-pixel image."""
    device = params.defocus_u.device
    ky, kx = freq_grid_2d(box, device=device, dtype=torch.float64)
    p = {f.name: getattr(params, f.name).to(device=device, dtype=torch.float64)[:, None, None] for f in fields(params)}
    ux, uy = kx[None] / p["pixel_size"], ky[None] / p["pixel_size"]
    u2 = ux**2 + uy**2
    phi = torch.atan2(uy, ux)
    angle = torch.deg2rad(p["defocus_angle"])
    defocus = p["defocus_u"] * torch.cos(phi - angle) ** 2 + p["defocus_v"] * torch.sin(phi - angle) ** 2
    lam = electron_wavelength(p["voltage"]).to(device)
    cs = p["cs"] * 1e7
    q0 = p["amplitude_contrast"].clamp(-0.999999, 0.999999)
    gamma = (-math.pi * lam * defocus * u2 + 0.5 * math.pi * cs * lam**3 * u2**2
             - torch.deg2rad(p["phase_shift"]) - torch.atan(q0 / torch.sqrt(1.0 - q0**2)))
    ctf = -torch.sin(gamma) * torch.exp(-p["bfactor"] * u2 / 4.0) * p["scale"]
    return ctf.to(dtype)
