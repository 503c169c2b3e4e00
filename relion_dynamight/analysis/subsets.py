"""Particle subsets from the latent space: clusters, axis ranges, polygons in the 2D embedding.

Selections are boolean masks over the particles of the analysed half set; :func:`write_subset` writes
them through :func:`relion_dynamight.relion.star.write_particles`, keeping every original column and the
optics table, so that RELION (``relion_reconstruct``, Refine3D, ...) reads them directly.

Polygon file format (``--polygon FILE``)
---------------------------------------
Plain text, one vertex per line: two numbers ``x y`` (whitespace or comma separated) giving the vertex in
the 2D embedding as plotted (``x`` = PC1, ``y`` = PC2; the coordinates of every particle are in
``embedding.csv``).  Blank lines and lines starting with ``#`` are ignored.  At least 3 vertices; the
polygon is closed automatically.  A point on the boundary counts as inside only up to rounding.

Axis-range format (``--axis-range SPEC``)
-----------------------------------------
``AXIS:MIN:MAX`` conditions joined by commas, all of which must hold: ``AXIS`` is a latent dimension
``1..L`` (the ``dmLatentK`` column) or ``pc1``/``pc2``/... (embedding axis); an empty ``MIN`` or ``MAX`` means
unbounded.  Example: ``1:-0.5:0.5,pc2::0``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from relion_dynamight.errors import InputError
from relion_dynamight.relion.star import ParticleTable

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


@dataclass
class Condition:
    """``low <= coordinate <= high`` on latent dimension ``axis`` (0-based) or PCA axis when ``pca``."""

    axis: int
    pca: bool
    low: float
    high: float

    def label(self) -> str:
        name = f"pc{self.axis + 1}" if self.pca else f"z{self.axis + 1}"
        lo = "" if self.low == -np.inf else f"{self.low:g}"
        hi = "" if self.high == np.inf else f"{self.high:g}"
        return f"{name}_{lo}_to_{hi}"


def parse_axis_ranges(spec: str, latent_dim: int, n_pcs: int) -> list[Condition]:
    """Parse ``AXIS:MIN:MAX[,AXIS:MIN:MAX...]`` (see module docstring) → conditions."""
    conditions = []
    for part in spec.split(","):
        fields = part.strip().split(":")
        if len(fields) != 3:
            raise InputError(f"--axis-range {spec!r}: {part.strip()!r} is not AXIS:MIN:MAX "
                             "(e.g. 1:-0.5:0.5 or pc1::0)")
        axis_text, lo_text, hi_text = (f.strip() for f in fields)
        m = re.fullmatch(r"(pc)?(\d+)", axis_text.lower())
        if m is None:
            raise InputError(f"--axis-range {spec!r}: axis {axis_text!r} must be a latent dimension 1..{latent_dim} "
                             f"or pc1..pc{n_pcs}")
        is_pca, axis = m.group(1) is not None, int(m.group(2))
        limit = n_pcs if is_pca else latent_dim
        if not 1 <= axis <= limit:
            raise InputError(f"--axis-range {spec!r}: axis {axis_text} is out of range 1..{limit}")
        low, high = _bound(lo_text, -np.inf, spec), _bound(hi_text, np.inf, spec)
        if low > high:
            raise InputError(f"--axis-range {spec!r}: MIN {low:g} is larger than MAX {high:g}")
        conditions.append(Condition(axis=axis - 1, pca=is_pca, low=low, high=high))
    return conditions


def _bound(text: str, default: float, spec: str) -> float:
    if not text:
        return default
    if re.fullmatch(_NUMBER, text) is None:
        raise InputError(f"--axis-range {spec!r}: {text!r} is not a number")
    return float(text)


def select_ranges(conditions: Sequence[Condition], z: Tensor, embedding: Tensor) -> Tensor:
    """Boolean mask ``(n,)`` of particles meeting all conditions (latent ``z (n, L)``, PCA ``embedding (n, k)``)."""
    keep = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
    for c in conditions:
        values = (embedding if c.pca else z)[:, c.axis]
        keep &= (values >= c.low) & (values <= c.high)
    return keep


def read_polygon(path: str | Path) -> Tensor:
    """Read a polygon file (see module docstring) → vertices ``(P, 2)`` float64; InputError when malformed."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--polygon {path}: file not found; give a text file with one 'x y' vertex per line")
    vertices = []
    for number, raw in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f for f in re.split(r"[\s,]+", line) if f]
        if len(fields) != 2 or any(re.fullmatch(_NUMBER, f) is None for f in fields):
            raise InputError(f"--polygon {path}: line {number} ({line[:40]!r}) is not two numbers 'x y'; "
                             "write one polygon vertex (PC1 PC2) per line")
        vertices.append([float(fields[0]), float(fields[1])])
    if len(vertices) < 3:
        raise InputError(f"--polygon {path}: {len(vertices)} vertices found; a polygon needs at least 3 'x y' lines")
    return torch.tensor(vertices, dtype=torch.float64)


def inside_polygon(points: Tensor, vertices: Tensor) -> Tensor:
    """Even-odd rule: which of ``points (n, 2)`` lie inside the closed polygon ``vertices (P, 2)`` → ``(n,)`` bool."""
    p = points.to(torch.float64)
    v = vertices.to(device=p.device, dtype=torch.float64)
    a, b = v, torch.roll(v, -1, dims=0)  # edges a -> b
    px, py = p[:, 0:1], p[:, 1:2]
    crosses = (a[:, 1] > py) != (b[:, 1] > py)  # (n, P)
    dy = b[:, 1] - a[:, 1]
    safe_dy = torch.where(dy == 0, torch.ones_like(dy), dy)
    x_at = a[:, 0] + (py - a[:, 1]) * (b[:, 0] - a[:, 0]) / safe_dy
    hits = crosses & (px < x_at)
    return (hits.sum(dim=1) % 2) == 1


def write_subset(table: ParticleTable, rows: np.ndarray, path: Path,
                 extra_columns: dict[str, np.ndarray] | None = None) -> Path:
    """Write particle ``rows`` (indices into ``table``, a ``relion.star.ParticleTable``) to ``path``."""
    from relion_dynamight.relion.star import write_particles

    if len(rows) == 0:
        raise InputError(f"{path.name}: the selection is empty; widen the range or polygon")
    return write_particles(table, path, rows=np.asarray(rows, dtype=np.int64), extra_columns=extra_columns)
