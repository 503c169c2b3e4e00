"""Rigid-body mode (``optimize-deformations --rigid-body-masks``): the geometry, then a two-body simulation whose
rigid motion is known (the hinge: one body still, one turning about the hinge axis) learned through the CLI and
carried through the inverse and the deformed backprojection."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch
from scipy.ndimage import gaussian_filter
from scipy.spatial.transform import Rotation
from scipy.stats import spearmanr

from relion_dynamight.jobs.simulate import load_truth, simulate_project
from relion_dynamight.model.rigid import RigidBodyDecoder, body_masks, rotation_matrices
from relion_dynamight.training import checkpoint as ckpt
from runs import run_cli

BOX, PIXEL = 32, 3.0


def test_rotation_matrices_agree_with_scipy_and_are_rotations() -> None:
    omega = torch.tensor(np.random.default_rng(0).normal(0, 1.2, (20, 3)))
    omega[0] = 0.0
    omega[1] = torch.tensor([1e-6, -2e-6, 0.5e-6])
    rot = rotation_matrices(omega)
    np.testing.assert_allclose(rot.numpy(), Rotation.from_rotvec(omega.numpy()).as_matrix(), atol=1e-12)
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(rot @ rot.transpose(-1, -2), eye.expand_as(rot), atol=1e-12)
    omega.requires_grad_(True)
    rotation_matrices(omega).sum().backward()
    assert torch.isfinite(omega.grad).all()                      # differentiable at ω = 0 too


def _slab_masks(box: int = BOX) -> list[torch.Tensor]:
    """Two bodies: x < 0 and x >= 0 (hard halves of the box, index [z, y, x])."""
    left = torch.zeros(box, box, box)
    left[:, :, : box // 2] = 1.0
    return [left, 1.0 - left]


def test_decoder_moves_each_body_rigidly_and_nothing_else() -> None:
    masks, centres = body_masks(_slab_masks(), BOX)
    np.testing.assert_allclose(centres[0].numpy(), [-8.5, -0.5, -0.5], atol=1e-5)   # centroids, (x, y, z) px
    dec = RigidBodyDecoder(latent_dim=2, box=BOX, n_bodies=2)
    dec.set_bodies(masks, centres)
    omega, shift = torch.tensor([0.0, 0.0, 0.3]), torch.tensor([1.0, -2.0, 0.5])
    with torch.no_grad():   # body 2 turns by 0.3 rad about z through its centre and shifts; body 1 stays
        dec.out.bias[6:9], dec.out.bias[9:12] = omega, shift
    points = torch.tensor([[-6.0, 2.0, 1.0], [-3.0, -4.0, 0.0], [5.0, 1.0, -2.0], [9.0, -3.0, 4.0]])
    with torch.no_grad():
        disp = dec(points, torch.zeros(3, 2))
    assert disp.shape == (3, 4, 3)
    assert float(disp[:, :2].abs().max()) == 0.0
    rot = rotation_matrices(omega[None].double())[0].float()
    expected = (points[2:] - centres[1]) @ rot.T + centres[1] + shift - points[2:]
    torch.testing.assert_close(disp[0, 2:], expected, atol=1e-5, rtol=1e-5)
    # distances within a body are kept (rigid), whatever the latent code
    with torch.no_grad():
        moved = points[2:] + dec(points, torch.randn(1, 2))[0, 2:]
    assert abs(float((moved[0] - moved[1]).norm() - (points[2] - points[3]).norm())) < 1e-4
    # points given per particle (the inverse's jittered points) get the same field
    with torch.no_grad():
        per_particle = dec.displace(points.expand(3, -1, -1), torch.zeros(3, 2), torch.arange(4))
    torch.testing.assert_close(per_particle, disp)


def _body_masks_of_phantom(root: Path, phantom) -> list[Path]:  # noqa: ANN001
    """Soft masks of the phantom's still and turning bodies (within 4 px of their Gaussians, σ = 1 px edge)."""
    axis = np.arange(BOX) - BOX // 2
    zz, yy, xx = np.meshgrid(axis, axis, axis, indexing="ij")
    grid = np.stack([xx, yy, zz], -1).reshape(-1, 3).astype(np.float32)
    pos = phantom.positions.float().numpy()
    dist2 = ((grid[:, None, :] - pos[None]) ** 2).sum(-1)
    near, close = dist2.argmin(1), np.sqrt(dist2.min(1)) < 4.0
    paths = []
    for k, body in enumerate((~phantom.moving.numpy(), phantom.moving.numpy())):
        values = gaussian_filter((close & body[near]).reshape((BOX,) * 3).astype(np.float32), 1.0)
        path = root / f"body{k + 1}.mrc"
        with mrcfile.new(path) as mrc:
            mrc.set_data(np.clip(values, 0.0, 1.0).astype(np.float32))
            mrc.voxel_size = PIXEL
        paths.append(path)
    return paths


def _train_args(job: str, *extra: str) -> list[str]:
    return ["optimize-deformations", "--refinement-star-file", "Refine3D/job001/run_data.star", "--output-directory",
            f"{job}/", "--initial-model", "Refine3D/job001/run_class001.mrc", "--n-gaussians", "300",
            "--n-threads", "1", "--gpu-id", "cpu", *extra, "--pipeline-control", f"{job}/"]


@pytest.fixture(scope="module")
def hinge(tmp_path_factory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("rigid")
    simulate_project(root, n_particles=1000, box=BOX, pixel_size=PIXEL, snr=1.0, motion="hinge", seed=0)
    phantom, _ = load_truth(root)
    _body_masks_of_phantom(root, phantom)
    return root, phantom


def test_bad_rigid_options_fail_before_any_work(hinge) -> None:  # noqa: ANN001
    root, _ = hinge
    small = root / "small.mrc"
    with mrcfile.new(small, overwrite=True) as mrc:
        mrc.set_data(np.ones((16, 16, 16), dtype=np.float32))
    res = run_cli(*_train_args("DynaMight/job010", "--rigid-body-masks", "body1.mrc,small.mrc"), cwd=root)
    assert res.returncode == 1
    assert "--rigid-body-masks small.mrc: box 16 differs from the particles' 32" in res.stdout + res.stderr
    res = run_cli(*_train_args("DynaMight/job011", "--rigid-body-masks", "body1.mrc,body2.mrc", "--mask-file",
                               "body2.mrc"), cwd=root)
    assert res.returncode == 1
    assert "--rigid-body-masks and --mask-file exclude each other" in res.stdout + res.stderr
    for job in ("job010", "job011"):
        assert (root / "DynaMight" / job / "RELION_JOB_EXIT_FAILURE").exists()
        assert not ckpt.list_checkpoints(root / "DynaMight" / job)


@pytest.mark.slow
def test_two_body_motion_is_recovered_and_goes_through_inverse_and_backprojection(hinge) -> None:  # noqa: ANN001
    root, phantom = hinge
    job = "DynaMight/job002"
    res = run_cli(*_train_args(job, "--n-epochs", "25", "--rigid-body-masks", "body1.mrc,body2.mrc"), cwd=root)
    assert res.returncode == 0, res.stdout[-3000:]
    table = starfile.read(root / job / "forward_deformations" / "rigid_transforms.star", always_dict=True)["particles"]
    truth = pd.read_csv(root / "truth" / "particles.csv").set_index("rlnImageName")
    angle = truth.loc[table["rlnImageName"], "hinge_angle"].to_numpy()            # degrees about the hinge axis
    axis = phantom.domains[0].axis.numpy()
    rot = {k: table[[f"dmBody{k}Rot{a}" for a in "XYZ"]].to_numpy() for k in (1, 2)}   # axis-angle, degrees
    turned = rot[2] @ axis
    # the turning body: its rotation about the true axis follows the true angle (measured: ρ 0.86, slope 0.63)
    assert spearmanr(turned, angle)[0] > 0.7
    assert np.polyfit(angle, turned, 1)[0] > 0.5
    # the still body hardly turns (measured: RMS 2.9° against 10.1° for the turning body)
    rms = {k: float(np.sqrt((rot[k] ** 2).sum(1).mean())) for k in (1, 2)}
    assert rms[1] < 0.45 * rms[2]
    # positions of the turning body's Gaussians from the recovered transforms against the true ones
    state = ckpt.load_checkpoint(ckpt.final_path(root / job))
    centre = state["initial"]["body_centres"][1].double().numpy()
    shift = table[[f"dmBody2Shift{a}" for a in "XYZ"]].to_numpy() / PIXEL
    ref = phantom.positions.double().numpy()[phantom.moving.numpy()]
    moved = np.einsum("nij,mj->nmi", Rotation.from_rotvec(np.radians(rot[2])).as_matrix(), ref - centre)
    moved += centre + shift[:, None]
    true = phantom.true_positions(torch.from_numpy(angle.copy())).numpy()[:, phantom.moving.numpy()]
    error = np.sqrt(((moved - true) ** 2).sum(-1).mean())
    baseline = np.sqrt(((ref[None] - true) ** 2).sum(-1).mean())
    assert error < 0.6 * baseline, (error, baseline)
    # the same inverse and backprojection path as the flexible decoder
    res = run_cli("optimize-inverse-deformations", f"{job}/", "--n-epochs", "3", "--pipeline-control", f"{job}/",
                  cwd=root)
    assert res.returncode == 0, res.stdout[-3000:]
    res = run_cli("deformable-backprojection", f"{job}/", "--pipeline-control", f"{job}/", cwd=root)
    assert res.returncode == 0, res.stdout[-3000:]
    for h in (1, 2):
        with mrcfile.open(root / job / "backprojection" / f"map_half{h}.mrc") as mrc:
            assert mrc.data.shape == (BOX,) * 3 and np.isfinite(mrc.data).all()
