"""project_map against RELION's own relion_project (relion-facts §7-8): Euler, origin and CTF conventions."""

from __future__ import annotations

import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from relion_dynamight.imaging.ctf import CtfParams, ctf_2d
from relion_dynamight.imaging.geometry import euler_to_matrix
from relion_dynamight.imaging.projection import gridding_correct, project_map, project_map_real
from relion_dynamight.relion.mrc import write_map

BOX = 48
PIXEL = 1.6


def _blob_map(box: int, seed: int = 3) -> torch.Tensor:
    """An asymmetric map: a dozen anisotropic Gaussian blobs inside the inscribed sphere."""
    g = torch.Generator().manual_seed(seed)
    c = torch.arange(box, dtype=torch.float64) - box // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    vol = torch.zeros(box, box, box, dtype=torch.float64)
    for _ in range(12):
        p = (torch.rand(3, generator=g, dtype=torch.float64) - 0.5) * box * 0.5
        s = 1.0 + 2.0 * torch.rand(3, generator=g, dtype=torch.float64)
        vol += torch.exp(-((x - p[0]) ** 2 / s[0] ** 2 + (y - p[1]) ** 2 / s[1] ** 2 + (z - p[2]) ** 2 / s[2] ** 2) / 2)
    return vol


def _pose_table(n: int, seed: int = 5) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two optics groups, strongly astigmatic CTFs with phase shift, B-factor, scale and shifts."""
    rng = np.random.default_rng(seed)
    optics = pd.DataFrame({
        "rlnOpticsGroupName": ["opticsGroup1", "opticsGroup2"], "rlnOpticsGroup": [1, 2],
        "rlnVoltage": [300.0, 200.0], "rlnSphericalAberration": [2.7, 1.4], "rlnAmplitudeContrast": [0.1, 0.07],
        "rlnImagePixelSize": [PIXEL, PIXEL], "rlnImageSize": [BOX, BOX], "rlnImageDimensionality": [2, 2],
    })
    du = rng.uniform(8000, 25000, n)
    particles = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@dummy.mrcs" for i in range(n)],
        "rlnAngleRot": rng.uniform(-180, 180, n), "rlnAngleTilt": rng.uniform(0, 180, n),
        "rlnAnglePsi": rng.uniform(-180, 180, n),
        "rlnOriginXAngst": rng.uniform(-6, 6, n), "rlnOriginYAngst": rng.uniform(-6, 6, n),
        "rlnDefocusU": du, "rlnDefocusV": du - rng.uniform(2000, 6000, n), "rlnDefocusAngle": rng.uniform(-180, 180, n),
        "rlnPhaseShift": rng.uniform(0, 90, n), "rlnCtfBfactor": rng.uniform(0, 150, n),
        "rlnCtfScalefactor": rng.uniform(0.6, 1.0, n), "rlnOpticsGroup": np.arange(n) % 2 + 1,
    })
    particles.loc[0, ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]] = 0.0  # the plain z projection
    return optics, particles


def _ctf_params(optics: pd.DataFrame, particles: pd.DataFrame) -> CtfParams:
    rows = particles.merge(optics, on="rlnOpticsGroup", how="left")

    def col(name: str) -> torch.Tensor:
        return torch.tensor(rows[name].to_numpy(), dtype=torch.float64)

    return CtfParams(col("rlnDefocusU"), col("rlnDefocusV"), col("rlnDefocusAngle"), col("rlnVoltage"),
                     col("rlnSphericalAberration"), col("rlnAmplitudeContrast"), col("rlnPhaseShift"),
                     col("rlnCtfBfactor"), col("rlnCtfScalefactor"), col("rlnImagePixelSize"))


def _poses(particles: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
    ang = [torch.tensor(particles[c].to_numpy(), dtype=torch.float64)
           for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")]
    shifts = torch.tensor(particles[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(), dtype=torch.float64) / PIXEL
    return euler_to_matrix(*ang), shifts


def relion_project(tmp: Path, volume: torch.Tensor, optics: pd.DataFrame, particles: pd.DataFrame,
                   ctf: bool = True) -> np.ndarray:
    """Run RELION's relion_project on ``volume`` with the poses/CTFs of the table → images ``(B, N, N)``."""
    write_map(tmp / "map.mrc", volume.numpy(), PIXEL)
    starfile.write({"optics": optics, "particles": particles}, tmp / "in.star", overwrite=True)
    cmd = ["relion_project", "--i", "map.mrc", "--ang", "in.star", "--o", "out"] + (["--ctf"] if ctf else [])
    subprocess.run(cmd, cwd=tmp, check=True, capture_output=True, timeout=120)
    return mrcfile.read(tmp / "out.mrcs").astype(np.float64)


def correlations(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation per image of ``(B, N, N)`` stacks."""
    a = a - a.mean(dim=(-2, -1), keepdim=True)
    b = b - b.mean(dim=(-2, -1), keepdim=True)
    return (a * b).sum(dim=(-2, -1)) / (a.norm(dim=(-2, -1)) * b.norm(dim=(-2, -1)))


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
