#!/usr/bin/env python
"""Benchmark (not a test): our ``reconstruct`` vs ``relion_reconstruct --ctf`` on the same data.

For each box and particle count: a phantom is projected with ``relion_project --ctf`` (random poses,
shifts, astigmatic CTFs), white noise of ``--noise`` × the clean std is added, and then, side by
side, ``relion_reconstruct --ctf`` and ``relion_dynamight reconstruct --ctf`` under ``mpiexec -n K``
for each K of ``--ranks`` are timed (wall time of the whole command).  Reported: wall time, ratio
to RELION, resolution where the FSC against the true map drops below 0.5, and the lowest FSC between
our map and RELION's up to 2/3 Nyquist.  Prints a Markdown table.

``--synthetic`` skips RELION altogether (for GPU machines without it): images are made by torch
(real-space rotation with grid_sample, projection, our CTF) and only our reconstruction is timed,
in-process on ``--device``, with the CPU/GPU agreement of the maps reported.

    python scripts/bench_reconstruct.py --boxes 64 128 --particles 2000 --ranks 1 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))

from backprojection_data import make_projections, phantom_map, read_mrc  # noqa: E402

from relion_dynamight.imaging.fourier import fsc  # noqa: E402


def _mpiexec() -> str | None:
    exe = Path(sys.executable).parent / "mpiexec"
    return str(exe) if exe.exists() else None


def _timed(cmd: list[str], cwd: Path, env: dict | None = None) -> float:
    start = time.perf_counter()
    run = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{run.stderr[-2000:]}")
    return time.perf_counter() - start


def _res_at(curve: np.ndarray, box: int, pixel: float, threshold: float = 0.5) -> float:
    for i in range(1, len(curve)):
        if curve[i] < threshold:
            return box * pixel / max(i - 1, 1) if i > 1 else box * pixel
    return 2 * pixel


def bench_relion(work: Path, box: int, n: int, noise: float, ranks: list[int], threads: int) -> list[dict]:
    pixel = 3.0
    make_projections(work, box=box, n=n, pixel=pixel, noise=noise, seed=box + n)
    truth = torch.from_numpy(read_mrc(work / "truth.mrc"))
    rows = []
    t_rel = _timed(["relion_reconstruct", "--i", "noisy.star", "--o", "relion.mrc", "--ctf"], work)
    rel = torch.from_numpy(read_mrc(work / "relion.mrc"))
    f_rel = fsc(rel, truth).numpy()
    rows.append(dict(box=box, n=n, prog="relion_reconstruct", ranks=1, wall=t_rel, ratio=1.0,
                     res=_res_at(f_rel, box, pixel), agree=float("nan")))
    limit = int(round(2 / 3 * box / 2))
    for k in ranks:
        mpi = [_mpiexec(), "-n", str(k)] if _mpiexec() else []
        cmd = [*mpi, sys.executable, "-m", "relion_dynamight.launcher", "reconstruct", "--i", "noisy.star",
               "--o", f"ours_n{k}.mrc", "--ctf", "--j", str(threads)]
        t = _timed(cmd, work, env={"OMP_NUM_THREADS": str(threads)})
        ours = torch.from_numpy(read_mrc(work / f"ours_n{k}.mrc"))
        f_ours = fsc(ours, truth).numpy()
        agree = float(fsc(ours, rel).numpy()[1:limit + 1].min())
        rows.append(dict(box=box, n=n, prog="relion_dynamight", ranks=k, wall=t, ratio=t / t_rel,
                         res=_res_at(f_ours, box, pixel), agree=agree))
    return rows


def _synthetic_batch(vol: torch.Tensor, n: int, seed: int, device: torch.device):
    """Projections of ``vol`` in random poses with our CTF (grid_sample), shifts 0, for GPU timing."""
    from relion_dynamight.imaging.ctf import CtfParams, ctf_2d
    from relion_dynamight.imaging.fourier import irfft2_centered, rfft2_centered
    from relion_dynamight.imaging.geometry import euler_to_matrix

    g = torch.Generator().manual_seed(seed)
    box = vol.shape[-1]
    rot, psi = torch.rand(n, generator=g) * 360 - 180, torch.rand(n, generator=g) * 360 - 180
    tilt = torch.rad2deg(torch.acos(torch.rand(n, generator=g) * 2 - 1))
    mats = euler_to_matrix(rot.double(), tilt.double(), psi.double()).float().to(device)
    c = (torch.arange(box, device=device, dtype=torch.float32) - box // 2) / (box / 2)
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    grid = torch.stack([x, y, z], -1).reshape(-1, 3)
    images = []
    for k in range(n):
        # image point r' = A r  →  sample the map at r = A^T r'  (grid_sample takes (x, y, z) in [-1, 1])
        src = (grid @ mats[k]).reshape(1, box, box, box, 3) * (box / (box - 1)) + 1.0 / (box - 1)
        img = torch.nn.functional.grid_sample(vol[None, None], src, align_corners=True).sum(2)[0, 0]
        images.append(img)
    images = torch.stack(images)
    ones = torch.ones(n, device=device)
    ctf = CtfParams(defocus_u=15000 * ones, defocus_v=14000 * ones, defocus_angle=30 * ones, voltage=300 * ones,
                    cs=2.7 * ones, amplitude_contrast=0.1 * ones, phase_shift=0 * ones, bfactor=0 * ones,
                    scale=ones, pixel_size=3.0 * ones)
    ctf_values = ctf_2d(ctf, box)
    images = irfft2_centered(rfft2_centered(images) * ctf_values, box)
    return images, mats, ctf_values


def bench_synthetic(box: int, n: int, device: torch.device, batch: int = 512) -> dict:
    from relion_dynamight.imaging.backprojection import FourierAccumulator, prepare_spectra

    vol = torch.from_numpy(phantom_map(box, seed=1)).to(device)
    images, mats, ctf_values = _synthetic_batch(vol, n, seed=box, device=device)
    out = {}
    for dev in ([device, torch.device("cpu")] if device.type != "cpu" and box <= 64 else [device]):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        acc = FourierAccumulator(box, device=dev)
        for s in range(0, n, batch):
            sl = slice(s, s + batch)
            spectra, weights = prepare_spectra(images[sl].to(dev), torch.zeros(images[sl].shape[0], 2, device=dev),
                                               ctf_values[sl].to(dev))
            acc.insert(spectra, weights, mats[sl].to(dev))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        m = acc.reconstruct()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        out[dev.type] = dict(insert=t1 - t0, reconstruct=t2 - t1, map=m.cpu())
    main = out[device.type]
    truth = vol.cpu()
    a, b = main["map"].double() - main["map"].double().mean(), truth.double() - truth.double().mean()
    row = dict(box=box, n=n, device=str(device), insert=main["insert"], reconstruct=main["reconstruct"],
               cc_truth=float((a * b).sum() / (a.norm() * b.norm())))
    if "cpu" in out and device.type != "cpu":
        diff = (out["cpu"]["map"] - main["map"]).abs().max() / out["cpu"]["map"].abs().max()
        row["max_rel_diff_vs_cpu"] = float(diff)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boxes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--particles", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (--j)")
    parser.add_argument("--noise", type=float, default=1.0, help="noise std as a multiple of the clean std")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--synthetic", action="store_true", help="no RELION: torch-made data, in-process timing")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.synthetic:
        print("| box | particles | device | insert (s) | reconstruct (s) | CC vs truth | max rel. diff vs CPU |")
        print("|---|---|---|---|---|---|---|")
        for box in args.boxes:
            for n in args.particles:
                r = bench_synthetic(box, n, torch.device(args.device))
                print(f"| {r['box']} | {r['n']} | {r['device']} | {r['insert']:.2f} | {r['reconstruct']:.2f} | "
                      f"{r['cc_truth']:.4f} | {r.get('max_rel_diff_vs_cpu', float('nan')):.1e} |", flush=True)
        return
    base = args.workdir or Path(tempfile.mkdtemp(prefix="bench_reconstruct_"))
    print("| box | particles | program | ranks | wall (s) | ratio to RELION | FSC=0.5 vs truth (Å) | "
          "min FSC vs RELION to 2/3 Nyquist |")
    print("|---|---|---|---|---|---|---|---|")
    for box in args.boxes:
        for n in args.particles:
            for r in bench_relion(base / f"box{box}_n{n}", box, n, args.noise, args.ranks, args.threads):
                agree = "" if np.isnan(r["agree"]) else f"{r['agree']:.4f}"
                print(f"| {r['box']} | {r['n']} | {r['prog']} | {r['ranks']} | {r['wall']:.1f} | {r['ratio']:.2f} | "
                      f"{r['res']:.1f} | {agree} |", flush=True)


if __name__ == "__main__":
    main()
