"""Test data for reconstruction tests and the benchmark: a phantom map, a particle STAR file, and
``relion_project --ctf`` projections of the phantom with our own Gaussian noise.

Not a test module (no ``test_`` prefix); imported by tests/imaging/test_backprojection.py,
tests/jobs/test_reconstruct.py and scripts/bench_reconstruct.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np


def phantom_map(box: int, seed: int = 0, n_blobs: int = 40) -> np.ndarray:
    """A smooth asymmetric density ``(box, box, box)`` float32: Gaussian blobs inside radius box/4."""
    rng = np.random.default_rng(seed)
    c = np.arange(box, dtype=np.float64) - box // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    vol = np.zeros((box,) * 3)
    scale = box / 64.0
    for _ in range(n_blobs):
        d = rng.normal(size=3)
        pos = d / np.linalg.norm(d) * rng.uniform(0, box / 4) * np.array([1.0, 0.8, 0.6])
        sigma = rng.uniform(1.2, 3.0) * scale
        amp = rng.uniform(0.5, 1.5)
        vol += amp * np.exp(-((x - pos[0]) ** 2 + (y - pos[1]) ** 2 + (z - pos[2]) ** 2) / (2 * sigma**2))
    return vol.astype(np.float32)


def write_map(path: Path, vol: np.ndarray, pixel: float) -> Path:
    import mrcfile

    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(vol.astype(np.float32))
        mrc.voxel_size = pixel
    return path


def particle_table(n: int, box: int, pixel: float, seed: int = 0) -> dict:
    """RELION 3.1 STAR tables: uniform random poses, shifts up to ±3 px, astigmatic CTFs with phase
    shift and B-factor, two optics groups (same pixel size), alternating ``rlnRandomSubset``."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    q = rng.normal(size=(n, 3))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    rot = np.degrees(np.arctan2(q[:, 1], q[:, 0]))
    tilt = np.degrees(np.arccos(np.clip(q[:, 2], -1, 1)))
    psi = rng.uniform(-180, 180, n)
    du = rng.uniform(8000, 20000, n)
    optics = pd.DataFrame({
        "rlnOpticsGroup": [1, 2], "rlnOpticsGroupName": ["opticsGroup1", "opticsGroup2"],
        "rlnAmplitudeContrast": [0.1, 0.07], "rlnSphericalAberration": [2.7, 2.7], "rlnVoltage": [300.0, 300.0],
        "rlnImagePixelSize": [pixel, pixel], "rlnImageSize": [box, box], "rlnImageDimensionality": [2, 2],
    })
    parts = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@dummy.mrcs" for i in range(n)],
        "rlnAngleRot": rot, "rlnAngleTilt": tilt, "rlnAnglePsi": psi,
        "rlnOriginXAngst": rng.uniform(-3, 3, n) * pixel, "rlnOriginYAngst": rng.uniform(-3, 3, n) * pixel,
        "rlnDefocusU": du, "rlnDefocusV": du - rng.uniform(0, 2000, n), "rlnDefocusAngle": rng.uniform(-90, 90, n),
        "rlnPhaseShift": rng.uniform(0, 20, n), "rlnCtfBfactor": rng.uniform(0, 50, n),
        "rlnOpticsGroup": (np.arange(n) % 2) + 1, "rlnRandomSubset": (np.arange(n) % 2) + 1,
    })
    return {"optics": optics, "particles": parts}


def make_projections(workdir: Path, box: int = 64, n: int = 300, pixel: float = 3.0, noise: float = 0.0,
                     seed: int = 0, ctf: bool = True) -> dict[str, Path]:
    """Write ``truth.mrc``, ``angles.star``, ``proj.mrcs``/``proj.star`` (relion_project) and, when
    ``noise > 0``, ``noisy.mrcs``/``noisy.star`` (our seeded white noise of ``noise`` times the
    standard deviation of the clean images).  Paths are relative
    to ``workdir``, which is the RELION project directory.  Returns the paths by name."""
    import mrcfile
    import starfile

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    truth = phantom_map(box, seed)
    write_map(workdir / "truth.mrc", truth, pixel)
    starfile.write(particle_table(n, box, pixel, seed), workdir / "angles.star", overwrite=True)
    cmd = ["relion_project", "--i", "truth.mrc", "--ang", "angles.star", "--o", "proj"]
    if ctf:
        cmd.append("--ctf")
    subprocess.run(cmd, cwd=workdir, check=True, capture_output=True, text=True)
    out = {"truth": workdir / "truth.mrc", "star": workdir / "proj.star", "stack": workdir / "proj.mrcs"}
    if noise > 0:
        with mrcfile.open(workdir / "proj.mrcs", permissive=True) as mrc:
            clean = np.asarray(mrc.data, dtype=np.float32)
        rng = np.random.default_rng(seed + 1000)
        noisy = clean + rng.normal(0, noise * clean.std(), clean.shape).astype(np.float32)
        with mrcfile.new(workdir / "noisy.mrcs", overwrite=True) as mrc:
            mrc.set_data(noisy)
            mrc.set_image_stack()
            mrc.voxel_size = pixel
        blocks = starfile.read(workdir / "proj.star", always_dict=True)
        parts = blocks["particles"]
        parts["rlnImageName"] = [str(s).replace("proj.mrcs", "noisy.mrcs") for s in parts["rlnImageName"]]
        starfile.write(blocks, workdir / "noisy.star", overwrite=True)
        out.update(noisy_star=workdir / "noisy.star", noisy_stack=workdir / "noisy.mrcs", clean_std=float(clean.std()))
    return out


def relion_reconstruct(workdir: Path, star: str, out: str, ctf: bool = True, extra: list[str] | None = None) -> Path:
    cmd = ["relion_reconstruct", "--i", star, "--o", out, *(["--ctf"] if ctf else []), *(extra or [])]
    subprocess.run(cmd, cwd=workdir, check=True, capture_output=True, text=True)
    return Path(workdir) / out


def read_mrc(path: Path) -> np.ndarray:
    import mrcfile

    with mrcfile.open(path, permissive=True) as mrc:
        return np.asarray(mrc.data, dtype=np.float32).copy()
