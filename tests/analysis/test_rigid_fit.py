"""Rigid-body reading of a flexible model (``explore-latent-space --rigid-body-masks``): weighted Kabsch, then a
constructed hinge whose moving slab turns rigidly by a known angle per particle."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import torch
from scipy.spatial.transform import Rotation

from explore_data import BOX, MAX_ANGLE, make_inputs, slab_masks
from relion_dynamight.analysis.rigid_fit import rigid_fit, weighted_kabsch
from relion_dynamight.errors import InputError
from relion_dynamight.jobs.explore import ExploreOptions, explore


def test_weighted_kabsch_recovers_rotation_and_shift_and_ignores_zero_weights() -> None:
    gen = torch.Generator().manual_seed(0)
    source = torch.randn(40, 3, generator=gen, dtype=torch.float64) * 5
    rot = torch.from_numpy(Rotation.random(4, random_state=1).as_matrix())
    shift = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    target = source[None] @ rot.transpose(-1, -2) + shift[:, None]
    weights = torch.ones(40, dtype=torch.float64)
    weights[30:] = 0.0
    target[:, 30:] += 100.0                           # points outside the body do not count
    got_rot, got_shift = weighted_kabsch(source, target, weights)
    torch.testing.assert_close(got_rot, rot)
    torch.testing.assert_close(got_shift, shift)
    assert torch.allclose(torch.linalg.det(got_rot), torch.ones(4, dtype=torch.float64))
    fit = rigid_fit(source, target, weights[None], torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64))
    assert float(fit.residual.max()) < 1e-9
    c = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)   # the same motion about the body's centre
    moved = (source - c) @ fit.rotation[:, 0].transpose(-1, -2) + c + fit.shift[:, 0][:, None]
    torch.testing.assert_close(moved[:, :30], target[:, :30])


def test_explore_reads_the_hinge_as_two_rigid_bodies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    inputs, _ = make_inputs(tmp_path, n=60)
    masks = slab_masks(tmp_path)
    res = explore(inputs, ExploreOptions(movie_pcs=0, rigid_body_masks=tuple(masks)))
    table = starfile.read(res.out_dir / "rigid_transforms.star", always_dict=True)["particles"]
    rows = np.flatnonzero(inputs.latent.half == 1)
    assert list(table["rlnImageName"]) == [inputs.latent.names[r] for r in rows]
    true_angle = inputs.latent.z[rows, 0].numpy() * MAX_ANGLE          # the hinge decoder: degrees about z
    np.testing.assert_allclose(table["dmBody2RotZ"], true_angle, atol=1e-3)
    np.testing.assert_allclose(table[["dmBody2RotX", "dmBody2RotY"]], 0.0, atol=1e-3)
    assert float(np.abs(table[[f"dmBody1Rot{a}" for a in "XYZ"]].to_numpy()).max()) < 1e-3   # the still slab
    assert float(table[["dmBody1Residual", "dmBody2Residual"]].to_numpy().max()) < 1e-3      # both move rigidly
    assert any(s.title == "Rigid bodies" for s in res.sections)
    empty = np.zeros((BOX, BOX, BOX), dtype=np.float32)
    empty[:2, :2, :2] = 1.0                                            # a corner without Gaussians
    with mrcfile.new(tmp_path / "corner.mrc") as mrc:
        mrc.set_data(empty)
    with pytest.raises(InputError, match="corner.mrc: fewer than 3 Gaussians"):
        explore(inputs, ExploreOptions(movie_pcs=0, rigid_body_masks=(tmp_path / "corner.mrc",)))
