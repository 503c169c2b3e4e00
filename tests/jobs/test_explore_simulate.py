"""explore on `simulate` data: cluster subsets follow the true hinge angle and reconstruct in RELION.

The latent is a stand-in for a perfect encoder (true hinge angle / 20° plus noise in every dimension), so
this checks the analysis and the subset export, not the training.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from relion_dynamight.jobs.explore import ExploreInputs, ExploreOptions, LatentTable, explore
from relion_dynamight.relion.star import load_particles

from explore_data import LATENT, hinge_model


def _cc(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.relion
def test_simulated_cluster_subsets_follow_hinge_and_reconstruct(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               relion: None) -> None:
    from relion_dynamight.jobs.simulate import simulate_project

    monkeypatch.chdir(tmp_path)
    sim = simulate_project(Path("."), n_particles=200, box=32, snr=0, float16_groups=(), seed=4)
    table = load_particles(sim["star"])
    angles = np.asarray(sim["hinge_angles"])
    rng = np.random.default_rng(0)
    z = rng.normal(0, 0.1, (len(angles), LATENT))
    z[:, 0] = angles / 20.0 + rng.normal(0, 0.02, len(angles))
    latent = LatentTable(names=table.image_names, half=table.random_subset, validation=np.zeros(len(z), bool),
                         z=torch.as_tensor(z, dtype=torch.float32))
    inputs = ExploreInputs(job_dir=Path("DynaMight/job002"), half_set=1, models={1: hinge_model(), 2: hinge_model()},
                           latent=latent, table=table, box=32, pixel_size=3.0)
    res = explore(inputs, ExploreOptions(clusters=2, movie_pcs=0))
    index = {n: i for i, n in enumerate(table.image_names)}
    recs, cluster_angles = [], []
    for k, (node, _) in enumerate(res.nodes[:2], start=1):
        sub = load_particles(node)
        cluster_angles.append(angles[[index[n] for n in sub.image_names]])
        out = subprocess.run(["relion_reconstruct", "--i", node, "--o", f"rec{k}.mrc", "--ctf"],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        recs.append(mrcfile.read(f"rec{k}.mrc"))
    a1, a2 = cluster_angles
    assert len(a1) + len(a2) == int((table.random_subset == 1).sum())
    # cluster 1 holds the negative hinge angles, cluster 2 the positive ones (pairs in the wrong order: noise only)
    assert (a1[:, None] < a2[None, :]).mean() > 0.98 and np.median(a1) < -5 < 5 < np.median(a2)
    neg = mrcfile.read(sim["motion_maps"][0][1])   # -20°
    pos = mrcfile.read(sim["motion_maps"][-1][1])  # +20°
    cc = [[_cc(r, neg), _cc(r, pos)] for r in recs]
    print("CC (rec vs -20°, +20° truth):", cc)
    assert cc[0][0] > cc[0][1] and cc[1][1] > cc[1][0], cc
    assert min(cc[0][0], cc[1][1]) > 0.6, cc
