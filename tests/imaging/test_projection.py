"""project_map against RELION's own relion_project (relion-facts §7-8): Euler, origin and CTF conventions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from relion_dynamight.imaging.ctf import ctf_2d
from relion_dynamight.imaging.geometry import euler_to_matrix
from relion_dynamight.imaging.projection import gridding_correct, project_map, project_map_real
from projection_data import (BOX, PIXEL, _blob_map, _ctf_params, _pose_table, _poses,  # noqa: F401
                             correlations, relion_project)


def test_project_map_matches_relion_project_with_ctf(tmp_path: Path, relion: None) -> None:
    vol = _blob_map(BOX)
    optics, particles = _pose_table(10)
    ref = torch.from_numpy(relion_project(tmp_path, vol, optics, particles, ctf=True))
    rotations, shifts = _poses(particles)
    ctf = ctf_2d(_ctf_params(optics, particles), BOX, dtype=torch.float64)
    ours = project_map_real(vol, rotations, shifts, ctf)
    cc = correlations(ours, ref)
    print("per-image CC vs relion_project --ctf:", [round(float(c), 6) for c in cc])
    assert float(cc.min()) >= 0.999
    # Same scale as RELION as well (not only the same shape).
    ratio = (ours.norm(dim=(-2, -1)) / ref.norm(dim=(-2, -1)))
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=2e-3)
    # Power of the test for the CTF: the opposite defocus-angle sign fails it (relion-facts §8).
    params = _ctf_params(optics, particles)
    params.defocus_angle = -params.defocus_angle
    wrong = correlations(project_map_real(vol, rotations, shifts, ctf_2d(params, BOX, dtype=torch.float64)), ref)
    assert float(wrong.min()) < 0.99


def test_wrong_conventions_are_detected(tmp_path: Path, relion: None) -> None:
    """The comparison has power: the transposed matrix or the opposite shift sign fail it."""
    vol = _blob_map(BOX)
    optics, particles = _pose_table(6, seed=11)
    ref = torch.from_numpy(relion_project(tmp_path, vol, optics, particles, ctf=False))
    rotations, shifts = _poses(particles)
    good = correlations(project_map_real(vol, rotations, shifts), ref)[1:]
    transposed = correlations(project_map_real(vol, rotations.transpose(1, 2), shifts), ref)[1:]
    flipped = correlations(project_map_real(vol, rotations, -shifts), ref)[1:]
    assert float(good.min()) >= 0.999
    assert float(transposed.min()) < 0.99
    assert float(flipped.min()) < 0.99


def test_project_map_z_projection_is_line_integral() -> None:
    """Without rotation, the projection is Σ_z of the band-limited map, centred at N//2.

    Exactly so for the gridding-corrected map (slice samples fall on grid points, so nothing undoes the
    correction, in RELION too); within ~2 % for the map itself.
    """
    box = 32
    c = torch.arange(box, dtype=torch.float64) - box // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    vol = torch.exp(-((x - 3) ** 2 + (y + 2) ** 2 + (z - 1) ** 2) / (2 * 2.5**2))
    img = project_map_real(vol, torch.eye(3, dtype=torch.float64)[None])[0]
    expected = vol.sum(0)
    assert torch.allclose(img, gridding_correct(vol).sum(0), atol=1e-3 * float(expected.max()))
    assert torch.allclose(img, expected, atol=0.03 * float(expected.max()))
    # Shift by origin (+2, -1) pixels moves the image by (-2, +1).
    origin = torch.tensor([[2.0, -1.0]], dtype=torch.float64)
    moved = project_map_real(vol, torch.eye(3, dtype=torch.float64)[None], origin)[0]
    assert torch.allclose(moved, torch.roll(img, shifts=(1, -2), dims=(0, 1)), atol=1e-3 * float(expected.max()))


def test_project_map_batch_and_dtype() -> None:
    vol = _blob_map(32).float()
    rot = euler_to_matrix(torch.tensor([10.0, 50.0]), torch.tensor([20.0, 90.0]), torch.tensor([0.0, 30.0]))
    spec = project_map(vol, rot)
    assert spec.shape == (2, 32, 17) and spec.dtype == torch.complex64
    single = project_map(vol, rot[1:])
    assert torch.allclose(spec[1:], single, atol=1e-6)


@pytest.mark.parametrize("pad", [1, 2])
def test_project_map_pad_option(pad: int) -> None:
    vol = _blob_map(32)
    rot = euler_to_matrix(torch.tensor([33.0]), torch.tensor([71.0]), torch.tensor([-12.0])).double()
    a = project_map_real(vol, rot, pad=pad)
    b = project_map_real(vol, rot, pad=3)
    assert float(correlations(a, b)[0]) > 0.995
