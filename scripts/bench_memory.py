#!/usr/bin/env python
"""Peak memory of ``reconstruct``, ``deformable-backprojection`` and training epochs versus particle count.

Issue 7 item 3: training and backprojection stream particles from disk, so their memory must not grow
with the number of particles (apart from the per-particle metadata: STAR table, latent codes, half sets).

Data: one simulated project (``--base`` particles, box 64), whose images are tiled into ONE float16
(MRC mode 12) stack per size with numpy memory maps, and a STAR file per size whose rows repeat the
base particles' metadata (angles, shifts, CTF) with unique image names -- i.e. 20k/100k particles are
*repeats* of the simulated ones (the measurement is of memory, not of quality).  For
``deformable-backprojection`` a job directory is made directly (untrained forward decoder and inverse
networks written as checkpoints with the right fingerprint), so no training at that size is needed.

Each command runs as a child process; reported per run:

* ``VmHWM`` -- the kernel's peak resident set (``ru_maxrss`` of ``os.wait4``); it includes file pages of
  the memory-mapped stacks that were touched (page cache shared with the kernel, reclaimable);
* ``peak RssAnon`` -- the largest anonymous resident memory seen when polling ``/proc/PID/status`` every
  0.1 s (heap: tensors, arrays, Python objects) -- what actually has to fit.

Task ``train`` runs ``optimize-deformations --n-epochs 1`` (CLI); its one epoch is a warm-up epoch (only the
Gaussians are fitted).  Task ``train-net`` runs the same job through ``run_task`` with the warm-up skipped
(job's ``schedule`` argument), so the epoch is a full network epoch.  Both are stopped with SIGTERM after
``--train-seconds`` if the epoch has not finished (status "stopped": the peak is reached within the first
batches; the CLI has no option to limit the number of batches).

Usage::

    python scripts/bench_memory.py --work /tmp/bench_mem --sizes 2000 20000 100000 [--out table.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BOX = 64
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "RELION_DYNAMIGHT_NO_WATCHDOG": "1"}


# -- data -------------------------------------------------------------------------------------------
def make_base(work: Path, n: int) -> Path:
    from relion_dynamight.jobs.simulate import simulate_project

    project = work / "project"
    if not (project / "Refine3D/job001/run_data.star").exists():
        simulate_project(project, n_particles=n, box=BOX, pixel_size=3.0, snr=0.5, seed=5)
    return project


def make_size(project: Path, n: int) -> Path:
    """``Bench/particles_N.star`` + ``Bench/stack_N.mrcs`` (float16) inside the project."""
    import mrcfile

    from relion_dynamight.relion.particles import ParticleData
    from relion_dynamight.relion.star import load_particles, write_particles

    star = project / f"Bench/particles_{n}.star"
    if star.exists():
        return star
    base_star = project / "Refine3D/job001/run_data.star"
    table = load_particles(base_star)
    base = ParticleData(base_star, project_dir=project)
    images = base.images.read(np.arange(len(base))).astype(np.float16)
    stack = project / f"Bench/stack_{n}.mrcs"
    stack.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new_mmap(stack, shape=(n, BOX, BOX), mrc_mode=12, overwrite=True) as mrc:
        for start in range(0, n, len(images)):
            stop = min(n, start + len(images))
            mrc.data[start:stop] = images[: stop - start]
        mrc.voxel_size = float(base.pixel_sizes[0])
    rows = np.arange(n) % len(table)
    names = np.array([f"{i + 1:06d}@Bench/stack_{n}.mrcs" for i in range(n)])
    subset = (np.arange(n) % 2 + 1).astype(np.int64)
    write_particles(table, star, rows=rows, extra_columns={"rlnImageName": names, "rlnRandomSubset": subset})
    return star


def make_backprojection_job(project: Path, star: Path, n: int) -> str:
    """A job directory with a forward checkpoint, latent codes and finished inverse files for ``star``."""
    import torch

    from relion_dynamight.training import trained as inv
    from relion_dynamight.model.decoder import DeformationDecoder
    from relion_dynamight.relion.star import load_particles, write_particles
    from relion_dynamight.training import checkpoint as ckpt
    from relion_dynamight.training.halves import fingerprint
    from relion_dynamight.training.inverse import InverseConfig, InverseTrainer

    job = f"DynaMight/bp{n}"
    if (project / inv.inverse_path(Path(job), 2)).exists():
        return job
    table = load_particles(star)
    half = (np.arange(n) % 2 + 1).astype(np.int8)
    gen = torch.Generator().manual_seed(0)
    centres = (torch.rand((500, 3), generator=gen) - 0.5) * BOX * 0.5
    z = torch.randn((n, 1), generator=gen) * 0.5
    config = {"box": BOX, "pixel_size": float(table.pixel_sizes[0]), "latent_dim": 1, "decoder_freqs": 10,
              "decoder_hidden": 32, "decoder_layers": 8, "star_file": str(star.relative_to(project)), "seed": 0}
    halves = {}
    for h in (1, 2):
        torch.manual_seed(h)
        dec = DeformationDecoder(1, BOX)
        halves[h] = {"decoder": dict(dec.state_dict()), "gaussians": {"positions": centres}}
    state = {"epoch": 1, "config": config, "fingerprint": fingerprint(table.image_names), "split_half": half,
             "split_validation": np.zeros(n, dtype=bool), "initial": {"positions": centres}, "halves": halves}
    path = ckpt.save_checkpoint(ckpt.final_path(project / job), state)
    write_particles(table, project / job / inv.LATENT_STAR, extra_columns={
        "rlnRandomSubset": half.astype(np.int64), "dmValidation": np.zeros(n, dtype=np.int64),
        "dmLatent1": z[:, 0].numpy().astype(np.float64)})
    inputs = inv.ForwardInputs(state={**state, "path": path}, checkpoint=path, latents=z, half=half.astype(np.int64),
                               image_names=table.image_names)
    cfg = InverseConfig(n_epochs=1)
    for h in (1, 2):
        rows = np.flatnonzero(half == h)
        trainer = InverseTrainer(h, centres, z[rows], lambda p, zz, s: p, BOX, cfg, torch.device("cpu"))
        trainer.epoch = cfg.n_epochs
        inv.save_inverse(project / inv.inverse_path(Path(job), h), trainer, inputs)
    return job


# -- measuring --------------------------------------------------------------------------------------
def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


#: Child for "train-net": optimize-deformations under the job protocol with the warm-up epochs (Gaussians
#: only) skipped through the job's ``schedule`` argument (not a CLI option), so the one epoch measured is a
#: full network epoch (encoder, decoder, renderer, both halves) followed by the latent pass over all particles.
TRAIN_NET_DRIVER = """
import sys
from pathlib import Path
from relion_dynamight.jobs.runner import run_task
from relion_dynamight.jobs import optimize_deformations as od
star, job, model, ng = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sys.exit(run_task("optimize-deformations", Path(job), lambda j: od.run(
    j, refinement_star_file=Path(star), output_directory=Path(job), initial_model=Path(model), n_gaussians=ng,
    n_epochs=1, batch_size=64, gpu_id="cpu", schedule={"warmup_epochs": 0})))
"""


def run_measure(args: list[str], cwd: Path, limit: float | None = None) -> dict[str, float]:
    """Run ``relion_dynamight ARGS`` (SIGTERM after ``limit`` s): peak RSS (VmHWM = ``ru_maxrss`` of this
    child, from ``os.wait4``), peak anonymous RSS (polled), seconds and status."""
    cmd = ([sys.executable, "-c", TRAIN_NET_DRIVER, *args[1:]] if args[0] == "train-net"
           else [sys.executable, "-m", "relion_dynamight.launcher", *args])
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **ENV}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    anon, stopped = 0, False
    err_chunks: list[bytes] = []
    os.set_blocking(proc.stderr.fileno(), False)  # type: ignore[union-attr]
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            break
        anon = max(anon, _status_kib(proc.pid, "RssAnon"))
        if limit is not None and not stopped and time.monotonic() - t0 > limit:
            proc.send_signal(signal.SIGTERM)
            stopped = True
        chunk = proc.stderr.read()  # type: ignore[union-attr]
        if chunk:
            err_chunks.append(chunk)
        time.sleep(0.1)
    proc.returncode = os.waitstatus_to_exitcode(status)
    code = proc.returncode
    if code not in (0, 3):
        print(b"".join(err_chunks).decode(errors="replace")[-3000:], file=sys.stderr)
    return {"hwm": usage.ru_maxrss / 1024, "anon": anon / 1024, "seconds": time.monotonic() - t0,
            "status": "ok" if code == 0 else ("stopped" if stopped else f"exit {code}")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_memory"))
    parser.add_argument("--base", type=int, default=2000, help="simulated particles (tiled for larger sizes)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000, 100000])
    parser.add_argument("--tasks", nargs="+", default=["reconstruct", "backprojection", "train", "train-net"])
    parser.add_argument("--train-seconds", type=float, default=120.0)
    parser.add_argument("--time-limit", type=float, default=None,
                        help="stop reconstruct/backprojection with SIGTERM after this many seconds (status 'stopped')")
    parser.add_argument("--n-gaussians", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown table here")
    opts = parser.parse_args()

    opts.work.mkdir(parents=True, exist_ok=True)
    project = make_base(opts.work, opts.base)
    rows = []
    for n in opts.sizes:
        t0 = time.monotonic()
        star = make_size(project, n)
        rel = str(star.relative_to(project))
        print(f"{n} particles: data ready in {time.monotonic() - t0:.0f} s ({rel})", flush=True)
        for task in opts.tasks:
            if task == "reconstruct":
                args = ["reconstruct", "--i", rel, "--o", f"Bench/rec_{n}.mrc", "--ctf"]
                res = run_measure(args, project, limit=opts.time_limit)
            elif task == "backprojection":
                job = make_backprojection_job(project, star, n)
                res = run_measure(["deformable-backprojection", job, "--gpu-id", "cpu", "--pipeline-control", job],
                                  project, limit=opts.time_limit)
            elif task == "train-net":
                job = f"DynaMight/trainnet{n}"
                args = ["train-net", rel, job, "Refine3D/job001/run_class001.mrc", str(opts.n_gaussians)]
                res = run_measure(args, project, limit=opts.train_seconds)
            else:
                job = f"DynaMight/train{n}"
                args = ["optimize-deformations", "--refinement-star-file", rel, "--output-directory", job,
                        "--initial-model", "Refine3D/job001/run_class001.mrc", "--n-gaussians",
                        str(opts.n_gaussians), "--n-epochs", "1", "--batch-size", "64", "--gpu-id", "cpu",
                        "--pipeline-control", job]
                res = run_measure(args, project, limit=opts.train_seconds)
            row = (n, task, res["hwm"], res["anon"], res["seconds"], res["status"])
            rows.append(row)
            print(f"  {task:15s} VmHWM {res['hwm']:7.0f} MiB  peak RssAnon {res['anon']:7.0f} MiB  "
                  f"{res['seconds']:6.0f} s  {res['status']}", flush=True)
    table = ["| particles | task | peak RSS (VmHWM) MiB | peak anonymous RSS MiB | wall s | status |",
             "|---:|---|---:|---:|---:|---|"]
    table += [f"| {n} | {t} | {h:.0f} | {a:.0f} | {s:.0f} | {st} |" for n, t, h, a, s, st in rows]
    text = "\n".join(table)
    print(text)
    if opts.out:
        header = (f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`\n\n"
                  f"Machine: {platform.node()}, {platform.machine()}, {os.cpu_count()} CPUs, "
                  f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, "
                  f"load average {os.getloadavg()[0]:.1f} at the end; box {BOX}, float16 stacks, "
                  f"{opts.base} simulated particles tiled to each size (rows repeated, one float16 stack per size).\n\n")
        opts.out.write_text(header + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
