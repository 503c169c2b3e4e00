"""Writers of small real particle STAR files and MRC stacks for the data-layer tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile

from relion_dynamight.relion.mrc import write_stack


@dataclass
class Project:
    root: Path            # RELION project directory (image names are relative to it)
    star: Path            # particle STAR file
    images: np.ndarray    # (n, N, N) float32 pixel values as stored (float16-rounded when float16)
    particles: pd.DataFrame
    optics: pd.DataFrame | None


def write_mode_stack(path: Path, images: np.ndarray, dtype: np.dtype, pixel: float = 1.0) -> None:
    """Write a stack with an integer (or any mrcfile-supported) dtype."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(images, dtype=dtype))
        mrc.set_image_stack()
        mrc.voxel_size = pixel


def random_particles(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "rlnAngleRot": rng.uniform(-180, 180, n), "rlnAngleTilt": rng.uniform(0, 180, n),
        "rlnAnglePsi": rng.uniform(-180, 180, n),
        "rlnDefocusU": rng.uniform(8000, 20000, n), "rlnDefocusV": rng.uniform(8000, 20000, n),
        "rlnDefocusAngle": rng.uniform(-90, 90, n), "rlnPhaseShift": rng.uniform(0, 30, n),
        "rlnCtfBfactor": rng.uniform(0, 50, n), "rlnCtfScalefactor": rng.uniform(0.8, 1.0, n),
    }


def make_project(root: Path, n: int = 40, box: int = 32, version: str = "3.1", n_stacks: int = 2,
                 pixel_sizes: tuple[float, ...] = (1.1, 1.7), float16: bool = False, dtype=None,
                 padded: bool = True, plain: bool = False, seed: int = 0,
                 star_rel: str = "Refine3D/job002/run_data.star") -> Project:
    """A project with ``n`` particles in ``n_stacks`` stacks under ``Extract/job001/Movies``.

    RELION 3.1 files get one optics group per pixel size (particles alternate between groups); 3.0
    files get no optics table, ``rlnOriginX/Y`` in pixels and ``rlnDetectorPixelSize``/``rlnMagnification``.
    ``plain`` writes one single-image ``.mrc`` per particle and plain names.
    """
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, box, box)).astype(np.float32)
    if dtype is not None:
        images = (images * 30).astype(dtype).astype(np.float32)
    elif float16:
        images = images.astype(np.float16).astype(np.float32)
    names = []
    chunks = np.array_split(np.arange(n), n_stacks)
    for s, rows in enumerate(chunks):
        if plain:
            for r in rows:
                rel = f"Extract/job001/Movies/p{r:04d}.mrc"
                _write(root / rel, images[r:r + 1], dtype, float16)
                names.append(rel)
            continue
        rel = f"Extract/job001/Movies/mic{s:03d}.mrcs"
        _write(root / rel, images[rows], dtype, float16)
        names += [(f"{j + 1:06d}@{rel}" if padded else f"{j + 1}@{rel}") for j in range(len(rows))]
    cols = random_particles(n, rng)
    particles = pd.DataFrame({"rlnImageName": names, "rlnMicrographName": [f"{i % n_stacks:03d}" for i in range(n)],
                              "rlnCoordinateX": rng.uniform(0, 4000, n).round(1), **cols})
    particles["rlnRandomSubset"] = 1 + (np.arange(n) // 3) % 2  # mixes both optics groups
    groups = 1 + np.arange(n) % len(pixel_sizes)
    if version == "3.0":
        particles["rlnOriginX"] = rng.uniform(-3, 3, n)
        particles["rlnOriginY"] = rng.uniform(-3, 3, n)
        particles["rlnVoltage"] = 300.0
        particles["rlnSphericalAberration"] = 2.7
        particles["rlnAmplitudeContrast"] = 0.1
        particles["rlnMagnification"] = 10000.0
        particles["rlnDetectorPixelSize"] = np.asarray(pixel_sizes)[groups - 1]
        optics = None
        blocks = {"": particles}
    else:
        g = np.arange(1, len(pixel_sizes) + 1)
        optics = pd.DataFrame({
            "rlnOpticsGroupName": [f"opticsGroup{i}" for i in g], "rlnOpticsGroup": g,
            "rlnMicrographOriginalPixelSize": np.asarray(pixel_sizes) / 2,
            "rlnVoltage": 300.0 - 100.0 * (g - 1), "rlnSphericalAberration": 2.7 - 0.7 * (g - 1),
            "rlnAmplitudeContrast": 0.1 - 0.03 * (g - 1), "rlnImagePixelSize": list(pixel_sizes),
            "rlnImageSize": box, "rlnImageDimensionality": 2,
        })
        particles["rlnOpticsGroup"] = groups
        pix = np.asarray(pixel_sizes)[groups - 1]
        particles["rlnOriginXAngst"] = rng.uniform(-3, 3, n) * pix
        particles["rlnOriginYAngst"] = rng.uniform(-3, 3, n) * pix
        blocks = {"optics": optics, "particles": particles}
    star = root / star_rel
    star.parent.mkdir(parents=True, exist_ok=True)
    starfile.write(blocks, star, float_format="%.6f")
    return Project(root=root, star=star, images=images, particles=particles, optics=optics)


def _write(path: Path, images: np.ndarray, dtype, float16: bool) -> None:
    if dtype is not None:
        write_mode_stack(path, images, dtype)
    elif path.suffix == ".mrc":
        path.parent.mkdir(parents=True, exist_ok=True)
        with mrcfile.new(path, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(images[0], dtype=np.float16 if float16 else np.float32))
    else:
        write_stack(path, images, 1.0, float16=float16)


def rewrite_star(star: Path, particles: pd.DataFrame, optics: pd.DataFrame | None) -> None:
    blocks = {"particles": particles} if optics is None else {"optics": optics, "particles": particles}
    if optics is None:
        blocks = {"": particles}
    starfile.write(blocks, star, float_format="%.6f")
