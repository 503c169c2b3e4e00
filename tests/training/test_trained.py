"""Issue 13 (1): ``--checkpoint-file`` means that checkpoint — its networks and its encoders' latent codes."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from relion_dynamight.jobs import optimize_deformations
from relion_dynamight.training import trained as inv
from relion_dynamight.jobs.simulate import simulate_project
from relion_dynamight.relion.jobdir import Job
from relion_dynamight.training import checkpoint as ckpt
from relion_dynamight.training.trained import cache_path, checkpoint_latents, encode_particles


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import os

    project = tmp_path_factory.mktemp("trained") / "proj"
    sim = simulate_project(project, n_particles=240, box=24, pixel_size=3.0, snr=1.0, seed=5)
    out = project / "DynaMight" / "job002"
    old = Path.cwd()
    os.chdir(project)                      # the checkpoint names its STAR file relative to the project
    try:
        optimize_deformations.run(Job(out), refinement_star_file=Path("Refine3D/job001/run_data.star"),
                                  output_directory=Path("DynaMight/job002"),
                                  initial_model=sim["consensus"], n_gaussians=80, n_epochs=6, batch_size=16, seed=1,
                                  gpu_id="cpu", schedule={"warmup_epochs": 1, "consensus_every": 0})
    finally:
        os.chdir(old)
    return project


def test_final_checkpoint_reencodes_to_latent_space_star(trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The re-encoding reproduces the stored codes for the final checkpoint (same encoders, same inputs)."""
    from relion_dynamight.relion.particles import ParticleData

    monkeypatch.chdir(trained)
    job = Path("DynaMight/job002")
    inputs = inv.load_forward(job, None, "test")
    state = ckpt.load_checkpoint(ckpt.final_path(job))
    codes = encode_particles(state, ParticleData(state["config"]["star_file"]), torch.device("cpu"))
    np.testing.assert_allclose(codes, inputs.latents.numpy(), atol=2e-5)


def test_an_earlier_checkpoint_gives_its_own_codes_and_caches_them(trained: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.chdir(trained)
    job = Path("DynaMight/job002")
    earlier = ckpt.list_checkpoints(job)[-1]          # the oldest one kept (the keep policy removes others)
    epoch = int(earlier.stem.split("_")[1])
    assert epoch < 6
    final = inv.load_forward(job, None, "test")
    with caplog.at_level(logging.INFO, logger="relion_dynamight"):
        chosen = inv.load_forward(job, earlier, "test")
    assert chosen.checkpoint == earlier and chosen.state["epoch"] == epoch
    assert not torch.allclose(chosen.latents, final.latents, atol=1e-3)     # not the final epoch's codes
    assert cache_path(job, earlier).is_file() and "Encoding the particles" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="relion_dynamight"):
        again = checkpoint_latents(chosen.state, earlier, job)
    assert "read from" in caplog.text and torch.equal(again, chosen.latents)
    # the final checkpoint named explicitly is the stored latent_space.star
    named_final = inv.load_forward(job, ckpt.final_path(job), "test")
    assert torch.equal(named_final.latents, final.latents)


def test_inverse_training_stops_when_the_held_out_fit_stops_improving(trained: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 13 (3): the inverse network's epoch count is a maximum; run.out says why it stopped."""
    import subprocess
    import sys

    monkeypatch.chdir(trained)
    res = subprocess.run([sys.executable, "-m", "relion_dynamight.launcher", "optimize-inverse-deformations",
                          "DynaMight/job002/", "--n-epochs", "200", "--pipeline-control", "DynaMight/job002/"],
                         capture_output=True, text=True, timeout=900, env={**__import__("os").environ,
                                                                            "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    stops = [x for x in res.stdout.splitlines() if "inverse training stops at epoch" in x]
    assert len(stops) == 2 and all("held-out fit RMS" in x for x in stops), res.stdout[-3000:]
    epochs = [int(x.split("stops at epoch ")[1].split()[0]) for x in stops]
    assert all(6 <= e < 200 for e in epochs), epochs
    # a converged inverse is a finished one: the backprojection accepts it
    res = subprocess.run([sys.executable, "-m", "relion_dynamight.launcher", "deformable-backprojection",
                          "DynaMight/job002/", "--batch-size", "64", "--pipeline-control", "DynaMight/job002/"],
                         capture_output=True, text=True, timeout=900, env={**__import__("os").environ,
                                                                            "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]


def test_converged_rule() -> None:
    from relion_dynamight.training.inverse import InverseConfig, InverseTrainer

    trainer = InverseTrainer.__new__(InverseTrainer)
    trainer.config = InverseConfig(patience=3, min_improvement=0.05)
    trainer.holdout_rows = torch.arange(10)
    trainer.val_history = [1.0, 0.5, 0.3]
    assert trainer.converged() is None                       # not enough epochs yet
    trainer.val_history = [1.0, 0.5, 0.3, 0.2, 0.15, 0.12]
    assert trainer.converged() is None                       # 40 % better than before the window
    trainer.val_history = [1.0, 0.5, 0.3, 0.2, 0.199, 0.198, 0.197]
    assert "improved by 1.5 %" in trainer.converged()
    trainer.config = InverseConfig(patience=0)
    assert trainer.converged() is None                       # rule off
