"""Ground-truth phantoms for the simulator: Gaussian models whose one domain turns about a hinge.

A :class:`Phantom` holds the reference conformation (hinge angle 0): Gaussian centres ``(M, 3)``
(x, y, z) in pixels from the box centre, amplitudes (peak values) and widths (σ, pixels), a boolean
mask of the moving domain, and the hinge (a point and a unit axis, pixels).  A conformation at hinge
angle ``θ`` (degrees, right-handed about the axis) is

    r' = h + R(axis, θ) (r − h)   for moving Gaussians,     r' = r   otherwise.

Two sources: :func:`builtin_phantom` (a fixed, asymmetric two-domain model scaled to the box) and
:func:`phantom_from_atoms` (atoms of a PDB/mmCIF file read with gemmi; the second half of the atoms
in file order moves).  :meth:`Phantom.save` / :func:`load_phantom` round-trip it through JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from relion_dynamight.errors import InputError

#: Seed of the built-in model's layout: the phantom is the same for every simulation seed.
_LAYOUT_SEED = 20240917


@dataclass
class Phantom:
    positions: Tensor       # (M, 3) float64, reference conformation, pixels from the box centre
    amplitudes: Tensor      # (M,) float64, peak values
    widths: Tensor          # (M,) float64, sigma in pixels
    moving: Tensor          # (M,) bool, Gaussians of the moving domain
    hinge_point: Tensor     # (3,) float64, pixels
    hinge_axis: Tensor      # (3,) float64, unit vector
    box: int
    pixel_size: float
    source: str = "builtin"

    def true_positions(self, angles_deg: Tensor | float) -> Tensor:
        """Positions at hinge angles: scalar → ``(M, 3)``, ``(B,)`` → ``(B, M, 3)`` (float64, pixels)."""
        angles = torch.as_tensor(angles_deg, dtype=torch.float64)
        rot = axis_angle_matrix(self.hinge_axis, angles)                  # (..., 3, 3)
        rel = self.positions - self.hinge_point
        turned = self.hinge_point + rel @ rot.transpose(-1, -2)           # (..., M, 3)
        return torch.where(self.moving[:, None], turned, self.positions.expand_as(turned))

    def save(self, path: Path, extra: dict | None = None) -> Path:
        """Write the phantom (and ``extra`` entries) as JSON."""
        data = {
            "source": self.source, "box": self.box, "pixel_size": self.pixel_size,
            "units": "positions/widths/hinge in pixels from the box centre (index box//2), (x, y, z); "
                     "amplitudes are peak values; hinge angle in degrees, right-handed about hinge_axis",
            "hinge_point": self.hinge_point.tolist(), "hinge_axis": self.hinge_axis.tolist(),
            "moving_indices": self.moving.nonzero().squeeze(1).tolist(),
            "positions": self.positions.tolist(), "amplitudes": self.amplitudes.tolist(),
            "widths": self.widths.tolist(),
        }
        data.update(extra or {})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1))
        return path


def load_phantom(path: Path) -> Phantom:
    """Read a phantom written by :meth:`Phantom.save` (a file or a ``truth/`` folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "phantom.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the phantom ({exc}); give a simulator truth/phantom.json") from None
    positions = torch.tensor(data["positions"], dtype=torch.float64)
    moving = torch.zeros(positions.shape[0], dtype=torch.bool)
    moving[torch.tensor(data["moving_indices"], dtype=torch.long)] = True
    return Phantom(positions, torch.tensor(data["amplitudes"], dtype=torch.float64),
                   torch.tensor(data["widths"], dtype=torch.float64), moving,
                   torch.tensor(data["hinge_point"], dtype=torch.float64),
                   torch.tensor(data["hinge_axis"], dtype=torch.float64), int(data["box"]),
                   float(data["pixel_size"]), str(data.get("source", "builtin")))


def axis_angle_matrix(axis: Tensor, angles_deg: Tensor) -> Tensor:
    """Rotation matrices ``(..., 3, 3)`` by ``angles_deg`` ``(...)`` about the unit ``axis`` (Rodrigues)."""
    a = axis / axis.norm()
    t = torch.deg2rad(torch.as_tensor(angles_deg, dtype=torch.float64))
    c, s = torch.cos(t)[..., None, None], torch.sin(t)[..., None, None]
    k = torch.tensor([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]], dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)
    return eye * c + s * k + (1 - c) * torch.outer(a, a)


def _fill_ellipsoid(centre: tuple[float, float, float], semi_axes: tuple[float, float, float], spacing: float,
                    gen: torch.Generator) -> Tensor:
    """Jittered lattice points (spacing ``spacing``) inside an ellipsoid, all in pixels."""
    ranges = [torch.arange(-a, a + 1e-9, spacing, dtype=torch.float64) for a in semi_axes]
    x, y, z = torch.meshgrid(*ranges, indexing="ij")
    pts = torch.stack([x.flatten(), y.flatten(), z.flatten()], dim=1)
    pts = pts + (torch.rand(pts.shape, generator=gen, dtype=torch.float64) - 0.5) * 0.4 * spacing
    inside = ((pts / torch.tensor(semi_axes, dtype=torch.float64)) ** 2).sum(1) <= 1.0
    return pts[inside] + torch.tensor(centre, dtype=torch.float64)


def builtin_phantom(box: int, pixel_size: float) -> Phantom:
    """The built-in two-domain model, scaled to ``box`` (extent about ±0.33 box).

    A body (large ellipsoid plus an off-axis knob, so no pseudo-symmetry) and an arm domain joined at
    the hinge point; the arm turns about an oblique axis through the hinge.  Gaussian spacing is
    ``box/24`` pixels and σ = 0.6 spacing; amplitudes vary ±20 %.
    """
    gen = torch.Generator().manual_seed(_LAYOUT_SEED)
    s = box / 24.0
    b = box
    body = _fill_ellipsoid((-0.10 * b, -0.02 * b, 0.0), (0.15 * b, 0.21 * b, 0.14 * b), s, gen)
    knob = _fill_ellipsoid((-0.17 * b, 0.14 * b, 0.10 * b), (0.07 * b, 0.06 * b, 0.07 * b), s, gen)
    arm = _fill_ellipsoid((0.17 * b, 0.06 * b, -0.02 * b), (0.14 * b, 0.09 * b, 0.09 * b), s, gen)
    positions = torch.cat([body, knob, arm])
    moving = torch.cat([torch.zeros(len(body) + len(knob), dtype=torch.bool), torch.ones(len(arm), dtype=torch.bool)])
    amplitudes = 0.8 + 0.4 * torch.rand(positions.shape[0], generator=gen, dtype=torch.float64)
    widths = torch.full((positions.shape[0],), 0.6 * s, dtype=torch.float64)
    hinge = torch.tensor([0.04 * b, 0.04 * b, -0.01 * b], dtype=torch.float64)
    axis = torch.tensor([0.2, 0.3, 1.0], dtype=torch.float64)
    return Phantom(positions, amplitudes, widths, moving, hinge, axis / axis.norm(), box, float(pixel_size))


def phantom_from_atoms(path: Path, box: int, pixel_size: float) -> Phantom:
    """Atoms of a PDB/mmCIF file (gemmi) as Gaussians: σ = max(1 px, 1.5 Å), amplitude = atomic number.

    Waters and hydrogens are dropped; the model is centred on its centroid.  Atoms after the middle
    (in file order) form the moving domain; the hinge point is the mean of the atoms around the split
    and the axis is perpendicular to the line joining the two domains' centroids.
    """
    from relion_dynamight.relion.atomic_model import read_structure

    path = Path(path)
    structure = read_structure(path, "--pdb")
    coords, numbers = [], []
    if len(structure) > 0:
        for chain in structure[0]:
            for residue in chain:
                for atom in residue:
                    coords.append((atom.pos.x, atom.pos.y, atom.pos.z))
                    numbers.append(atom.element.atomic_number)
    if len(coords) < 4:
        raise InputError(f"{path}: found {len(coords)} non-hydrogen atoms in the first model; need at least 4")
    xyz = torch.tensor(coords, dtype=torch.float64)
    positions = (xyz - xyz.mean(0)) / pixel_size
    sigma = max(1.0, 1.5 / pixel_size)
    extent = float(positions.abs().max()) + 3 * sigma
    if extent > box / 2 - 1:
        needed = 2 * math.ceil(extent + 1)
        raise InputError(f"{path}: the model spans ±{extent * pixel_size:.0f} Å, more than the box of "
                         f"{box} × {pixel_size} Å; use --box {needed} or a larger --pixel-size")
    m = positions.shape[0]
    moving = torch.arange(m) >= m // 2
    lo, hi = max(0, m // 2 - max(1, m // 100)), min(m, m // 2 + max(1, m // 100))
    hinge = positions[lo:hi].mean(0)
    link = positions[moving].mean(0) - positions[~moving].mean(0)
    helper = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    if torch.linalg.cross(link, helper).norm() < 1e-3 * link.norm().clamp_min(1e-9):
        helper = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    axis = torch.linalg.cross(link, helper)
    axis = axis / axis.norm()
    return Phantom(positions, torch.tensor(numbers, dtype=torch.float64), torch.full((m,), sigma, dtype=torch.float64),
                   moving, hinge, axis, box, float(pixel_size), source=str(path))
