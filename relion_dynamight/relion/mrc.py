"""MRC maps as RELION writes them (relion-facts §6): float32, cell = pixel × size, origin 0.

Maps are ``numpy`` arrays indexed ``[z, y, x]`` with the real-space centre at index ``N // 2``.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mrcfile
import numpy as np

from relion_dynamight.errors import InputError
from relion_dynamight.relion.jobdir import atomic_output


def read_map(path: str | Path) -> tuple[np.ndarray, float]:
    """Read a cubic 3D map → ``(float32 array [z, y, x], pixel size Å)``; clear errors on bad files."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: map file not found; check the path")
    try:
        with mrcfile.open(path, permissive=True, mode="r") as mrc:
            if mrc.data is None:
                raise InputError(f"{path}: not a readable MRC file (no data); give a valid .mrc map")
            data = np.asarray(mrc.data, dtype=np.float32).copy()
            nx = int(mrc.header.nx)
            cella = float(mrc.header.cella.x)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{path}: not a readable MRC file ({exc}); give a valid .mrc map") from None
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise InputError(f"{path}: map has shape {data.shape}; a cubic 3D map is required")
    if not np.isfinite(data).all():
        raise InputError(f"{path}: map contains NaN or Inf values; repair or regenerate the map")
    pixel = cella / nx if nx and cella > 0 else 1.0
    return data, pixel


@contextmanager
def _naming_os_errors(path: Path) -> Iterator[None]:
    """Give operating-system errors without a file name (e.g. disk full while flushing) the output path."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


def write_map(path: str | Path, data: np.ndarray, pixel_size: float) -> Path:
    """Write a float32 map (or image stack) atomically with RELION's header conventions."""
    path = Path(path)
    with _naming_os_errors(path), atomic_output(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(data, dtype=np.float32))
            mrc.voxel_size = float(pixel_size)
            mrc.header.origin = (0.0, 0.0, 0.0)
            mrc.header.ispg = 0 if path.suffix == ".mrcs" or data.ndim == 2 else 1
            mrc.update_header_stats()
    return path


def write_stack(path: str | Path, images: np.ndarray, pixel_size: float, float16: bool = False) -> Path:
    """Write an image stack ``(n, N, N)`` as a ``.mrcs`` (mode 2, or mode 12 with ``float16``)."""
    path = Path(path)
    with _naming_os_errors(path), atomic_output(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(images, dtype=np.float16 if float16 else np.float32))
            mrc.set_image_stack()
            mrc.voxel_size = float(pixel_size)
            mrc.update_header_stats()
    return path


def read_soft_mask(path: str | Path, box: int, option: str) -> np.ndarray:
    """A RELION soft mask for ``option`` (e.g. ``--mask-file``): a ``(box, box, box)`` map ``[z, y, x]`` with values in
    [0, 1] (float32, clipped to the range); clear errors for another box, values outside [0, 1] or an empty mask."""
    values = read_map(path)[0]
    if values.shape != (box,) * 3:
        raise InputError(f"{option} {path}: box {values.shape[0]} differs from the particles' {box}; give a mask "
                         "of the consensus map's box (e.g. from relion_mask_create)")
    if not np.isfinite(values).all() or values.min() < -1e-3 or values.max() > 1.0 + 1e-3:
        raise InputError(f"{option} {path}: values must lie in [0, 1] (found {values.min():g} to "
                         f"{values.max():g}); give a RELION mask")
    if float(values.max()) <= 0.0:
        raise InputError(f"{option} {path}: the mask is empty; give the region to restrict the deformations to")
    return np.clip(values, 0.0, 1.0).astype(np.float32)

