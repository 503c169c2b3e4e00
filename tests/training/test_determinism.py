"""Determinism (issue 7 item 5): with the same ``--seed``, CPU runs are reproducible bit for bit.

Two uninterrupted runs of optimize-deformations -> optimize-inverse-deformations ->
deformable-backprojection in separate job directories of one project (run side by side, as concurrent
processes) must give byte-identical checkpoint arrays (both halves: networks, Adam state, Gaussians, RNG
states, histories), identical ``latent_space.star`` and identical output maps (data and header; mrcfile's
creation-time label aside).
Where GPU runs are not reproducible: /work/notes/J_determinism.md (to go into the README).
"""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest

from relion_dynamight.relion.mrc import read_map
from relion_dynamight.training.checkpoint import final_path, load_checkpoint
import fault_support as fs


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    project, ref_job, _ = fs.reference_pipeline(tmp_path_factory, also=("DynaMight/job300",))  # side by side
    return project / ref_job, project / "DynaMight/job300"


def test_training_checkpoints_bit_identical(two_runs):
    a, b = two_runs
    diffs = fs.forward_differences(a, b)
    assert not diffs, diffs[:10]
    # not vacuous: the networks were trained (weights moved away from the common initialisation)
    state = load_checkpoint(final_path(a))
    assert state["epoch"] == fs.TRAIN_EPOCHS
    positions = state["halves"][1]["gaussians"]["positions"]
    assert float((positions - state["initial"]["positions"]).abs().max()) > 0


def test_inverse_and_maps_bit_identical(two_runs):
    a, b = two_runs
    assert not fs.inverse_differences(a, b)
    assert not fs.map_differences(a, b)
    for name in fs.MAP_NAMES:  # the whole file but mrcfile's label (it holds the creation time)
        with mrcfile.open(a / "backprojection" / name) as x, mrcfile.open(b / "backprojection" / name) as y:
            hx, hy = x.header.copy(), y.header.copy()
            hx["label"], hy["label"] = b"", b""
            assert hx.tobytes() == hy.tobytes() and x.data.tobytes() == y.data.tobytes(), name
    m, _ = read_map(a / "backprojection" / "map_half1.mrc")
    assert np.isfinite(m).all() and float(np.abs(m).max()) > 0
