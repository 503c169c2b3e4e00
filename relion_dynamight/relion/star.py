"""Particle STAR files of RELION 3.0 and 3.1/4/5 (relion-facts §5), read with ``starfile``.

A RELION 3.1+ file has a ``data_optics`` table (one row per optics group: pixel size, voltage, Cs,
amplitude contrast, image size, ...) and a ``data_particles`` table whose ``rlnOpticsGroup`` column
(1-based) points into it. A RELION 3.0 file has a single particle table with everything per row and
origins ``rlnOriginX/Y`` in pixels (3.1+ uses ``rlnOriginXAngst/YAngst`` in Å).

:class:`ParticleTable` keeps the tables untouched (every column, input order) and derives per-particle
arrays from them; :func:`write_particles` writes them back, optionally a row subset plus new columns.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import starfile
from starfile.writer import StarWriter
import torch

from relion_dynamight.errors import InputError
from relion_dynamight.imaging.ctf import CtfParams
from relion_dynamight.relion.particle_checks import check_particles, numeric_column

log = logging.getLogger("relion_dynamight")

#: Columns whose values are names: never parse them as numbers (zero-padded names would change).
STRING_COLUMNS = [
    "rlnImageName", "rlnMicrographName", "rlnOpticsGroupName", "rlnImageOriginalName", "rlnCtfImage",
    "rlnReconstructImageName", "rlnGroupName", "rlnMicrographMovieName", "rlnOriginalParticleName",
]
REQUIRED_COLUMNS = ("rlnImageName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnDefocusU")

#: CtfParams field -> (STAR column, default or None when the column is required).
CTF_COLUMNS: dict[str, tuple[str, float | None]] = {
    "defocus_u": ("rlnDefocusU", None),
    "defocus_angle": ("rlnDefocusAngle", 0.0),
    "voltage": ("rlnVoltage", None),
    "cs": ("rlnSphericalAberration", 0.0),
    "amplitude_contrast": ("rlnAmplitudeContrast", 0.0),
    "phase_shift": ("rlnPhaseShift", 0.0),
    "bfactor": ("rlnCtfBfactor", 0.0),
    "scale": ("rlnCtfScalefactor", 1.0),
}

STAR_VERSION_LINE = "# version 30001"


def read_star(path: str | Path) -> dict[str, pd.DataFrame]:
    """Read every data block of a STAR file → ``{block name without 'data_': DataFrame}``.

    Key-value blocks become one-row frames. Missing, unreadable, empty or malformed files raise
    :class:`InputError` naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: STAR file not found; check the path")
    if not path.is_file():
        raise InputError(f"{path}: is not a file; give a STAR file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
        blocks = _parse_star(path)
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: STAR file is unreadable ({reason}); check the file") from None
    if not head.strip():
        raise InputError(f"{path}: STAR file is empty; give a particle STAR file")
    if not blocks:
        raise InputError(f"{path}: no data_ blocks found, not a STAR file; give a particle STAR file")
    frames = {name: _as_frame(block) for name, block in blocks.items()}
    for name, frame in frames.items():
        dup = frame.columns[frame.columns.duplicated()]
        if len(dup):
            raise InputError(f"{path}: label _{dup[0]} appears twice (duplicate column) in data_{name}; "
                             "remove one of them")
    return frames


def _parse_star(path: Path) -> dict:
    """``starfile.read``; when that fails on a file with comment lines (e.g. a comment among the loop
    labels, which RELION ignores) or on a file that is not UTF-8 (Latin-1 names written by older tools,
    read byte for byte as Latin-1, with a warning), parse a cleaned copy (in the system's temporary directory)."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:   # (starfile would silently return no tables)
        if b"\x00" in raw[:65536]:
            raise InputError(f"{path}: STAR file is binary, not text (a NUL byte at the start); give a particle "
                             "STAR file") from None
        log.warning("WARNING: %s is not UTF-8 (byte 0x%02x at offset %d); reading it as Latin-1", path,
                    raw[exc.start], exc.start)
        return _parse_lines(raw.decode("latin-1").splitlines(keepends=True), drop_comments=False)
    del raw
    try:
        return starfile.read(path, always_dict=True, parse_as_string=STRING_COLUMNS)
    except (ValueError, pd.errors.ParserError):
        with open(path, encoding="utf-8") as fh:
            lines = fh.readlines()
        if not any(line.lstrip().startswith("#") for line in lines):
            raise
        return _parse_lines(lines, drop_comments=True)


def _parse_lines(lines: list[str], drop_comments: bool) -> dict:
    kept = [line for line in lines if not (drop_comments and line.lstrip().startswith("#"))]
    fd, tmp = tempfile.mkstemp(suffix=".star")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.writelines(kept)
        try:
            return starfile.read(tmp, always_dict=True, parse_as_string=STRING_COLUMNS)
        except (ValueError, pd.errors.ParserError):
            if drop_comments:
                raise
            return _parse_lines(kept, drop_comments=True)
    finally:
        os.unlink(tmp)


def _as_frame(block: pd.DataFrame | dict) -> pd.DataFrame:
    if isinstance(block, pd.DataFrame):
        return block
    return pd.DataFrame({k: [v] for k, v in dict(block).items()})


@dataclass
class ParticleTable:
    """A particle STAR file: the raw tables plus per-particle arrays derived from them.

    ``particles`` keeps every original column in input order; ``optics`` is ``None`` for RELION 3.0
    files. Row ``i`` of every derived array belongs to row ``i`` of ``particles``.
    """

    particles: pd.DataFrame
    optics: pd.DataFrame | None
    path: Path
    version: str
    #: Å/pixel used when a RELION 3.0 file has no pixel-size column (explicit user value).
    pixel_size_override: float | None = None
    #: Name of the particle block (without ``data_``), kept for writing.
    particles_block: str = "particles"
    #: Other data blocks of the file (e.g. ``general``), kept for writing.
    other_blocks: dict[str, pd.DataFrame] = field(default_factory=dict)
    _optics_rows: np.ndarray | None = field(default=None, repr=False)
    _pixel_sizes: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.particles)

    # -- per-particle lookup -------------------------------------------------------------------
    def _optics_row_index(self) -> np.ndarray:
        """Row number in ``optics`` of each particle's optics group, ``(n,)`` (cached)."""
        if self._optics_rows is None:
            assert self.optics is not None, "only STAR files with an optics table have optics rows"
            groups = numeric_column(self.optics["rlnOpticsGroup"], self.path, "rlnOpticsGroup").astype(np.int64)
            if "rlnOpticsGroup" in self.particles:
                pg = numeric_column(self.particles["rlnOpticsGroup"], self.path, "rlnOpticsGroup").astype(np.int64)
            else:
                pg = np.full(len(self.particles), groups[0], dtype=np.int64)
            sorter = np.argsort(groups, kind="stable")
            pos = np.clip(np.searchsorted(groups[sorter], pg), 0, len(groups) - 1)
            rows = sorter[pos]
            unknown = np.flatnonzero(groups[rows] != pg)
            if unknown.size:
                raise InputError(f"{self.path}: particles use optics group {pg[unknown[0]]} which data_optics "
                                 "does not define; fix _rlnOpticsGroup")
            self._optics_rows = rows
        return self._optics_rows

    def has_column(self, name: str) -> bool:
        """Whether ``name`` is a particle column or an optics column."""
        return name in self.particles or (self.optics is not None and name in self.optics)

    def column(self, name: str, default: float | None = None, indices: Sequence[int] | None = None) -> np.ndarray:
        """Per-particle float64 values of ``name``: particle row, else optics row, else ``default``."""
        rows = slice(None) if indices is None else np.asarray(indices, dtype=np.int64)
        if name in self.particles:
            return numeric_column(self.particles[name], self.path, name)[rows]
        if self.optics is not None and name in self.optics:
            return numeric_column(self.optics[name], self.path, name)[self._optics_row_index()[rows]]
        if default is None:
            raise InputError(f"{self.path}: column _{name} is missing (particles and optics tables); "
                             "add it to the STAR file")
        n = len(self.particles) if indices is None else len(indices)
        return np.full(n, default, dtype=np.float64)

    # -- derived arrays ------------------------------------------------------------------------
    @property
    def image_names(self) -> list[str]:
        return [str(v) for v in self.particles["rlnImageName"].tolist()]

    def optics_image_size(self) -> int | None:
        """``rlnImageSize`` of the optics table (error when groups differ); ``None`` when absent."""
        if self.optics is None or "rlnImageSize" not in self.optics:
            return None
        sizes = sorted({int(s) for s in self.optics["rlnImageSize"].to_numpy()})
        if len(sizes) != 1:
            raise InputError(f"{self.path}: optics groups have different image sizes {sizes} (_rlnImageSize); "
                             "re-extract the particles with one box size")
        return sizes[0]

    @property
    def pixel_sizes(self) -> np.ndarray:
        """Å/pixel of each particle ``(n,)`` from its optics group (3.0: its own row). Cached: treat the
        tables as read-only."""
        if self._pixel_sizes is None:
            sizes = self._pixel_sizes_or_none()
            if sizes is None:
                where = "optics table" if self.optics is not None else "particle table"
                raise InputError(f"{self.path}: no pixel size: the {where} lacks _rlnImagePixelSize "
                                 "(or _rlnDetectorPixelSize and _rlnMagnification); add it or give the pixel size")
            if not (np.isfinite(sizes).all() and (sizes > 0).all()):
                raise InputError(f"{self.path}: pixel sizes must be positive numbers, found {np.unique(sizes)[:5]}")
            self._pixel_sizes = sizes
        return self._pixel_sizes

    def _pixel_sizes_or_none(self) -> np.ndarray | None:
        if self.has_column("rlnImagePixelSize"):
            return self.column("rlnImagePixelSize")
        if self.has_column("rlnDetectorPixelSize") and self.has_column("rlnMagnification"):
            return self.column("rlnDetectorPixelSize") * 1e4 / self.column("rlnMagnification")
        if self.pixel_size_override is not None:
            return np.full(len(self), float(self.pixel_size_override))
        return None

    @property
    def angles_deg(self) -> np.ndarray:
        """``(n, 3)`` float64 Euler angles rot, tilt, psi in degrees."""
        return np.stack([self.column(c) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")], axis=1)

    @property
    def origins_px(self) -> np.ndarray:
        """``(n, 2)`` float64 ``+origin`` (x, y) in pixels of each particle's own pixel size (0 when absent)."""
        if self.has_column("rlnOriginXAngst") or self.has_column("rlnOriginYAngst"):
            pixel = self.pixel_sizes
            return np.stack([self.column("rlnOriginXAngst", 0.0) / pixel,
                             self.column("rlnOriginYAngst", 0.0) / pixel], axis=1)
        return np.stack([self.column("rlnOriginX", 0.0), self.column("rlnOriginY", 0.0)], axis=1)

    @property
    def random_subset(self) -> np.ndarray | None:
        """``(n,)`` int64 half-set numbers 1/2 from ``rlnRandomSubset``; ``None`` when absent."""
        if "rlnRandomSubset" not in self.particles:
            return None
        values = numeric_column(self.particles["rlnRandomSubset"], self.path, "rlnRandomSubset")
        bad = np.flatnonzero((values != 1) & (values != 2))
        if bad.size:
            row = int(bad[0])
            raise InputError(f"{self.path}: _rlnRandomSubset must be 1 or 2, found {values[row]:g} for particle "
                             f"{row + 1} ({self.particles['rlnImageName'].iloc[row]}); fix or remove the column")
        return values.astype(np.int64)

    @property
    def ctf_premultiplied(self) -> np.ndarray:
        """``(n,)`` bool: images are already multiplied by their CTF (``rlnCtfDataAreCtfPremultiplied``)."""
        return self.column("rlnCtfDataAreCtfPremultiplied", 0.0) != 0

    def ctf_params(self, indices: Sequence[int] | None = None) -> CtfParams:
        """CTF parameters of the particles ``indices`` (all when ``None``) as float32 ``(B,)`` tensors."""
        values = {name: self.column(col, default, indices) for name, (col, default) in CTF_COLUMNS.items()}
        values["defocus_v"] = (self.column("rlnDefocusV", None, indices) if self.has_column("rlnDefocusV")
                               else values["defocus_u"].copy())
        pixel = self.pixel_sizes
        values["pixel_size"] = pixel if indices is None else pixel[np.asarray(indices, dtype=np.int64)]
        return CtfParams(**{k: torch.tensor(np.array(v, dtype=np.float32)) for k, v in values.items()})


# -- loading ---------------------------------------------------------------------------------------
def load_particles(path: str | Path, pixel_size: float | None = None) -> ParticleTable:
    """Read and validate a particle STAR file (RELION 3.0 or 3.1+).

    ``pixel_size`` (Å) is used only for RELION 3.0 files that carry no pixel-size column.
    Raises :class:`InputError` naming the file and the missing table, column or bad value.
    """
    path = Path(path)
    blocks = read_star(path)
    name, particles, optics = _pick_tables(path, blocks)
    version = "3.0" if optics is None else "3.1"
    others = {k: v for k, v in blocks.items() if k not in (name, "optics")}
    table = ParticleTable(particles=particles, optics=optics, path=path, version=version,
                          pixel_size_override=pixel_size, particles_block=name, other_blocks=others)
    _validate(table)
    return table


def _pick_tables(path: Path, blocks: dict[str, pd.DataFrame]) -> tuple[str, pd.DataFrame, pd.DataFrame | None]:
    optics = blocks.get("optics")
    if "particles" in blocks:
        return "particles", blocks["particles"], optics
    if optics is not None:
        raise InputError(f"{path}: has data_optics but no data_particles table; give a particle STAR file "
                         "(e.g. Refine3D/jobNNN/run_data.star)")
    candidates = [k for k, v in blocks.items() if "rlnImageName" in v]
    if len(candidates) != 1:
        raise InputError(f"{path}: no data_particles table (blocks: {', '.join('data_' + k for k in blocks)}); "
                         "give a particle STAR file")
    return candidates[0], blocks[candidates[0]], None


def _validate(table: ParticleTable) -> None:
    path, particles, optics = table.path, table.particles, table.optics
    if len(particles) == 0:
        raise InputError(f"{path}: the particle table is empty; give a STAR file with particles")
    for col in REQUIRED_COLUMNS:
        if col not in particles and not (col == "rlnDefocusU" and optics is not None and col in optics):
            raise InputError(f"{path}: required column _{col} is missing from the particle table")
    if optics is not None:
        _validate_optics(table)
    for col in REQUIRED_COLUMNS[1:]:
        source = table.particles if col in particles or optics is None else optics
        values = pd.to_numeric(source[col], errors="coerce")
        bad = np.flatnonzero(~np.isfinite(values.to_numpy(dtype=np.float64)))
        if bad.size:
            row = int(bad[0])
            raw = source[col].iloc[row]
            where = (f"particle {row + 1} ({particles['rlnImageName'].iloc[row]})" if col in particles
                     else f"optics group row {row + 1}")
            raise InputError(f"{path}: _{col} is {raw!r} for {where} ({bad.size} such value(s)), not a finite "
                             "number; repair or remove those particles")
    table.pixel_sizes  # noqa: B018 - raises InputError when no pixel size can be found
    table.optics_image_size()
    table.random_subset  # noqa: B018 - raises InputError for values other than 1 and 2
    check_particles(table)


def _validate_optics(table: ParticleTable) -> None:
    path, optics, particles = table.path, table.optics, table.particles
    assert optics is not None
    if len(optics) == 0 or "rlnOpticsGroup" not in optics:
        raise InputError(f"{path}: data_optics has no _rlnOpticsGroup rows; repair the optics table")
    if "rlnOpticsGroup" not in particles and len(optics) > 1:
        raise InputError(f"{path}: column _rlnOpticsGroup is missing from data_particles but there are "
                         f"{len(optics)} optics groups; add the column")
    table._optics_row_index()  # raises InputError for groups that data_optics does not define


# -- writing ---------------------------------------------------------------------------------------
def write_particles(table: ParticleTable, path: str | Path, rows: Sequence[int] | np.ndarray | None = None,
                    extra_columns: dict[str, np.ndarray] | None = None) -> Path:
    """Write ``table`` (optionally only ``rows``, plus ``extra_columns``) as a RELION STAR file.

    Every input column and the optics table are kept; the file starts with ``# version 30001`` so that
    RELION 3.1+ reads it (RELION 3.0 tables are written as 3.0 files, without it). ``extra_columns`` maps
    column names (``rln`` prefix recommended) to arrays with one value per written row (or per input row,
    then subset with ``rows``). Written atomically; refuses to overwrite the input STAR file.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: output is a directory; give a STAR file name")
    if _same_file(path, table.path):
        raise InputError(f"{path}: output would overwrite the input STAR file; choose another output name")
    particles = table.particles
    if rows is not None:
        rows = np.asarray(rows, dtype=np.int64)
        particles = particles.iloc[rows]
    particles = particles.reset_index(drop=True).copy()
    for name, values in (extra_columns or {}).items():
        values = np.asarray(values)
        if rows is not None and len(values) == len(table) and len(values) != len(particles):
            values = values[rows]
        if len(values) != len(particles):
            raise ValueError(f"extra column {name}: {len(values)} values for {len(particles)} rows")
        particles[name.lstrip("_")] = values
    blocks: dict[str, pd.DataFrame] = dict(table.other_blocks)
    if table.optics is not None:
        blocks["optics"] = table.optics
    blocks[table.particles_block] = particles
    # RELION 3.1 misreads a 3.0-style file (no optics table) that carries a version line: write none then.
    _write_blocks(blocks, path, STAR_VERSION_LINE if table.optics is not None else None)
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _write_blocks(blocks: dict[str, pd.DataFrame], path: Path, version_line: str | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # float_format=None: pandas' shortest round-trip repr (lossless, '300.0' stays a float)
    lines = StarWriter(blocks, float_format=None).lines()
    body = "\n".join(line for line in lines if not line.startswith("# Created by")).lstrip()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(f"\n{version_line}\n\n{body}\n" if version_line else f"\n{body}\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
