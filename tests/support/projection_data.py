"""Poses, CTFs and maps shared by the projection tests, and RELION's relion_project run on them."""

from __future__ import annotations
import subprocess
from pathlib import Path
import mrcfile
import numpy as np
import pandas as pd
import starfile
import torch
from relion_dynamight.imaging.ctf import CtfParams
from relion_dynamight.imaging.geometry import euler_to_matrix
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
