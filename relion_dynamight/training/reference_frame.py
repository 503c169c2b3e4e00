"""In which conformation the improved half maps are written: the consensus refinement's.

During training each half's consensus Gaussians move jointly with the decoder, so the learned consensus
can drift along the motion (a deformation added to the consensus and subtracted by the decoder leaves the
loss unchanged).  The deformed backprojection reconstructs in the learned consensus frame; writing that
map as it is would give a map of *some* conformation in the distribution, not necessarily the one of the
consensus refinement (measured: 5–10° along a ±30° hinge on small data sets).

The reference frame used instead is the conformation of the particles whose deformed models lie closest
to the common initial model (the Gaussian fit of the consensus refinement map, the same criterion as the
training's consensus updates): ``h_ref(y) = y + mean_i u(y, z_i)`` over those particles, with ``u`` the
half's own inverse network.  Each group's warp then pulls through ``Γ_g ∘ h_ref`` (one interpolation of
the density, not two).  Everything is per half, from that half's networks and particles only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from relion_dynamight.imaging.warp import coarse_size, grid_nodes, sample_volume, upsample_field

#: How many particles define the reference conformation (the training's ``consensus_particles``).
DEFAULT_REFERENCE_PARTICLES = 100


@torch.no_grad()
def closest_to_initial(decoder: torch.nn.Module, centres: Tensor, initial: Tensor, latents: Tensor, k: int,
                       batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Indices ``(k,)`` of the latents whose deformed models ``centres + decoder(centres, z)`` have the
    smallest RMS distance (pixels) to the ``initial`` positions ``(M, 3)``, and those distances ``(k,)``."""
    device = centres.device
    dists = []
    for start in range(0, latents.shape[0], batch_size):
        z = latents[start:start + batch_size].to(device=device, dtype=torch.float32)
        deformed = centres[None] + decoder(centres, z)
        dists.append((deformed - initial.to(device)[None]).pow(2).sum(-1).mean(-1))
    squared = torch.cat(dists)
    k = max(1, min(int(k), squared.shape[0]))
    chosen = torch.topk(squared, k, largest=False)
    return chosen.indices, chosen.values.sqrt()


@torch.no_grad()
def reference_pull_field(net: torch.nn.Module, latents: Tensor, box: int, spacing: float = 2.0,
                         batch_size: int = 32) -> Tensor:
    """``h_ref`` on every voxel of the reference frame: ``(box, box, box, 3)`` positions (pixels from the
    centre) in the learned consensus frame, from the inverse network ``net`` averaged over ``latents (K, L)``.

    Evaluated on a coarse grid (about every ``spacing`` pixels) and up-sampled trilinearly.
    """
    device = next(net.parameters()).device
    n = coarse_size(box, spacing)
    nodes = grid_nodes(box, n, device=device)
    flat = nodes.reshape(-1, 3)
    total = torch.zeros_like(flat)
    for start in range(0, latents.shape[0], batch_size):
        z = latents[start:start + batch_size].to(device=device, dtype=torch.float32)
        total += net(flat, z).sum(0)
    mean = total / max(latents.shape[0], 1)
    return upsample_field((flat + mean).reshape(n, n, n, 3), box)


def compose_positions(group_positions: Tensor, reference: Tensor | None) -> Tensor:
    """``Γ_g(h_ref(y))`` at every reference-frame voxel ``y``: the group's dense field ``(N, N, N, 3)`` on the
    consensus grid sampled (trilinearly, border values outside) at the reference pull positions."""
    if reference is None:
        return group_positions
    field = group_positions.permute(3, 0, 1, 2).contiguous()
    return sample_volume(field, reference.to(field.device), padding_mode="border").permute(1, 2, 3, 0)
