#!/usr/bin/env python
"""Ground-truth benchmark of the whole method on a real protein's domain motion (not a test).

Adenylate kinase (E. coli), whose LID and NMP domains close over its CORE, simulated between its closed and
open crystal structures (``simulate --motion adk``: the LID tip moves about 25 Å), with an imaging envelope
that the STAR file does not state, SNR measured in the particle's disc, two optics groups and half sets by
micrograph.  Then, as a RELION user runs it, the exact command lines of RELION 5's DynaMight tab with its
defaults (new job; Continue with inverse deformations; Continue with deformed backprojection), and
``reconstruct --halves`` of the same particles (the standard reconstruction) and of the same particles
simulated in one conformation (the limit).  Scores: :mod:`relion_dynamight.analysis.truth_scores`.

    python scripts/bench_science.py --out /scratch/bench_adk                   # 20k particles, SNR 0.02
    python scripts/bench_science.py --out /tmp/quick --quick                   # minutes on a CPU
    python scripts/bench_science.py --out DIR --gpu-id 0 --threads 8           # on a GPU node

Each step is skipped when its outputs exist (rerun the same command to resume); ``--extra-train`` is
appended to the training line as RELION's "Additional arguments" field would be.  Writes
``DIR/bench_science.json`` and ``DIR/bench_science.md`` (the table in README) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from relion_dynamight.relion.relion5_lines import continue_job, new_job

JOB = "DynaMight/job002/"
STAR = "Refine3D/job001/run_data.star"
CONSENSUS = "Refine3D/job001/run_class001.mrc"
LIMIT_STAR = "truth/limit/particles.star"
QUICK = {"n_particles": 3000, "box": 48, "pixel_size": 2.0, "snr": 0.05, "extra_train": "--n-epochs 12",
         "n_gaussians": 2000, "inverse_epochs": 20}


def main() -> None:
    args = parse()
    root = Path(args.out).resolve()
    times: dict[str, float] = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}

    def step(name: str, argv: list[str]) -> None:
        done = root / "Bench" / (name.replace(" ", "_").replace("(", "").replace(")", "") + ".done")
        if done.exists():
            print(f"[skip] {name}: {done} exists", flush=True)
            return
        print(f"[run ] {name}: {' '.join(argv)}", flush=True)
        t = time.monotonic()
        res = subprocess.run([sys.executable, "-m", "relion_dynamight.launcher", *argv], cwd=root, env=env)
        if res.returncode:
            sys.exit(f"{name} failed (exit {res.returncode}); see {root}")
        times[name] = round(time.monotonic() - t, 1)
        done.write_text(f"{times[name]}\n")

    (root / "Bench").mkdir(parents=True, exist_ok=True)
    if not (root / STAR).exists():
        sim = ["simulate", "--o", str(root), "--motion", "adk", "--limit", "--snr-region", "disc",
               "--n-particles", str(args.n_particles), "--box", str(args.box), "--pixel-size", str(args.pixel_size),
               "--snr", str(args.snr), "--envelope-bfactor", str(args.envelope_bfactor), "--seed", str(args.seed)]
        step("simulate", sim)
    for name, star, out in (("consensus", STAR, "Bench/consensus.mrc"), ("limit", LIMIT_STAR, "Bench/limit.mrc")):
        step(f"reconstruct ({name})", ["reconstruct", "--i", star, "--o", out, "--ctf", "--halves",
                                       "--j", str(args.threads)])
    (root / JOB).mkdir(parents=True, exist_ok=True)
    lines = {
        "optimize-deformations": new_job(args.n_gaussians, gpu=args.gpu_id, threads=args.threads,
                                         other=args.extra_train, job=JOB, star=STAR, volume=CONSENSUS),
        "optimize-inverse-deformations": continue_job("inverse", gpu=args.gpu_id, epochs=args.inverse_epochs, job=JOB,
                                                      other=args.extra_continue),
        "deformable-backprojection": continue_job("backprojection", gpu=args.gpu_id, job=JOB,
                                                  other=args.extra_continue),
    }
    for name, line in lines.items():
        step(name, shlex.split(line)[1:])
    import torch

    from relion_dynamight.analysis.truth_scores import format_table, score_job
    from relion_dynamight.training.trained import forward_decoder, load_forward

    forward = load_forward(root / JOB, None, "scoring")
    decoders = {h: forward_decoder(forward, h, torch.device("cpu"))[0] for h in (1, 2)}
    result = score_job(root, JOB, (root / "Bench/consensus_half1.mrc", root / "Bench/consensus_half2.mrc"),
                       (root / "Bench/limit_half1.mrc", root / "Bench/limit_half2.mrc"), forward, decoders)
    result["oracle"] = oracle_scores(root, args.oracle_groups)
    result["settings"] = vars(args)
    result["command_lines"] = lines
    result["wall_seconds"] = times
    (root / "bench_science.json").write_text(json.dumps(result, indent=1, default=float))
    table = format_table(result)
    (root / "bench_science.md").write_text(table + "\n")
    print(table)
    print("wall seconds:", times)


def oracle_scores(root: Path, n_groups: int) -> dict:
    """Ceilings (:mod:`relion_dynamight.analysis.oracle`): the Bayes posterior of every particle's conformation
    with the true model, poses, CTFs, envelope and noise σ, its latent order and shrinkage per half, and the
    deformed backprojection with the true (smoothed) deformation at the posterior means (``n_groups`` equal-count
    groups per half) scored like the job's maps.  Cached in ``Bench/oracle.json``."""
    import numpy as np
    import pandas as pd
    import starfile
    import torch

    from relion_dynamight.analysis import oracle, truth_scores
    from relion_dynamight.analysis.phantom import load_phantom
    from relion_dynamight.analysis.phantom_images import clean_images
    from relion_dynamight.jobs.backprojection import backproject_groups
    from relion_dynamight.relion.particles import ParticleData

    cached = root / "Bench" / "oracle.json"
    if cached.exists():
        return json.loads(cached.read_text())
    t0 = time.monotonic()
    info = json.loads((root / "truth" / "phantom.json").read_text())
    phantom = load_phantom(root / "truth")
    box, pixel = phantom.box, phantom.pixel_size
    star = starfile.read(root / STAR, always_dict=True)
    optics, particles = star["optics"], star["particles"]
    coords = pd.read_csv(root / "truth" / "particles.csv")["hinge_angle"].to_numpy()
    data = ParticleData(root / STAR, project_dir=root)
    mean = np.empty(len(particles))
    for start in range(0, len(particles), 1000):
        rows = np.arange(start, min(start + 1000, len(particles)))
        sub = particles.iloc[rows]
        post = oracle.posterior_conformations(
            data.batch(rows).images.float(),
            lambda t, sub=sub, n=len(rows): clean_images(phantom, sub, optics, np.full(n, t), box, pixel,
                                                        float(info.get("envelope_bfactor", 0.0))),
            float(info["noise_sigma"]))
        mean[rows] = post.mean
    halves = particles["rlnRandomSubset"].to_numpy()
    weights = oracle.field_weights(phantom, box)
    maps = []
    for h in (1, 2):
        rows = np.flatnonzero(halves == h)
        labels, centres = oracle.coordinate_groups(mean[rows], n_groups)
        bp = backproject_groups(data, rows, labels, lambda g, c=centres: oracle.true_field(phantom, c[g], weights),
                                box, torch.device("cpu"), 256)
        maps.append(bp.reconstruct())
    truth = truth_scores._load(root / "truth" / "map_reference.mrc")
    masks = truth_scores.region_masks(phantom, box)
    scores = truth_scores.map_scores(tuple(maps), truth, masks, pixel)
    out = {"maps": scores,
           "latent": {h: abs(truth_scores.spearman(mean[halves == h], coords[halves == h])) for h in (1, 2)},
           "amplitude": {h: oracle.shrinkage(mean[halves == h], coords[halves == h]) for h in (1, 2)},
           "groups": n_groups, "seconds": round(time.monotonic() - t0, 1)}
    cached.write_text(json.dumps(out, indent=1))
    return json.loads(cached.read_text())


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="Project directory (created; reused to resume).")
    p.add_argument("--quick", action="store_true", help=f"Small settings for a CPU: {QUICK}.")
    p.add_argument("--n-particles", type=int, default=20000)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--pixel-size", type=float, default=1.5)
    p.add_argument("--snr", type=float, default=0.02, help="Signal-to-noise ratio (variance) in the particle disc.")
    p.add_argument("--envelope-bfactor", type=float, default=60.0, help="Hidden imaging envelope (Å²).")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--n-gaussians", type=int, default=10000, help="The tab's 'Number of Gaussians' (default 10000).")
    p.add_argument("--inverse-epochs", type=int, default=200, help="The tab's inverse epochs (default 200).")
    p.add_argument("--extra-train", default="", help="'Additional arguments' of the new job.")
    p.add_argument("--extra-continue", default="", help="'Additional arguments' of the continue tasks.")
    p.add_argument("--gpu-id", default="", help="The tab's GPU field (empty: CPU).")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--oracle-groups", type=int, default=32, help="Coordinate groups per half of the oracle's map.")
    args = p.parse_args()
    if args.quick:
        defaults = {a.dest: a.default for a in p._actions}
        for key, value in QUICK.items():
            if getattr(args, key) == defaults[key]:
                setattr(args, key, value)
    return args


if __name__ == "__main__":
    main()
