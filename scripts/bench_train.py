#!/usr/bin/env python
"""Benchmark of the forward-deformation training step (not a test).

Measures particles per second of full training steps (encoder, decoder, Gaussian projection with CTF,
loss, backward, Adam) for one half, and the peak memory, on synthetic in-memory particles (no disk I/O):

    python scripts/bench_train.py --box 64 --gaussians 1000 --batch 64 --steps 20 [--device cpu|cuda]
    python scripts/bench_train.py --grid          # box 64/128 × 1k/10k Gaussians

For ``-n 1`` vs ``-n 2`` run the job itself on a ``simulate`` project, e.g.
``mpiexec -n 2 relion_dynamight optimize-deformations ...`` and compare the "particles/s" of run.out.
"""

from __future__ import annotations

import argparse
import resource
import time
from dataclasses import dataclass

import numpy as np
import torch

from relion_dynamight.imaging.ctf import CtfParams
from relion_dynamight.imaging.geometry import euler_to_matrix
from relion_dynamight.training.config import default_config
from relion_dynamight.training.half import HalfModel


@dataclass
class Batch:
    """The fields of ``relion.particles.ParticleBatch`` that training uses (no file-reading imports)."""

    index: torch.Tensor
    images: torch.Tensor
    rotations: torch.Tensor
    shifts: torch.Tensor
    ctf: CtfParams
    ctf_premultiplied: torch.Tensor

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.index.to(device), self.images.to(device), self.rotations.to(device),
                     self.shifts.to(device), self.ctf.to(device), self.ctf_premultiplied.to(device))


class SyntheticData:
    """Random images and poses: the step cost does not depend on the image content."""

    def __init__(self, n: int, box: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.box = box
        self.images = torch.randn(n, box, box, generator=gen)
        angles = torch.rand(n, 3, generator=gen, dtype=torch.float64) * 360
        self.rot = euler_to_matrix(angles[:, 0], angles[:, 1] / 2, angles[:, 2]).float()
        self.shifts = torch.rand(n, 2, generator=gen) * 2 - 1
        full = lambda v: torch.full((n,), v, dtype=torch.float64)  # noqa: E731
        self.ctf = CtfParams(full(15000.0), full(14500.0), full(30.0), full(300.0), full(2.7), full(0.1), full(0.0),
                             full(0.0), full(1.0), full(1.5))

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, indices) -> Batch:
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return Batch(idx, self.images[idx], self.rot[idx], self.shifts[idx], self.ctf.index(idx),
                             torch.zeros(len(idx), dtype=torch.bool))


def bench(box: int, n_gaussians: int, batch: int, steps: int, device: torch.device) -> dict[str, float]:
    data = SyntheticData(max(batch * 4, 64), box)
    gen = torch.Generator().manual_seed(1)
    positions = (torch.rand(n_gaussians, 3, generator=gen) - 0.5) * box * 0.6
    initial = {"positions": positions, "log_amplitude": torch.tensor(0.0), "log_width": torch.tensor(0.7),
               "relative_amplitudes": None}
    config = default_config(box=box, pixel_size=1.5, n_gaussians=n_gaussians, batch_size=batch)
    model = HalfModel(1, config, initial, np.arange(len(data)), np.zeros(0, np.int64), device)
    model._graph = model._graph_now()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    b = data.batch(np.arange(batch)).to(device)
    model._step(b, "all", recalibrate=True)  # warm-up (allocations, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(steps):
        b = data.batch((np.arange(batch) + i * batch) % len(data)).to(device)
        model._step(b, "all", recalibrate=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = time.perf_counter() - start
    return {"box": box, "gaussians": n_gaussians, "batch": batch, "particles_per_s": steps * batch / seconds,
            "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--gaussians", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--grid", action="store_true", help="box 64/128 × 1k/10k Gaussians")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cases = [(b, g) for b in (64, 128) for g in (1000, 10000)] if args.grid else [(args.box, args.gaussians)]
    print(f"device {device}, {torch.get_num_threads()} thread(s), batch {args.batch}, {args.steps} steps")
    for box, gaussians in cases:
        r = bench(box, gaussians, args.batch, args.steps, device)
        print(f"box {r['box']:4d}  gaussians {r['gaussians']:6d}  {r['particles_per_s']:9.1f} particles/s  "
              f"peak {r['peak_mib']:8.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
