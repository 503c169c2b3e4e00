"""Loss terms of the VAE (paper, "Loss functions and regularization").

Total loss per batch (assembled by the trainer): ``mean(data_loss) + β · mean(kl_loss) + λ · L_geo``,
with λ recalibrated by :func:`gradient_ratio_lambda` so that ``‖∇ λ L_geo‖ = factor · ‖∇ L_data‖``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def data_loss(predicted: Tensor, observed: Tensor, weights_2d: Tensor) -> Tensor:
    """Noise-weighted squared error per particle → ``(B,)``.

    ``predicted``, ``observed``: centre-referenced rfft2 spectra ``(B, N, N//2+1)``; ``weights_2d``
    ``(N, N//2+1)`` = ``1/σ²`` (0 beyond Nyquist).  The value is the mean of ``w · |pred − obs|²`` over
    the coefficients with non-zero weight, so pure noise of the modelled power gives about 1.
    """
    w = weights_2d.to(predicted.real.dtype)
    n_used = (w > 0).sum().clamp_min(1)
    diff = (predicted - observed).abs() ** 2
    return (diff * w).sum(dim=(-2, -1)) / n_used


def kl_loss(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL divergence of ``N(mu, exp(logvar))`` from ``N(0, I)`` per particle → ``(B,)``."""
    return -0.5 * (1.0 + logvar - mu**2 - torch.exp(logvar)).sum(dim=-1)


def _grad_norm(loss: Tensor, params: list[Tensor]) -> float:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    total = sum(float((g.detach().double() ** 2).sum()) for g in grads if g is not None)
    return total**0.5


def gradient_ratio_lambda(
    loss_data: Tensor,
    loss_geo: Tensor,
    params: Iterable[Tensor],
    factor: float,
    default: float = 0.0,
) -> float:
    """λ with ``‖∇ λ·loss_geo‖ = factor · ‖∇ loss_data‖`` over ``params`` (the paper's recalibration).

    Both losses are scalars still attached to the graph (it is retained, so the caller can still call
    ``backward``).  Returns ``default`` when the geometric gradient vanishes (e.g. the identity
    deformation at the start), so the caller can keep its previous λ.
    """
    params = [p for p in params if p.requires_grad]
    if not params or not loss_geo.requires_grad:
        return default
    g_geo = _grad_norm(loss_geo, params)
    if g_geo <= 1e-30:
        return default
    g_data = _grad_norm(loss_data, params) if loss_data.requires_grad else 0.0
    return float(factor) * g_data / g_geo
