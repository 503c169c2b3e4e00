#!/usr/bin/env python3
"""Benchmark: deformed backprojection (grouped) vs per-particle reference vs standard vs relion_reconstruct.

Usage: python scripts/bench_backprojection.py [--box 64] [--n 2000] [--group-resolution 0.5] [--device cpu]
       [--skip-reference] [--interpolation cubic linear] [--out DIR]

Uses the simulator's hinge data set and the TRUE deformation (so the numbers measure the engine, not the
training): wall time, peak memory (CPU max RSS delta / CUDA peak) and FSC against the true reference map
(masked to the moving domain: FSC at 1/4 and 1/2 Nyquist), and the process CPU time.  ``--interpolation``: the
warp's interpolation(s) for the deformed rows (each one run).  One line per method; paste into README.md.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--group-resolution", type=float, default=0.5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-reference", action="store_true", help="skip the per-particle reference (slow)")
    ap.add_argument("--interpolation", nargs="+", default=["cubic", "linear"], choices=["cubic", "linear"])
    ap.add_argument("--snr", type=float, default=0.5, help="simulated signal-to-noise ratio")
    ap.add_argument("--halves", action="store_true",
                    help="score like the job: two half sets, FSC-based Wiener term, average of the regularised halves")
    ap.add_argument("--weight-floor", type=float, nargs="+", default=[None],
                    help="floor(s) of the deformed map's CTF² weights, fraction of their shell mean "
                         "(default: the engine's)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from relion_dynamight.analysis.phantom import axis_angle_matrix
    from relion_dynamight.imaging.backprojection import wiener_term_from_fsc
    from relion_dynamight.imaging.fourier import fsc
    from relion_dynamight.imaging.grouping import group_by_deformation, group_representatives
    from relion_dynamight.imaging.warp import grid_nodes, upsample_field
    import relion_dynamight.imaging.deformed_backprojection as dbp
    from relion_dynamight.jobs.backprojection import backproject_groups
    from relion_dynamight.jobs.simulate import load_truth, simulate_project
    from relion_dynamight.relion.mrc import read_map
    from relion_dynamight.relion.particles import ParticleData

    device = torch.device(args.device)
    root = args.out or Path(tempfile.mkdtemp(prefix="bench_bp_"))
    t = time.perf_counter()
    sim = simulate_project(root, n_particles=args.n, box=args.box, pixel_size=3.0, snr=args.snr, motion="hinge", seed=5,
                           float16_groups=())
    print(f"simulated {args.n} particles, box {args.box} in {time.perf_counter() - t:.1f} s ({root})")
    phantom, truth_table = load_truth(root)
    truth = torch.from_numpy(read_map(sim["reference_map"])[0])
    box = args.box
    data = ParticleData(sim["star"])
    rows = np.arange(len(data))
    angles = torch.as_tensor(truth_table["hinge_angle"].to_numpy())
    feats = (phantom.true_positions(angles) - phantom.positions).float()
    grid = torch.stack(torch.meshgrid(*(torch.arange(box, dtype=torch.float64) - box // 2,) * 3, indexing="ij"), -1).flip(-1)
    d = torch.cdist(grid.reshape(-1, 3), phantom.positions[phantom.moving]).min(dim=1).values
    mask = (d < 3.0).reshape(box, box, box).float()

    nodes = grid_nodes(box, max(2, box // 2 + 1), dtype=torch.float64)
    flat = nodes.reshape(-1, 3)
    dm = torch.cdist(flat, phantom.positions[phantom.moving]).min(dim=1).values
    ds = torch.cdist(flat, phantom.positions[~phantom.moving]).min(dim=1).values
    blend = torch.sigmoid((ds - dm) / 1.5)[:, None]            # the same for every angle: computed once
    field_time = [0.0]

    def true_field(angle: float) -> torch.Tensor:
        """Γ on the consensus grid for a rigid hinge: moving-domain voxels rotate, smoothly blended."""
        t0 = time.perf_counter()
        rot = axis_angle_matrix(phantom.hinge_axis, torch.tensor(angle, dtype=torch.float64))
        rotated = phantom.hinge_point + (flat - phantom.hinge_point) @ rot.T
        pos = (flat + blend * (rotated - flat)).reshape(nodes.shape)
        out = upsample_field(pos.float(), box).to(device)
        field_time[0] += time.perf_counter() - t0
        return out

    def gain(vol: torch.Tensor, shell: int) -> float:
        """Shell amplitude gain vs the truth, Re<F·conj(T)> / <|T|²> (masked; noise averages out of it)."""
        from relion_dynamight.imaging.fourier import rfft3_centered
        a, b = rfft3_centered(vol.cpu().double() * mask), rfft3_centered(truth.double() * mask)
        k = torch.fft.fftfreq(box, d=1.0 / box, dtype=torch.float64)
        kx = torch.arange(box // 2 + 1, dtype=torch.float64)
        zz, yy, xx = torch.meshgrid(k, k, kx, indexing="ij")
        sel = torch.round(torch.sqrt(xx**2 + yy**2 + zz**2)).long() == shell
        return float((a[sel] * b[sel].conj()).real.sum() / (b[sel].abs() ** 2).sum())

    def score(vol: torch.Tensor) -> str:
        f = fsc(vol.cpu() * mask, truth * mask)
        return (f"FSC(moving domain) @1/4 Nyq {float(f[box // 8]):.3f}, @1/2 Nyq {float(f[box // 4]):.3f}; "
                f"gain @1/4 {gain(vol, box // 8):.3f}, @1/2 {gain(vol, box // 4):.3f}")

    engine = dbp.DeformedBackprojector

    def run(name: str, labels: np.ndarray, field, interpolation: str = "cubic", floor: float | None = None) -> None:
        # backproject_groups builds its DeformedBackprojector from the module: pick the interpolation there
        dbp.DeformedBackprojector = lambda *a, **k: engine(*a, interpolation=interpolation, **k)  # type: ignore
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        before = peak_mb(device)
        t0, c0 = time.perf_counter(), time.process_time()
        field_time[0] = 0.0

        def recon(bp, **kw):
            if name.startswith("standard"):
                return bp.standard_reconstruction(**kw)
            return bp.reconstruct(weight_floor=floor, **kw)

        if not args.halves:
            vol = recon(backproject_groups(data, rows, labels, field, box, device, batch_size=256))
        else:   # as jobs/backprojection.py write_maps: plain halves → FSC → Wiener term → regularised halves
            bps = [backproject_groups(data, rows[h::2], labels[h::2], field, box, device, batch_size=256)
                   for h in (0, 1)]
            curve = fsc(recon(bps[0]), recon(bps[1]))
            vol = sum(0.5 * recon(b, wiener=wiener_term_from_fsc(b.weight_grid(), curve, box)) for b in bps)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(f"{name:>30}: {dt:8.1f} s (CPU {cpu:7.1f} s; fields {field_time[0]:6.1f} s), "
              f"groups {int(labels.max()) + 1:6d}, peak mem {peak_mb(device) - before:8.0f} MB (delta), {score(vol)}",
              flush=True)

    labels = group_by_deformation(feats, args.group_resolution).numpy()
    reps = group_representatives(feats, torch.as_tensor(labels))
    run("standard (ours)", np.zeros(len(rows), dtype=np.int64), lambda g: None)
    for floor in args.weight_floor:
        tag = "" if floor is None else f", floor {floor}"
        for interp in args.interpolation:
            run(f"deformed {interp} ({args.group_resolution} px{tag})", labels,
                lambda g: true_field(float(angles[reps[g]])), interp, floor)
        if not args.skip_reference:
            for interp in args.interpolation:
                run(f"per-particle reference {interp}{tag}", rows.copy(), lambda g: true_field(float(angles[g])),
                    interp, floor)
    if shutil.which("relion_reconstruct"):
        t0 = time.perf_counter()
        res = subprocess.run(["relion_reconstruct", "--i", str(sim["star"]), "--o", str(root / "relion.mrc"), "--ctf"],
                             cwd=root, capture_output=True, text=True)
        dt = time.perf_counter() - t0
        if res.returncode == 0:
            vol = torch.from_numpy(read_map(root / "relion.mrc")[0])
            print(f"{'relion_reconstruct':>30}: {dt:8.1f} s, {score(vol)}")
        else:
            print("relion_reconstruct failed:", res.stderr.strip().splitlines()[-1:])
    if args.out is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
