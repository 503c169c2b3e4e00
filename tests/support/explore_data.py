"""A constructed ground truth for the latent-space analysis tests.

Two domains of Gaussians on a grid (box 32, 3 Å/px): the *fixed* domain (x < 0) never moves; the *moving*
domain (x > 0) rotates about the z axis through the origin (the hinge) by ``angle = scale · 20° · z[0]``.
Particles have a true hinge angle drawn from two modes (−15° and +15°); their latent is
``z = (angle / 20°, noise, noise, noise)``.  Poses and defocus are drawn independently of the latent.
The refinement STAR file and its images come from ``relion_project`` (undeformed consensus map) when
RELION is installed, else from a plain STAR file whose image names point to a stack written here.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile
import torch
from torch import Tensor, nn

from relion_dynamight.analysis.latent import DeformableModel
from relion_dynamight.jobs.explore import ExploreInputs, LatentTable

BOX, PIXEL, LATENT = 32, 3.0, 4
MAX_ANGLE = 20.0


class HingeDecoder(nn.Module):
    """Displacements of a rigid rotation about the z axis of the points with x > 0, angle ∝ z[:, 0]."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, positions: Tensor, z: Tensor) -> Tensor:
        angle = torch.deg2rad(z[:, 0] * MAX_ANGLE * self.scale)  # (B,)
        c, s = angle.cos()[:, None], angle.sin()[:, None]
        x, y = positions[:, 0][None], positions[:, 1][None]
        moved = torch.stack([c * x - s * y - x, s * x + c * y - y, torch.zeros_like(x * c)], dim=-1)
        moving = (positions[:, 0] > 0).to(positions.dtype)[None, :, None]
        return moved * moving


def gaussian_positions() -> Tensor:
    """Grid points (spacing 2 px) of two slabs: x in [-9, -1] (fixed) and [1, 9] (moving), |y|, |z| <= 4."""
    xs = [v for v in range(-9, 10, 2)]
    yz = range(-4, 5, 2)
    pts = [(x, y, z) for x in xs for y in yz for z in yz]
    return torch.tensor(pts, dtype=torch.float32)


def hinge_model(scale: float = 1.0) -> DeformableModel:
    pos = gaussian_positions()
    m = pos.shape[0]
    return DeformableModel(positions=pos, amplitudes=torch.ones(m), widths=torch.full((m,), 1.2), decoder=HingeDecoder(scale))


def true_angles(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mode = np.where(rng.random(n) < 0.5, -15.0, 15.0)
    return mode + rng.normal(0, 3.0, n)


def latents(angles: np.ndarray, seed: int = 1, noise: float = 0.15) -> Tensor:
    rng = np.random.default_rng(seed)
    z = rng.normal(0, noise, (len(angles), LATENT))
    z[:, 0] = angles / MAX_ANGLE + rng.normal(0, 0.03, len(angles))
    return torch.as_tensor(z, dtype=torch.float32)


def write_project(root: Path, n: int, seed: int = 0) -> Path:
    """Consensus map, refinement-like STAR file and images under ``root``; returns the STAR path."""
    from relion_dynamight.analysis.latent import render

    root.mkdir(parents=True, exist_ok=True)
    model = hinge_model()
    vol = render(model.positions, model.amplitudes, model.widths, BOX).numpy().astype(np.float32)
    with mrcfile.new(root / "consensus.mrc", overwrite=True) as mrc:
        mrc.set_data(vol)
        mrc.voxel_size = PIXEL
    rng = np.random.default_rng(seed + 10)
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnImagePixelSize": [PIXEL],
                           "rlnImageSize": [BOX], "rlnImageDimensionality": [2], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]})
    particles = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@Particles/images.mrcs" for i in range(n)],
        "rlnMicrographName": [f"mic{i % 7}.mrc" for i in range(n)],
        "rlnAngleRot": rng.uniform(-180, 180, n), "rlnAngleTilt": np.degrees(np.arccos(rng.uniform(-1, 1, n))),
        "rlnAnglePsi": rng.uniform(-180, 180, n), "rlnOriginXAngst": 0.0, "rlnOriginYAngst": 0.0,
        "rlnDefocusU": rng.uniform(8000, 25000, n), "rlnDefocusV": 0.0, "rlnDefocusAngle": rng.uniform(0, 180, n),
        "rlnOpticsGroup": 1, "rlnRandomSubset": 1 + (np.arange(n) % 2), "rlnClassNumber": 1,
    })
    particles["rlnDefocusV"] = particles["rlnDefocusU"] - 200.0
    star = root / "Refine3D" / "run_data.star"
    star.parent.mkdir(parents=True, exist_ok=True)
    (root / "Particles").mkdir(exist_ok=True)
    if shutil.which("relion_project"):
        starfile.write({"optics": optics, "particles": particles}, root / "angles.star")
        subprocess.run(["relion_project", "--i", "consensus.mrc", "--ang", "angles.star", "--o", "Particles/images"],
                       cwd=root, check=True, capture_output=True)
        starfile.write(starfile.read(root / "Particles" / "images.star"), star)
    else:
        with mrcfile.new(root / "Particles" / "images.mrcs", overwrite=True) as mrc:
            mrc.set_data(np.zeros((n, BOX, BOX), np.float32))
        starfile.write({"optics": optics, "particles": particles}, star)
    return star


def make_inputs(root: Path, n: int = 240, half_set: int = 1) -> tuple[ExploreInputs, np.ndarray]:
    """A job directory with a refinement STAR + constructed models; returns inputs and true angles."""
    from relion_dynamight.relion.star import load_particles

    star = write_project(root, n)
    table = load_particles(star)
    angles = true_angles(n)
    z = latents(angles)
    half = table.random_subset.astype(np.int64)
    validation = (np.arange(n) % 5) == 0
    latent = LatentTable(names=table.image_names, half=half, validation=validation, z=z)
    models = {1: hinge_model(1.0), 2: hinge_model(1.15)}
    z_other = latents(angles, seed=2, noise=0.15)

    def encode(h: int, rows: np.ndarray) -> Tensor:
        return z[rows] if h == 1 else z_other[rows]

    job = root / "DynaMight" / "job001"
    job.mkdir(parents=True, exist_ok=True)
    inputs = ExploreInputs(job_dir=Path("DynaMight/job001"), half_set=half_set, models=models, latent=latent,
                           table=table, box=BOX, pixel_size=PIXEL, encode=encode)
    return inputs, angles


JOB = "DynaMight/job002"


def make_trained_job(root: Path, n: int = 80) -> Path:
    from relion_dynamight.model.consensus import GaussianParams
    from relion_dynamight.relion.star import load_particles, write_particles
    from relion_dynamight.training import checkpoint as ckpt
    from relion_dynamight.training.config import default_config
    from relion_dynamight.training.half import HalfModel, gaussian_tree
    from relion_dynamight.training.halves import choose_validation, fingerprint

    star = write_project(root, n)
    table = load_particles(star)
    config = default_config(box=BOX, pixel_size=PIXEL, latent_dim=LATENT, batch_size=16, n_gaussians=0,
                            star_file=str(star.relative_to(root)))
    pos = gaussian_positions()
    initial = gaussian_tree(GaussianParams(pos, torch.tensor(0.0), torch.log(torch.tensor(1.2))))
    half = table.random_subset.astype(np.int8)
    validation = choose_validation(half, 0.2, 0)
    halves = {}
    torch.manual_seed(0)
    for h in (1, 2):
        train, val = np.flatnonzero((half == h) & ~validation), np.flatnonzero((half == h) & validation)
        model = HalfModel(h, config, initial, train, val, torch.device("cpu"))
        with torch.no_grad():
            model.decoder.net.out.weight.normal_(0, 0.5)
        halves[h] = model.state_tree()
    job = root / JOB
    state = {"epoch": 1, "config": config, "fingerprint": fingerprint(table.image_names), "split_half": half,
             "split_validation": validation, "initial": initial, "halves": halves}
    ckpt.save_checkpoint(ckpt.final_path(job), state)
    z = np.random.default_rng(3).normal(0, 1, (n, LATENT))
    extra = {"rlnRandomSubset": half.astype(np.int64), "dmValidation": validation.astype(np.int64),
             **{f"dmLatent{k + 1}": z[:, k] for k in range(LATENT)}}
    write_particles(table, job / "forward_deformations" / "latent_space.star", extra_columns=extra)
    return job


def slab_masks(root: Path, names: tuple[str, str] = ("slab1.mrc", "slab2.mrc")) -> list[Path]:
    """Two hard masks of the box: x < 0 px (the still slab of :class:`HingeDecoder`) and x >= 0 px (the turning
    one), written as MRC files ``root / names``."""
    paths = []
    for name, (lo, hi) in zip(names, ((0, BOX // 2), (BOX // 2, BOX))):
        mask = np.zeros((BOX, BOX, BOX), dtype=np.float32)
        mask[:, :, lo:hi] = 1.0
        paths.append(root / name)
        with mrcfile.new(paths[-1], overwrite=True) as mrc:
            mrc.set_data(mask)
            mrc.voxel_size = PIXEL
    return paths

