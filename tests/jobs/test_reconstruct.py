"""``relion_dynamight reconstruct`` against ``relion_reconstruct``, under MPI, and its job protocol."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import torch

from backprojection_data import make_projections, read_mrc, relion_reconstruct
from runs import relion_available, run_cli
from relion_dynamight.imaging.fourier import fsc

BOX = 48


def _cc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


@pytest.fixture(scope="module")
def noisy(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """400 relion_project --ctf particles of a phantom with white noise (std = clean std), and
    relion_reconstruct --ctf of them; plus our CLI run with --halves under --pipeline-control."""
    if not relion_available():
        pytest.skip("RELION 3.1.3 binaries not found (install with: apt-get install -y relion)")
    work = tmp_path_factory.mktemp("recon")
    out = make_projections(work, box=BOX, n=400, noise=1.0, seed=7)
    relion_reconstruct(work, "noisy.star", "relion.mrc")
    run = run_cli("reconstruct", "--i", "noisy.star", "--o", "Ours/job001/map.mrc", "--ctf", "--halves",
                  "--batch-size", "150", "--pipeline-control", "Ours/job001/", cwd=work)
    return {"work": work, "run": run, **out}


def test_matches_relion_reconstruct_on_noisy_particles(noisy: dict) -> None:
    assert noisy["run"].returncode == 0, noisy["run"].stderr
    work = noisy["work"]
    ours = read_mrc(work / "Ours/job001/map.mrc")
    rel = read_mrc(work / "relion.mrc")
    truth = read_mrc(noisy["truth"])
    with mrcfile.open(work / "Ours/job001/map.mrc") as mrc:
        assert mrc.data.dtype == np.float32 and abs(float(mrc.voxel_size.x) - 3.0) < 1e-4
    f_pair = fsc(torch.from_numpy(ours), torch.from_numpy(rel)).numpy()
    f_ours = fsc(torch.from_numpy(ours), torch.from_numpy(truth)).numpy()
    f_rel = fsc(torch.from_numpy(rel), torch.from_numpy(truth)).numpy()
    limit = int(round(2 / 3 * BOX / 2))
    print(f"\nmin FSC(ours, relion) up to shell {limit}: {f_pair[1:limit + 1].min():.4f}")
    print("FSC ours-truth  ", np.round(f_ours[::3], 3))
    print("FSC relion-truth", np.round(f_rel[::3], 3))
    print(f"CC vs truth: ours {_cc(ours, truth):.4f}, relion {_cc(rel, truth):.4f}; CC ours-relion {_cc(ours, rel):.4f}")
    assert f_pair[1:limit + 1].min() >= 0.95
    # equally good against the truth, shell by shell, where there is signal
    signal = f_rel[1:limit + 1] > 0.143
    assert signal.sum() >= 5
    assert np.abs(f_ours[1:limit + 1] - f_rel[1:limit + 1])[signal].max() < 0.03
    assert abs(_cc(ours, truth) - _cc(rel, truth)) < 0.02


def test_halves_fsc_outputs_and_exit_file(noisy: dict) -> None:
    job = noisy["work"] / "Ours/job001"
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists() and not (job / "RELION_JOB_EXIT_FAILURE").exists()
    for name in ("map_half1.mrc", "map_half2.mrc", "map_fsc.png"):
        assert (job / name).stat().st_size > 0
    table = starfile.read(job / "map_fsc.star", always_dict=True)["fsc"]
    assert {"rlnSpectralIndex", "rlnResolution", "rlnFourierShellCorrelation"} <= set(table.columns)
    assert len(table) == BOX // 2 + 1 and table["rlnFourierShellCorrelation"].iloc[0] == 1.0
    fsc_curve = table["rlnFourierShellCorrelation"].to_numpy()
    assert fsc_curve[2] > 0.9 and fsc_curve[-3:].mean() < 0.5
    nodes = (job / "RELION_OUTPUT_NODES.star").read_text()
    assert "Ours/job001/map.mrc DensityMap.mrc" in nodes and "map_half1.mrc DensityMap.mrc.relion.halfmap" in nodes
    # half 1 alone equals relion_reconstruct --subset 1 as closely as the full maps do
    relion_reconstruct(noisy["work"], "noisy.star", "relion_half1.mrc", extra=["--subset", "1"])
    f = fsc(torch.from_numpy(read_mrc(job / "map_half1.mrc")),
            torch.from_numpy(read_mrc(noisy["work"] / "relion_half1.mrc"))).numpy()
    assert f[1:int(round(BOX / 3)) + 1].min() >= 0.95


def test_mpi_two_ranks_equal_one(noisy: dict, mpiexec: str) -> None:
    work = noisy["work"]
    runs = {k: run_cli("reconstruct", "--i", "noisy.star", "--o", f"mpi{k}.mrc", "--ctf", "--batch-size", "64",
                       cwd=work, mpi=[mpiexec, "-n", str(k)]) for k in (1, 2)}
    for k, run in runs.items():
        assert run.returncode == 0, f"-n {k}: {run.stderr}"
    one, two = read_mrc(work / "mpi1.mrc"), read_mrc(work / "mpi2.mrc")
    ref = read_mrc(work / "Ours/job001/map.mrc")
    print(f"\nmax |n2 - n1| / max|n1| = {np.abs(two - one).max() / np.abs(one).max():.2e}")
    assert np.abs(two - one).max() <= 1e-4 * np.abs(one).max()
    assert np.abs(one - ref).max() <= 1e-4 * np.abs(ref).max()


def _fails(run, job: Path, words: list[str]) -> None:
    assert run.returncode != 0
    assert (job / "RELION_JOB_EXIT_FAILURE").exists() and not (job / "RELION_JOB_EXIT_SUCCESS").exists()
    errors = [line for line in run.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, run.stderr
    for word in words:
        assert word in errors[0], errors[0]


def test_bad_input_fails_with_one_line_error(noisy: dict) -> None:
    work = noisy["work"]
    run = run_cli("reconstruct", "--i", "noisy.star", "--o", "Bad/job1/x.mrc", "--subset", "3",
                  "--pipeline-control", "Bad/job1/", cwd=work)
    _fails(run, work / "Bad/job1", ["--subset", "3"])
    # a half set without particles
    blocks = starfile.read(noisy["noisy_star"], always_dict=True)
    blocks["particles"]["rlnRandomSubset"] = 1
    starfile.write(blocks, work / "onehalf.star", overwrite=True)
    for extra, job in ((["--subset", "2"], "Bad/job2"), (["--halves"], "Bad/job3")):
        run = run_cli("reconstruct", "--i", "onehalf.star", "--o", f"{job}/x.mrc", *extra,
                      "--pipeline-control", f"{job}/", cwd=work)
        _fails(run, work / job, ["onehalf.star", "empty"])
    # outputs that would overwrite an input: nothing is written over it
    for target, job, word in (("noisy.star", "Bad/job4", "STAR"), ("noisy.mrcs", "Bad/job5", "stack")):
        before = (work / target).read_bytes()
        run = run_cli("reconstruct", "--i", "noisy.star", "--o", target, "--pipeline-control", f"{job}/", cwd=work)
        _fails(run, work / job, [target, "overwrite", word])
        assert (work / target).read_bytes() == before
