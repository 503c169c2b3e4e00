"""Radial noise spectrum of the residuals (observed − predicted) and the data-term weights it gives.

Spectra are centre-referenced rfft2 coefficients ``(B, N, N//2+1)`` (imaging.fourier conventions);
shells are ``round(|k| N)``, ``0 .. N//2``.  Coefficients beyond Nyquist (the corners) get weight 0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from relion_dynamight.imaging.fourier import radial_average_2d, shell_index_2d


def radial_noise_spectrum(residual_spectra: Tensor) -> Tensor:
    """Mean power ``|r|²`` per shell of residual spectra ``(B, N, N//2+1)`` → ``(N//2+1,)``."""
    n = residual_spectra.shape[-2]
    power = residual_spectra.abs() ** 2
    return radial_average_2d(power.reshape(-1, n, n // 2 + 1), n).mean(0)


class NoiseSpectrum(nn.Module):
    """Running estimate of the radial noise power, kept as buffers (checkpoint with ``state_dict``).

    ``update(residuals)`` adds a batch of residual spectra; ``power`` is the mean power per shell since
    the last ``reset()`` (all ones before any update, i.e. unweighted); ``weights_2d()`` gives
    ``1 / σ²`` per rfft coefficient, 0 beyond Nyquist.
    """


    power_sum: Tensor
    count: Tensor
    estimate: Tensor
    def __init__(self, box: int) -> None:
        super().__init__()
        self.box = int(box)
        nshell = self.box // 2 + 1
        self.register_buffer("power_sum", torch.zeros(nshell, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("estimate", torch.ones(nshell, dtype=torch.float64))

    def reset(self) -> None:
        """Start a new estimate; :attr:`power` keeps the previous one until the next update."""
        self.power_sum.zero_()
        self.count.zero_()

    @torch.no_grad()
    def update(self, residuals: Tensor) -> None:
        """Add residual spectra ``(B, N, N//2+1)`` complex to the current estimate."""
        b = residuals.reshape(-1, self.box, self.box // 2 + 1).shape[0]
        spec = radial_noise_spectrum(residuals.detach()).to(torch.float64)
        self.power_sum += spec.to(self.power_sum.device) * b
        self.count += b
        self.estimate.copy_(self.power_sum / self.count)

    @property
    def power(self) -> Tensor:
        """Noise power per shell ``(N//2+1,)`` (float64)."""
        return self.estimate

    def weights_2d(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``1 / σ²`` per rfft2 coefficient ``(N, N//2+1)``, 0 beyond Nyquist; σ² floored at 1e-6 × median."""
        n = self.box
        power = self.estimate
        floor = float(power[1:].median()) * 1e-6 if power.numel() > 1 else 0.0
        inv = 1.0 / power.clamp_min(max(floor, 1e-30))
        shells = shell_index_2d(n, device=power.device)
        inside = shells <= n // 2
        w = torch.zeros(n, n // 2 + 1, dtype=torch.float64, device=power.device)
        w[inside] = inv[shells[inside]]
        return w.to(dtype)
