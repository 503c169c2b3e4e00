"""Ground-truth quality of a learned deformation (simulated data, where the true motion is known).

The learned consensus Gaussians are not the phantom's Gaussians, so learned and true models are compared
as displacement FIELDS: the decoder is a continuous field ``δ(x, z)``, evaluated at the phantom's
reference-conformation centres ``r_k`` (``(x, y, z)`` pixels from the box centre).  For particle ``i``
with latent ``z_i`` and true deformed centres ``t_ik``::

    error_i    = sqrt(mean_k |r_k + δ(r_k, z_i) − t_ik|²)     (learned deformation)
    baseline_i = sqrt(mean_k |r_k − t_ik|²)                    (no deformation: the undeformed consensus)

A useful model has ``error`` clearly below ``baseline``.  This assumes the learned consensus sits in
(about) the reference conformation, which holds for the simulator's symmetric angle distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class DeformationErrors:
    """Per-particle RMS errors ``(n,)`` in pixels, and mean displacement sizes of a domain ``(n,)``."""

    learned: Tensor
    baseline: Tensor
    learned_size: Tensor
    true_size: Tensor

    def summary(self) -> str:
        return (f"deformation error {float(self.learned.mean()):.3f} px vs {float(self.baseline.mean()):.3f} px "
                f"undeformed; domain displacement learned {float(self.learned_size.mean()):.3f} px, true "
                f"{float(self.true_size.mean()):.3f} px")


@torch.no_grad()
def deformation_errors(decoder: nn.Module, latents: Tensor, reference: Tensor, true_deformed: Tensor,
                       domain: Tensor | None = None, batch_size: int = 64) -> DeformationErrors:
    """Errors of ``decoder`` (``(M, 3), (B, L) -> (B, M, 3)``) against the truth.

    Args:
        latents: ``(n, L)`` latent codes (means) of the particles.
        reference: ``(M, 3)`` true centres in the reference conformation (pixels).
        true_deformed: ``(n, M, 3)`` true centres of each particle's conformation (pixels).
        domain: optional ``(M,)`` bool selecting the Gaussians whose mean displacement size is reported
            (e.g. the moving domain); all Gaussians when ``None``.
    """
    device = next(decoder.parameters()).device
    ref = reference.to(device=device, dtype=torch.float32)
    sel = torch.ones(ref.shape[0], dtype=torch.bool, device=device) if domain is None else domain.to(device)
    learned, baseline, size, true_size = [], [], [], []
    for i in range(0, latents.shape[0], batch_size):
        z = latents[i:i + batch_size].to(device=device, dtype=torch.float32)
        truth = true_deformed[i:i + batch_size].to(device=device, dtype=torch.float32)
        disp = decoder(ref, z)
        true_disp = truth - ref
        learned.append((ref + disp - truth).pow(2).sum(-1).mean(-1).sqrt())
        baseline.append(true_disp.pow(2).sum(-1).mean(-1).sqrt())
        size.append(disp[:, sel].norm(dim=-1).mean(-1))
        true_size.append(true_disp[:, sel].norm(dim=-1).mean(-1))
    cat = lambda parts: torch.cat(parts).cpu()  # noqa: E731
    return DeformationErrors(cat(learned), cat(baseline), cat(size), cat(true_size))
