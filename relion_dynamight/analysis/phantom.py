"""Ground-truth phantoms for the simulator: Gaussian models whose domains move rigidly along one coordinate.

A :class:`Phantom` holds the reference conformation (conformation coordinate ``c = 0``): Gaussian centres
``(M, 3)`` (x, y, z) in pixels from the box centre, amplitudes (peak values) and widths (σ, pixels), and
one or more :class:`DomainMotion` s.  Each domain moves along a screw: at coordinate ``c`` its Gaussians are

    r' = p + R(u, c·θ) (r − p) + c·s·u      (p: point on the axis, u: unit axis, θ: degrees, s: pixels per unit)

and Gaussians of no domain stay put.  The built-in hinge is one domain with ``θ = 1°`` per unit and ``s = 0``,
so its coordinate is the hinge angle in degrees (the truth column ``hinge_angle``).

Sources: :func:`builtin_phantom` (a fixed, asymmetric two-domain model scaled to the box),
:func:`phantom_from_atoms` (atoms of a PDB/mmCIF file read with gemmi; the second half of the atoms
in file order moves about a hinge) and :func:`adk_phantom` (adenylate kinase, whose LID and NMP domains close
over its CORE: the screw motions that take the closed crystal structure 1AKE to the open one 4AKE, with the
reference conformation half-way, ``c`` from −0.5 = closed to +0.5 = open).  :meth:`Phantom.save` /
:func:`load_phantom` round-trip it through JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from relion_dynamight.errors import InputError

#: Seed of the built-in model's layout: the phantom is the same for every simulation seed.
_LAYOUT_SEED = 20240917


@dataclass(frozen=True)
class DomainMotion:
    """One rigid domain's screw motion per unit of the conformation coordinate (see module docstring)."""

    mask: Tensor            # (M,) bool, Gaussians of this domain
    point: Tensor           # (3,) float64, a point on the screw axis, pixels
    axis: Tensor            # (3,) float64, unit vector
    degrees: float = 1.0    # rotation per unit of the coordinate
    shift: float = 0.0      # translation along the axis per unit, pixels

    def move(self, positions: Tensor, coords: Tensor) -> Tensor:
        """``positions`` ``(..., M, 3)`` with this domain moved to coordinates ``coords`` ``(...)``."""
        rot = axis_angle_matrix(self.axis, coords * self.degrees)                # (..., 3, 3)
        turned = self.point + (positions - self.point) @ rot.transpose(-1, -2)
        turned = turned + (coords * self.shift)[..., None, None] * self.axis
        return torch.where(self.mask[:, None], turned, positions)

    def as_dict(self) -> dict:
        return {"indices": self.mask.nonzero().squeeze(1).tolist(), "point": self.point.tolist(),
                "axis": self.axis.tolist(), "degrees": self.degrees, "shift": self.shift}


@dataclass
class Phantom:
    positions: Tensor       # (M, 3) float64, reference conformation, pixels from the box centre
    amplitudes: Tensor      # (M,) float64, peak values
    widths: Tensor          # (M,) float64, sigma in pixels
    moving: Tensor          # (M,) bool, Gaussians of any moving domain
    hinge_point: Tensor     # (3,) float64, pixels (the first domain's axis point)
    hinge_axis: Tensor      # (3,) float64, unit vector (the first domain's axis)
    box: int
    pixel_size: float
    source: str = "builtin"
    domains: tuple[DomainMotion, ...] = field(default=())   # empty: one hinge (moving, hinge_point/axis, 1°/unit)

    def __post_init__(self) -> None:
        if not self.domains:
            self.domains = (DomainMotion(self.moving, self.hinge_point, self.hinge_axis),)

    def true_positions(self, angles_deg: Tensor | float) -> Tensor:
        """Positions at conformation coordinates (hinge angles in degrees for the hinge): scalar → ``(M, 3)``,
        ``(B,)`` → ``(B, M, 3)`` (float64, pixels)."""
        coords = torch.as_tensor(angles_deg, dtype=torch.float64)
        out = self.positions.expand(*coords.shape, *self.positions.shape)
        for domain in self.domains:
            out = domain.move(out, coords)
        return out

    def save(self, path: Path, extra: dict | None = None) -> Path:
        """Write the phantom (and ``extra`` entries) as JSON."""
        data = {
            "source": self.source, "box": self.box, "pixel_size": self.pixel_size,
            "units": "positions/widths/hinge in pixels from the box centre (index box//2), (x, y, z); "
                     "amplitudes are peak values; each domain turns by 'degrees' (right-handed about its axis) "
                     "and moves 'shift' pixels along it per unit of the conformation coordinate",
            "hinge_point": self.hinge_point.tolist(), "hinge_axis": self.hinge_axis.tolist(),
            "moving_indices": self.moving.nonzero().squeeze(1).tolist(),
            "domains": [d.as_dict() for d in self.domains],
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
    domains = []
    for d in data.get("domains", []):
        mask = torch.zeros(positions.shape[0], dtype=torch.bool)
        mask[torch.tensor(d["indices"], dtype=torch.long)] = True
        domains.append(DomainMotion(mask, torch.tensor(d["point"], dtype=torch.float64),
                                    torch.tensor(d["axis"], dtype=torch.float64), float(d["degrees"]),
                                    float(d["shift"])))
    return Phantom(positions, torch.tensor(data["amplitudes"], dtype=torch.float64),
                   torch.tensor(data["widths"], dtype=torch.float64), moving,
                   torch.tensor(data["hinge_point"], dtype=torch.float64),
                   torch.tensor(data["hinge_axis"], dtype=torch.float64), int(data["box"]),
                   float(data["pixel_size"]), str(data.get("source", "builtin")), tuple(domains))


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


#: Adenylate kinase (E. coli) domains by residue number (Müller et al. 1996; Beckstein et al. 2009).
ADK_DOMAINS = {"NMP": (30, 59), "LID": (122, 159)}
ADK_FILE = "adk_closed_open.csv.gz"


def adk_phantom(box: int, pixel_size: float) -> Phantom:
    """Adenylate kinase: LID and NMP domains moving between the closed (1AKE) and open (4AKE) structures.

    Heavy atoms as Gaussians (σ = max(1 px, 1.5 Å), amplitude = atomic number, as
    :func:`phantom_from_atoms`).  With the CORE of both structures superposed, each of LID and NMP gets the
    screw motion (:func:`screw_from_rigid`) of its least-squares fit from closed to open; the reference
    conformation (coordinate 0) is half-way along both screws, coordinate −0.5 the closed and +0.5 the
    (rigid-domain) open structure.  The LID tip travels about 25 Å between the two.
    """
    closed, opened, numbers, resseq = _read_adk()
    core = torch.ones(len(resseq), dtype=torch.bool)
    for lo, hi in ADK_DOMAINS.values():
        core &= ~((resseq >= lo) & (resseq <= hi))
    rot, shift = kabsch(opened[core], closed[core])                 # open frame → closed frame (CORE on CORE)
    opened = opened @ rot.T + shift
    screws = []
    for lo, hi in ADK_DOMAINS.values():
        mask = (resseq >= lo) & (resseq <= hi)
        r, d = kabsch(closed[mask], opened[mask])                     # closed domain → open domain
        screws.append((mask, *screw_from_rigid(r, d)))
    # the reference conformation: half-way along each screw, centred on its centroid, in pixels
    in_angstrom = [DomainMotion(m, p, u, theta, s) for m, p, u, theta, s in screws]
    reference = closed.clone()
    for dom in in_angstrom:
        reference = dom.move(reference, torch.tensor(0.5, dtype=torch.float64))
    centre = reference.mean(0)
    positions = (reference - centre) / pixel_size
    domains = tuple(DomainMotion(m, (p - centre) / pixel_size, u, theta, s / pixel_size)
                    for m, p, u, theta, s in screws)
    sigma = max(1.0, 1.5 / pixel_size)
    moving = torch.zeros_like(domains[0].mask)
    for dom in domains:
        moving |= dom.mask
    phantom = Phantom(positions, numbers, torch.full_like(numbers, sigma), moving, domains[1].point,
                      domains[1].axis, box, float(pixel_size), "adk (1AKE closed <-> 4AKE open)", domains)
    ends = phantom.true_positions(torch.tensor([-0.5, 0.5], dtype=torch.float64))
    extent = float(ends.norm(dim=-1).max()) + 3 * sigma
    if extent > box / 2 - 1:
        needed = 2 * math.ceil(extent + 1)
        raise InputError(f"adenylate kinase spans ±{extent * pixel_size:.0f} Å along its motion, more than the box of "
                         f"{box} × {pixel_size} Å; use --box {needed} or a larger --pixel-size")
    return phantom


def _read_adk() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Closed and open coordinates ``(M, 3)`` (Å), atomic numbers ``(M,)`` and residue numbers of the shipped file."""
    import gzip
    from importlib import resources

    z = {"C": 6.0, "N": 7.0, "O": 8.0, "S": 16.0}
    with resources.files("relion_dynamight.data").joinpath(ADK_FILE).open("rb") as raw, \
            gzip.open(raw, "rt") as text:
        rows = [line.strip().split(",") for line in text if line.strip() and not line.startswith("#")]
    body = rows[1:]
    closed = torch.tensor([[float(v) for v in r[4:7]] for r in body], dtype=torch.float64)
    opened = torch.tensor([[float(v) for v in r[7:10]] for r in body], dtype=torch.float64)
    numbers = torch.tensor([z[r[3]] for r in body], dtype=torch.float64)
    resseq = torch.tensor([int(r[2]) for r in body])
    return closed, opened, numbers, resseq


def kabsch(source: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Rotation ``R (3, 3)`` and translation ``d (3,)`` minimising ``Σ |R·source + d − target|²`` (``(M, 3)`` each)."""
    cs, ct = source.mean(0), target.mean(0)
    h = (source - cs).T @ (target - ct)
    u, _, vt = torch.linalg.svd(h)
    sign = torch.sign(torch.linalg.det(vt.T @ u.T))
    fix = torch.diag(torch.tensor([1.0, 1.0, float(sign)], dtype=source.dtype))
    rot = vt.T @ fix @ u.T
    return rot, ct - rot @ cs


def screw_from_rigid(rot: Tensor, shift: Tensor) -> tuple[Tensor, Tensor, float, float]:
    """Chasles' screw of ``x ↦ rot·x + shift``: ``(point on the axis, unit axis, degrees, translation along it)``.

    ``point + R(axis, degrees)(x − point) + translation·axis`` equals ``rot·x + shift``.
    """
    angle = math.acos(max(-1.0, min(1.0, (float(torch.trace(rot)) - 1) / 2)))
    w = torch.stack([rot[2, 1] - rot[1, 2], rot[0, 2] - rot[2, 0], rot[1, 0] - rot[0, 1]])
    axis = w / w.norm()
    along = float(axis @ shift)
    eye = torch.eye(3, dtype=rot.dtype)
    point = torch.linalg.lstsq(eye - rot, (shift - along * axis)[:, None]).solution[:, 0]
    return point, axis, math.degrees(angle), along
