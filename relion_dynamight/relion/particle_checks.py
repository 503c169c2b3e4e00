"""Physical checks of a particle STAR file, done once when it is loaded (before any work).

Every numeric column that feeds the physics is checked for NaN/Inf and for its physical range; a bad value
raises :class:`InputError` naming the file, the particle (row number and image name) or optics group, the
column and the value.  Consistency checks that would silently change the science are here too: the same image
twice (in both half sets it makes the half maps share noise and inflates their FSC), optics groups with
different pixel sizes (the box would sample different frequencies), and disagreeing duplicate origin columns
(pixels and Å).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import pandas as pd

from relion_dynamight.errors import InputError

log = logging.getLogger("relion_dynamight")


class ParticleTable(Protocol):
    """What the checks read of a :class:`relion_dynamight.relion.star.ParticleTable` (star.py imports this module)."""

    path: Path
    particles: pd.DataFrame
    optics: pd.DataFrame | None

    @property
    def pixel_sizes(self) -> np.ndarray: ...

    @property
    def random_subset(self) -> np.ndarray | None: ...

    def has_column(self, name: str) -> bool: ...

    def column(self, name: str, default: float | None = None, indices: Sequence[int] | None = None) -> np.ndarray: ...


def numeric_column(series: pd.Series, path: Path, name: str) -> np.ndarray:
    """A STAR column as float64; :class:`InputError` naming the file, column and row of a non-number."""
    try:
        return series.to_numpy(dtype=np.float64)
    except (ValueError, TypeError):
        bad = np.flatnonzero(pd.to_numeric(series, errors="coerce").isna().to_numpy())
        row = int(bad[0]) if bad.size else 0
        raise InputError(f"{path}: column _{name} has the non-numeric value {series.iloc[row]!r} in row "
                         f"{row + 1}; repair the STAR file") from None

#: column → (lowest, highest allowed value, unit and what to do); None = no bound.  Values outside are errors.
PHYSICAL_RANGES: dict[str, tuple[float | None, float | None, str]] = {
    "rlnAngleRot": (None, None, "degrees"),
    "rlnAngleTilt": (None, None, "degrees"),
    "rlnAnglePsi": (None, None, "degrees"),
    "rlnOriginXAngst": (None, None, "Å"),
    "rlnOriginYAngst": (None, None, "Å"),
    "rlnOriginX": (None, None, "pixels"),
    "rlnOriginY": (None, None, "pixels"),
    "rlnDefocusU": (-1.0e5, 1.0e6, "Å (RELION: positive underfocus, e.g. 5,000–40,000)"),
    "rlnDefocusV": (-1.0e5, 1.0e6, "Å (RELION: positive underfocus, e.g. 5,000–40,000)"),
    "rlnDefocusAngle": (-3600.0, 3600.0, "degrees"),
    "rlnVoltage": (1.0, 5000.0, "kV (e.g. 300)"),
    "rlnSphericalAberration": (-100.0, 100.0, "mm (e.g. 2.7; 0 with a corrector)"),
    "rlnAmplitudeContrast": (0.0, 0.99, "fraction (e.g. 0.1)"),
    "rlnPhaseShift": (-3600.0, 3600.0, "degrees"),
    "rlnCtfBfactor": (-500.0, 2000.0, "Å²"),
    "rlnCtfScalefactor": (1.0e-6, 1.0e3, "(e.g. 1)"),
    "rlnImagePixelSize": (1.0e-3, 1.0e3, "Å/pixel"),
    "rlnDetectorPixelSize": (1.0e-3, 1.0e4, "µm"),
    "rlnMagnification": (1.0, 1.0e8, ""),
}

#: Relative difference of optics groups' pixel sizes treated as equal (RELION writes 6 decimals).
PIXEL_TOLERANCE = 1e-3
#: Å by which ``rlnOriginX`` × pixel size and ``rlnOriginXAngst`` may differ (STAR files carry 6 decimals).
ORIGIN_TOLERANCE = 0.01


def check_particles(table: ParticleTable) -> None:
    """All checks of this module; raises :class:`InputError` at the first problem."""
    for column, (low, high, unit) in PHYSICAL_RANGES.items():
        _check_column(table, column, low, high, unit)
    _check_origins(table)
    _check_duplicates(table)


def _where(table: ParticleTable, column: str, row: int) -> str:
    if column in table.particles:
        name = table.particles["rlnImageName"].iloc[row] if "rlnImageName" in table.particles else "?"
        return f"particle {row + 1} ({name})"
    return f"optics group row {row + 1}"


def _check_column(table: ParticleTable, column: str, low: float | None, high: float | None, unit: str) -> None:

    if column in table.particles:
        values = numeric_column(table.particles[column], table.path, column)
    elif table.optics is not None and column in table.optics:
        values = numeric_column(table.optics[column], table.path, column)
    else:
        return
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise InputError(f"{table.path}: _{column} is {values[bad[0]]} for {_where(table, column, int(bad[0]))} "
                         f"({bad.size} such value(s)); repair or remove those particles")
    outside = np.flatnonzero(((values < low) if low is not None else False) | ((values > high) if high is not None
                                                                                else False))
    if outside.size:
        row = int(outside[0])
        raise InputError(f"{table.path}: _{column} = {values[row]:g} for {_where(table, column, row)} is outside "
                         f"[{low:g}, {high:g}] {unit}; check the value and the column's units")


def _check_origins(table: ParticleTable) -> None:
    """``rlnOriginX/Y`` (pixels) and ``rlnOriginX/YAngst`` both present: they must agree."""
    for axis in ("X", "Y"):
        px, angst = f"rlnOrigin{axis}", f"rlnOrigin{axis}Angst"
        if not (table.has_column(px) and table.has_column(angst)):
            continue
        diff = np.abs(table.column(px) * table.pixel_sizes - table.column(angst))
        bad = np.flatnonzero(diff > ORIGIN_TOLERANCE)
        if bad.size:
            row = int(bad[0])
            raise InputError(f"{table.path}: _{px} ({table.column(px)[row]:g} px) and _{angst} "
                             f"({table.column(angst)[row]:g} Å) disagree for {_where(table, px, row)}; "
                             f"keep one of the two columns")


def require_one_pixel_size(table: ParticleTable) -> float:
    """The particles' one pixel size (Å); :class:`InputError` when optics groups differ.  Called by the tasks
    that process images: one box with different pixel sizes samples different spatial frequencies, which
    neither the reconstruction nor the training rescales (reading such a file is fine)."""
    sizes = table.pixel_sizes
    lo, hi = float(sizes.min()), float(sizes.max())
    if hi - lo > PIXEL_TOLERANCE * lo:
        groups = sorted({float(s) for s in np.round(sizes, 6)})
        raise InputError(f"{table.path}: optics groups have different pixel sizes {groups} Å (_rlnImagePixelSize) "
                         "with one box; re-extract or rescale the particles to one pixel size "
                         "(e.g. relion_preprocess --rescale) or process the groups separately")
    return float(sizes[0])


def _check_duplicates(table: ParticleTable) -> None:
    names = table.particles["rlnImageName"].astype(str)
    canonical = names.map(_canonical_name)
    dup = canonical.duplicated(keep=False).to_numpy()
    if not dup.any():
        return
    first = canonical[dup].iloc[0]
    rows = np.flatnonzero((canonical == first).to_numpy())
    subset = table.random_subset
    halves = "" if subset is None else f" (_rlnRandomSubset {', '.join(str(int(subset[r])) for r in rows)})"
    both = subset is not None and len(set(int(subset[r]) for r in rows)) > 1
    why = ("; an image in both half sets makes the half maps share noise and inflates their FSC" if both else "")
    raise InputError(f"{table.path}: image {names.iloc[rows[0]]} appears {len(rows)} times (particles "
                     f"{', '.join(str(r + 1) for r in rows)}){halves}{why}; remove the duplicates "
                     f"(e.g. relion_star_handler --remove_duplicates 1)")


def _canonical_name(name: str) -> str:
    """``000012@Stacks/a.mrcs`` and ``12@Stacks/a.mrcs`` are the same image."""
    index, sep, stack = name.partition("@")
    if not sep:
        return name
    try:
        return f"{int(index)}@{stack}"
    except ValueError:
        return name


def finite_option(name: str, value: float, low: float | None = None, high: float | None = None,
                  low_inclusive: bool = True) -> float:
    """A numeric command-line option: finite and inside its range, else one-line :class:`InputError`."""
    if not math.isfinite(value):
        raise InputError(f"{name} {value}: must be a finite number")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        raise InputError(f"{name} {value:g}: must be {'>=' if low_inclusive else '>'} {low:g}")
    if high is not None and value > high:
        raise InputError(f"{name} {value:g}: must be <= {high:g}")
    return value
