"""Will the deformed backprojection fit in memory?  A plan made before any large allocation.

The engine holds a few grids of the 2×-padded box (``(2N)³`` voxels: the group and undeformed Fourier
accumulators, the warped real-space sum, FFT temporaries, and at the end the inverse weights), so its peak
grows with ``(2N)³`` and not with the number of particles; one insertion batch adds a few image-sized
arrays per particle.  The coefficients are measured peaks (README, "Memory"), rounded up.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from relion_dynamight.errors import InputError

log = logging.getLogger("relion_dynamight")

#: Peak bytes per voxel of the padded (2N)³ grid: one half's sequence (groups, first, Wiener-regularised and
#: standard reconstructions) peaks at 59.0 / 53.1 / 54.6 B at box 96 / 128 / 160 on CPU (64 images per batch);
#: the job keeps the other half's accumulators meanwhile (~13 B), plus ~10 %.  Was 120 (112 at box 128) before
#: the final division worked in float32 with compact shell grids.
BYTES_PER_PADDED_VOXEL = 80
#: Peak bytes per image pixel per particle of one insertion batch (spectra, CTF, weights, interpolation).
BYTES_PER_BATCH_PIXEL = 200
#: Share of the free memory the plan may use.
USABLE_FRACTION = 0.9


@dataclass(frozen=True)
class MemoryPlan:
    box: int
    batch_size: int
    grid_bytes: int
    batch_bytes: int
    available: int | None

    @property
    def total(self) -> int:
        return self.grid_bytes + self.batch_bytes


def free_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (GPU: the driver's free memory; CPU: RAM, ``ulimit -v`` and cgroup)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    from relion_dynamight.relion.stacks import available_memory_bytes

    return available_memory_bytes()


def plan_memory(box: int, batch_size: int, device: torch.device, available: int | None = None) -> MemoryPlan:
    """The insertion batch to use for ``box``, reduced (with a warning) when ``batch_size`` does not fit.

    Raises :class:`InputError` when even one particle at a time does not fit beside the padded grids.
    ``available`` defaults to :func:`free_bytes` of ``device``; ``None`` there means unknown (no check).
    """
    avail = free_bytes(device) if available is None else available
    grids = BYTES_PER_PADDED_VOXEL * (2 * box) ** 3
    per_particle = BYTES_PER_BATCH_PIXEL * box * box
    if avail is None:
        return MemoryPlan(box, batch_size, grids, batch_size * per_particle, None)
    usable = int(USABLE_FRACTION * avail)
    if grids + per_particle > usable:
        raise InputError(
            f"box {box}: the deformed backprojection needs about {_gib(grids + per_particle)} GiB on {device} "
            f"(grids of the 2x padded {2 * box}^3 box) but only {_gib(avail)} GiB are free; run it where more "
            "memory is free (another GPU with --gpu-id, or more memory for the job), or re-extract the "
            "particles with a smaller box")
    fits = max(1, (usable - grids) // per_particle)
    if fits < batch_size:
        log.warning("WARNING: --batch-size %d does not fit in the %s GiB free on %s beside the %s GiB of padded "
                    "grids; inserting %d particles at a time instead", batch_size, _gib(avail), device,
                    _gib(grids), fits)
        batch_size = int(fits)
    return MemoryPlan(box, batch_size, grids, batch_size * per_particle, avail)


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}"
