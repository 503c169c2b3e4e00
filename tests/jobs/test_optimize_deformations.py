"""The optimize-deformations job as RELION runs it: outputs, exact resume after SIGKILL, MPI, bad input."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import starfile
import torch

from relion_dynamight.jobs.simulate import simulate_project
from relion_dynamight.training import checkpoint as ckpt
from runs import run_cli, wait_for

N_EPOCHS = 5


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("odproj")
    simulate_project(root, n_particles=300, box=32, pixel_size=3.0, snr=1.0, seed=3)
    return root


def _args(job: str, epochs: int = N_EPOCHS, *extra: str) -> list[str]:
    return ["optimize-deformations", "--refinement-star-file", "Refine3D/job001/run_data.star",
            "--output-directory", f"{job}/", "--initial-model", "Refine3D/job001/run_class001.mrc",
            "--n-gaussians", "100", "--regularization-factor", "1", "--n-threads", "1", "--gpu-id", "cpu",
            "--n-epochs", str(epochs), "--batch-size", "32", "--seed", "1", *extra, "--pipeline-control", f"{job}/"]


@pytest.fixture(scope="module")
def reference(project) -> Path:
    """An uninterrupted run."""
    res = run_cli(*_args("DynaMight/job002"), cwd=project)
    assert res.returncode == 0, res.stderr[-3000:]
    return project / "DynaMight" / "job002"


def _compare_trees(a, b, path="") -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            if k != "seconds":
                _compare_trees(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _compare_trees(x, y, f"{path}/{i}")
    elif isinstance(a, torch.Tensor):
        assert torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6), path
    elif isinstance(a, np.ndarray):
        assert np.allclose(a, b, rtol=1e-5, atol=1e-6), path
    elif isinstance(a, float):
        assert abs(a - b) <= 1e-5 * max(abs(a), abs(b), 1e-12), path
    else:
        assert a == b, path


def _assert_same_final(job_a: Path, job_b: Path) -> None:
    a = ckpt.load_checkpoint(ckpt.final_path(job_a))
    b = ckpt.load_checkpoint(ckpt.final_path(job_b))
    assert a["epoch"] == b["epoch"] == N_EPOCHS
    for h in (1, 2):
        _compare_trees(a["halves"][h], b["halves"][h], f"half{h}")
    za = starfile.read(job_a / "forward_deformations" / "latent_space.star", always_dict=True)["particles"]
    zb = starfile.read(job_b / "forward_deformations" / "latent_space.star", always_dict=True)["particles"]
    cols = [c for c in za.columns if c.startswith("dmLatent")]
    assert np.allclose(za[cols].to_numpy(), zb[cols].to_numpy(), atol=1e-5)


def test_outputs(project, reference):
    fwd = reference / "forward_deformations"
    assert (reference / "RELION_JOB_EXIT_SUCCESS").exists()
    for name in ("latent_space.star", "consensus_half1.mrc", "consensus_half2.mrc", "loss_curves.png",
                 "latent_space.png", "checkpoints/checkpoint_final.h5"):
        assert (fwd / name).is_file(), name
    table = starfile.read(fwd / "latent_space.star", always_dict=True)
    rows = table["particles"]
    inp = starfile.read(project / "Refine3D/job001/run_data.star", always_dict=True)["particles"]
    assert list(rows["rlnImageName"]) == list(inp["rlnImageName"])  # input order
    assert np.array_equal(rows["rlnRandomSubset"].to_numpy(), inp["rlnRandomSubset"].to_numpy())
    assert [f"dmLatent{i}" for i in range(1, 7)] == [c for c in rows.columns if c.startswith("dmLatent")]
    assert set(rows["dmValidation"].unique()) == {0, 1}
    with h5py.File(fwd / "checkpoints/checkpoint_final.h5") as f:  # plain HDF5, both halves
        assert {"half1", "half2"} <= set(f) and "encoder" in f["half1"] and "opt_networks" in f["half2"]


def test_progress_lines(project):
    res = run_cli(*_args("DynaMight/job003", 4), cwd=project)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [ln for ln in res.stdout.splitlines() if " half " in ln and "particles/s" in ln]
    assert len(lines) == 8 and "lambda" in lines[-1] and "s/epoch" in lines[-1]
    for h in (1, 2):   # run.out says why training stopped
        assert f"half {h}: training stops at epoch 4: the maximum (--n-epochs); its validation loss increased " in res.stdout
    # rerunning a finished job continues from its final checkpoint without training again
    res = run_cli(*_args("DynaMight/job003", 4), cwd=project)
    assert res.returncode == 0 and "Training already complete" in res.stdout


def _png_not_blank(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    assert float(np.asarray(matplotlib.image.imread(path))[..., :3].std()) > 0.01, f"{path} is blank"


def test_live_maps_figures_and_report_while_training(project):
    """Every --live-every epochs the running job rewrites its consensus maps, figures and a self-reloading
    report; caught while the job is stopped (SIGSTOP) mid-run, then the end replaces them with the final ones."""
    import mrcfile

    job = project / "DynaMight" / "job007"
    fwd = job / "forward_deformations"
    log_path = project / "job007.out"
    # 12 epochs: after the first live files (epoch 2) ten epochs remain, so even a loaded machine stops the job mid-run
    cmd = [sys.executable, "-m", "relion_dynamight.launcher", *_args("DynaMight/job007", 12, "--live-every", "2")]
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=project, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=out,
                                stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: (fwd / "report.html").is_file() or proc.poll() is not None, "the first live report")
            proc.send_signal(signal.SIGSTOP)
            assert proc.poll() is None, "the job finished before its live files could be looked at"
            report = (fwd / "report.html").read_text()
            assert "Training is running: epoch " in report and "http-equiv='refresh'" in report
            assert "at most" in report and "to go (ETA" in report
            for h in (1, 2):
                with mrcfile.open(fwd / f"consensus_half{h}.mrc") as mrc:
                    data = np.asarray(mrc.data)
                    assert data.shape == (32, 32, 32) and np.isfinite(data).all() and data.std() > 0
                    assert abs(float(mrc.voxel_size.x) - 3.0) < 1e-4
            for name in ("loss_curves.png", "latent_space.png"):
                _png_not_blank(fwd / name)
            assert not (fwd / "latent_space.star").exists()    # the final outputs are not there yet
        finally:
            proc.send_signal(signal.SIGCONT)
            proc.wait(timeout=600)
    assert proc.returncode == 0, log_path.read_text()[-3000:]
    text = log_path.read_text()
    assert "epoch 2/12 done: " in text and " elapsed, at most " in text
    assert text.count("Live maps and figures rewritten (every 2 epochs)") == 5      # epochs 2, 4, ..., 10; not 12
    final = (fwd / "report.html").read_text()
    assert "Training finished" in final and "refresh" not in final
    assert (fwd / "latent_space.star").is_file()
    _png_not_blank(fwd / "latent_space.png")


def test_live_every_is_checked(project):
    res = run_cli(*_args("DynaMight/job008", 2, "--live-every", "-1"), cwd=project)
    assert res.returncode == 1 and "--live-every -1 must be 0 (never) or a number of epochs" in res.stdout + res.stderr


def test_resume_after_sigkill_equals_uninterrupted(project, reference):
    job = project / "DynaMight" / "job004"
    rnd = random.Random(int(time.time()))
    target = rnd.randint(1, N_EPOCHS - 1)
    cmd = [sys.executable, "-m", "relion_dynamight.launcher", *_args("DynaMight/job004")]
    proc = subprocess.Popen(cmd, cwd=project, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not ckpt.epoch_path(job, target).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(rnd.random() * 0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not ckpt.final_path(job).exists(), "the run finished before it could be killed"
    res = run_cli(*_args("DynaMight/job004"), cwd=project)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Continuing from" in res.stdout
    _assert_same_final(reference, job)


def test_resume_skips_corrupt_checkpoint(project, reference):
    job = project / "DynaMight" / "job005"
    res = run_cli(*_args("DynaMight/job005", 3), cwd=project)
    assert res.returncode == 0, res.stderr[-2000:]
    ckpt.final_path(job).unlink()
    last = ckpt.epoch_path(job, 3)
    last.write_bytes(last.read_bytes()[:1000])  # truncated, as after a full disk
    res = run_cli(*_args("DynaMight/job005"), cwd=project)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "checkpoint_003.h5 is truncated or corrupt" in res.stdout
    assert "Continuing from" in res.stdout and "checkpoint_002.h5" in res.stdout
    _assert_same_final(reference, job)


def test_mpi_two_ranks_equal_one(project, reference, mpiexec):
    res = run_cli(*_args("DynaMight/job006"), cwd=project, mpi=[mpiexec, "-n", "2"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert (project / "DynaMight/job006/RELION_JOB_EXIT_SUCCESS").exists()
    _assert_same_final(reference, project / "DynaMight" / "job006")


def test_checkpoint_of_other_particles_refused(project, reference, tmp_path):
    other = tmp_path / "other"
    simulate_project(other, n_particles=120, box=32, pixel_size=3.0, snr=1.0, seed=4)
    res = run_cli(*_args("DynaMight/job007", 2, "--checkpoint-file", str(ckpt.final_path(reference))), cwd=other)
    assert res.returncode == 1
    assert "another particle set" in res.stderr and (other / "DynaMight/job007/RELION_JOB_EXIT_FAILURE").exists()


@pytest.mark.parametrize("extra, message", [
    (["--initial-threshold", "1e9"], "selects no voxel"),
    (["--gpu-id", "7"], "GPU"),
    (["--n-gaussians", "2"], "--n-gaussians"),
])
def test_bad_input(project, extra, message):
    args = _args("DynaMight/job008", 1)
    i = args.index("--pipeline-control")
    if extra[0] in args:
        j = args.index(extra[0])
        args[j + 1] = extra[1]
    else:
        args[i:i] = extra
    res = run_cli(*args, cwd=project)
    assert res.returncode == 1
    err = [ln for ln in res.stderr.splitlines() if ln.startswith("ERROR")]
    assert err and message in err[-1], res.stderr[-2000:]


def test_map_box_mismatch(project, tmp_path):
    from relion_dynamight.relion.mrc import write_map

    wrong = tmp_path / "wrong.mrc"
    write_map(wrong, np.zeros((24, 24, 24), np.float32), 3.0)
    args = _args("DynaMight/job009", 1)
    args[args.index("--initial-model") + 1] = str(wrong)
    res = run_cli(*args, cwd=project)
    assert res.returncode == 1 and "differs from the particle box 32" in res.stderr
