"""explore-latent-space from the command line on a job directory with a real training checkpoint.

The checkpoint is written with the trainer's own classes (training/half.HalfModel, checkpoint.save_checkpoint)
from untrained networks whose output layers are given random weights, so the decoders deform the model.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from relion_dynamight.relion.jobdir import EXIT_FAILURE, EXIT_SUCCESS, read_output_nodes

from runs import run_cli
from explore_data import BOX, JOB, PIXEL, gaussian_positions, make_trained_job, slab_masks  # noqa: F401

@pytest.fixture(autouse=True)
def restore_logging() -> None:
    """The command's setup_logging binds handlers to CliRunner's streams: put the root handlers back."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def invoke(*args: str) -> object:
    from relion_dynamight.cli import cli

    return CliRunner().invoke(cli, list(args))


def test_headless_in_process_without_display_or_napari(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_trained_job(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    result = invoke("explore-latent-space", JOB, "--half-set", "1", "--clusters", "3", "--movie-pcs", "1",
                    "--n-frames", "3", "--gpu-id", os.environ.get("EXPLORE_TEST_GPU_ID", "cpu"), "--pipeline-control", JOB + "/")
    assert result.exit_code == 0, result.output
    assert (tmp_path / JOB / EXIT_SUCCESS).exists()
    nodes = read_output_nodes(tmp_path / JOB)
    assert [Path(n).name for n, _ in nodes] == [f"half1_cluster0{k}.star" for k in (1, 2, 3)]
    assert all(n.startswith(JOB + "/subsets/") for n, _ in nodes)
    assert "napari" not in sys.modules and "PyQt5" not in sys.modules and "qtpy" not in sys.modules
    assert (tmp_path / JOB / "report.html").stat().st_size > 10_000
    result = invoke("explore-latent-space", JOB, "--half-set", "1", "--clusters", "1000", "--pipeline-control",
                    JOB + "/")
    assert result.exit_code == 1 and (tmp_path / JOB / EXIT_FAILURE).exists()
    assert "ERROR: --clusters 1000 is more than the 40 particles" in result.output


def test_cli_subprocess_half_set_0(tmp_path: Path) -> None:
    make_trained_job(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    out = run_cli("explore-latent-space", JOB, "--half-set", "0", "--pipeline-control", JOB + "/", cwd=tmp_path,
                  env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / JOB / EXIT_SUCCESS).exists()
    err = tmp_path / JOB / "explore" / "half0" / "errors" / "errors_per_gaussian.csv"
    assert err.is_file() and len(err.read_text().splitlines()) == 1 + len(gaussian_positions())
    assert "Deformation errors on 16 validation particles" in out.stdout


def test_no_checkpoint_says_what_to_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    job = Path("DynaMight") / "job009"
    job.mkdir(parents=True)
    result = invoke("explore-latent-space", str(job), "--half-set", "1", "--no-gui")
    assert result.exit_code == 1 and (job / EXIT_FAILURE).exists()
    assert "no training checkpoint" in result.output and "optimize-deformations" in result.output
    result = invoke("explore-latent-space", str(job), "--half-set", "5")
    assert result.exit_code == 1 and "--half-set 5: use 1 or 2" in result.output


def test_mask_file_restricts_the_motion_to_the_mask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--mask-file: Gaussians outside the mask do not move in any output, those inside move as without it."""
    import mrcfile

    make_trained_job(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DISPLAY", raising=False)
    mask = np.zeros((BOX, BOX, BOX), dtype=np.float32)
    mask[:, :, BOX // 2:] = 1.0                                   # x >= 0 px (index [z, y, x], centre N // 2)
    with mrcfile.new(tmp_path / "mask.mrc") as mrc:
        mrc.set_data(mask)
        mrc.voxel_size = PIXEL
    motion = {}
    for name, extra in (("plain", []), ("masked", ["--mask-file", "mask.mrc"])):
        result = invoke("explore-latent-space", JOB, "--half-set", "1", "--movie-pcs", "1", "--n-frames", "3",
                        "--gpu-id", "cpu", *extra, "--pipeline-control", JOB + "/")
        assert result.exit_code == 0, result.output
        motion[name] = np.loadtxt(tmp_path / JOB / "explore" / "half1" / "gaussian_motion.csv", delimiter=",",
                                  skiprows=1)
    x = motion["plain"][:, 1] / PIXEL
    assert np.array_equal(motion["plain"][:, :4], motion["masked"][:, :4])
    outside, inside = x <= -1, x >= 1
    assert outside.sum() == inside.sum() == 125
    assert motion["plain"][outside, 5].min() > 0.01                       # without the mask everything moves
    assert np.abs(motion["masked"][outside, 4:]).max() < 1e-6            # outside: nothing moves
    np.testing.assert_allclose(motion["masked"][inside, 4:], motion["plain"][inside, 4:], rtol=1e-4, atol=1e-6)
    mask_log = "deformations restricted to mask.mrc: 125 of 250 Gaussians inside"
    assert mask_log in result.output
    small = np.ones((16, 16, 16), dtype=np.float32)
    with mrcfile.new(tmp_path / "small.mrc") as mrc:
        mrc.set_data(small)
    result = invoke("explore-latent-space", JOB, "--half-set", "1", "--mask-file", "small.mrc",
                    "--pipeline-control", JOB + "/")
    assert result.exit_code == 1 and (tmp_path / JOB / EXIT_FAILURE).exists()
    assert "--mask-file small.mrc: box 16 differs from the particles' 32" in result.output


def test_rigid_body_masks_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--rigid-body-masks A,B: per-particle rigid fits in rigid_transforms.star; a mask of another box is refused
    before the analysis."""
    import mrcfile
    import starfile

    make_trained_job(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DISPLAY", raising=False)
    slab_masks(tmp_path, ("a.mrc", "b.mrc"))
    result = invoke("explore-latent-space", JOB, "--half-set", "1", "--movie-pcs", "0", "--gpu-id", "cpu",
                    "--rigid-body-masks", "a.mrc,b.mrc", "--pipeline-control", JOB + "/")
    assert result.exit_code == 0, result.output
    table = starfile.read(tmp_path / JOB / "explore" / "half1" / "rigid_transforms.star", always_dict=True)
    columns = set(table["particles"].columns)
    assert {"dmBody1Angle", "dmBody2ShiftZ", "dmBody2Residual"} <= columns
    with mrcfile.new(tmp_path / "small.mrc") as mrc:
        mrc.set_data(np.ones((16, 16, 16), dtype=np.float32))
    result = invoke("explore-latent-space", JOB, "--half-set", "1", "--rigid-body-masks", "a.mrc,small.mrc",
                    "--pipeline-control", JOB + "/")
    assert result.exit_code == 1 and "--rigid-body-masks small.mrc: box 16 differs" in result.output
