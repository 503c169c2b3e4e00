"""Consensus Gaussian model: parameters, initialisation from a map or from an atomic model.

The density is ``f(r) = Σ_i a_i G_s(r − c_i)`` with centres ``c_i`` ``(x, y, z)`` in pixels from the box
centre.  As in the paper all Gaussians share one learnable amplitude and one learnable width (σ, pixels);
an atomic model adds fixed per-Gaussian relative amplitudes (combined atomic numbers), so a per-Gaussian
density can never appear or vanish to imitate motion.  :meth:`GaussianModel.render` uses
``relion_dynamight.imaging.gaussians.render_volume`` (exact, ``O(M·N³)`` per map); the map fit
(:func:`fit_to_map`) uses :mod:`relion_dynamight.model.render` (trilinear splat + analytic Gaussian
transform, one FFT per step) on a Fourier-cropped copy of the map, so it scales to large boxes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from relion_dynamight.errors import InputError
from relion_dynamight.imaging.fourier import rfft3_centered
from relion_dynamight.imaging.gaussians import render_volume
from relion_dynamight.model.regularizers import mean_neighbour_distance
from relion_dynamight.model.render import auto_oversample, gaussian_spectrum, spectral_fit_loss

log = logging.getLogger(__name__)

AUTO_THRESHOLD_HELP = (
    "Automatic threshold: 5 robust standard deviations above the solvent level (voxels 0.45 to 0.5 box "
    "lengths from the centre), or Otsu's threshold when that solvent is flat (masked maps); never so high "
    "that fewer voxels than Gaussians are selected."
)


@dataclass
class GaussianParams:
    """Plain tensors of a Gaussian model (what checkpoints store).

    positions ``(M, 3)`` px; log_amplitude ``()`` or ``(M,)``; log_width ``()`` or ``(M,)`` (log σ, px);
    relative_amplitudes ``(M,)`` fixed factors or ``None``.
    """

    positions: Tensor
    log_amplitude: Tensor
    log_width: Tensor
    relative_amplitudes: Tensor | None = None


class GaussianModel(nn.Module):
    """Learnable Gaussian model: ``positions`` (M, 3) px, ``log_amplitude``, ``log_width`` parameters."""


    relative_amplitudes: Tensor | None
    def __init__(
        self,
        positions: Tensor,
        amplitude: float | Tensor = 1.0,
        width: float | Tensor = 1.0,
        relative_amplitudes: Tensor | None = None,
    ) -> None:
        super().__init__()
        pos = positions.detach().clone().float()
        self.positions = nn.Parameter(pos)
        amp = torch.as_tensor(amplitude, dtype=torch.float32, device=pos.device)
        wid = torch.as_tensor(width, dtype=torch.float32, device=pos.device)
        self.log_amplitude = nn.Parameter(torch.log(amp).clone())
        self.log_width = nn.Parameter(torch.log(wid).clone())
        rel = None if relative_amplitudes is None else relative_amplitudes.detach().clone().float().to(pos.device)
        self.register_buffer("relative_amplitudes", rel)
        self.fit_correlation: float | None = None

    @property
    def n_gaussians(self) -> int:
        return self.positions.shape[0]

    @property
    def amplitudes(self) -> Tensor:
        """Amplitudes: ``()`` shared, or ``(M,)`` with relative amplitudes / per-Gaussian parameters."""
        amp = torch.exp(self.log_amplitude)
        return amp if self.relative_amplitudes is None else amp * self.relative_amplitudes

    @property
    def widths(self) -> Tensor:
        """Gaussian σ in pixels: ``()`` shared or ``(M,)``."""
        return torch.exp(self.log_width)

    def params(self) -> GaussianParams:
        """Detached copies of the parameters."""
        rel = None if self.relative_amplitudes is None else self.relative_amplitudes.detach().clone()
        return GaussianParams(
            self.positions.detach().clone(), self.log_amplitude.detach().clone(), self.log_width.detach().clone(), rel
        )

    @classmethod
    def from_params(cls, p: GaussianParams) -> GaussianModel:
        model = cls(p.positions, 1.0, 1.0, p.relative_amplitudes)
        with torch.no_grad():
            model.log_amplitude = nn.Parameter(p.log_amplitude.detach().clone().float().to(p.positions.device))
            model.log_width = nn.Parameter(p.log_width.detach().clone().float().to(p.positions.device))
        return model

    def render(self, box: int, positions: Tensor | None = None) -> Tensor:
        """Real-space map ``(box, box, box)`` of the model (or of the same Gaussians at ``positions``)."""
        pos = self.positions if positions is None else positions
        return render(pos, self.amplitudes, self.widths, box)


def render(positions: Tensor, amplitudes: Tensor, widths: Tensor, box: int) -> Tensor:
    """Render Gaussians (peak ``a``, σ px) to a map ``[z, y, x]`` with ``imaging.gaussians.render_volume``."""
    return render_volume(positions, amplitudes, widths, box)


def map_correlation(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two maps over the whole box."""
    a = a.double().flatten() - a.double().mean()
    b = b.double().flatten() - b.double().mean()
    return float((a * b).sum() / torch.sqrt((a * a).sum() * (b * b).sum()).clamp_min(1e-30))


def _otsu(values: Tensor, bins: int = 256) -> float:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return lo
    hist = torch.histc(values.double(), bins=bins, min=lo, max=hi)
    centres = lo + (torch.arange(bins, dtype=torch.float64, device=values.device) + 0.5) * (hi - lo) / bins
    w0 = torch.cumsum(hist, 0)
    m0 = torch.cumsum(hist * centres, 0)
    total, mtotal = w0[-1], m0[-1]
    w1 = total - w0
    between = (mtotal * w0 / total - m0) ** 2 / (w0 * w1).clamp_min(1e-30) * total
    between[w1 <= 0] = -1.0
    k = int(torch.argmax(between))
    return lo + (k + 1) * (hi - lo) / bins


def auto_threshold(volume: Tensor, n_gaussians: int, solvent_radius: float = 0.45, n_sd: float = 5.0) -> float:
    """Automatic density threshold for filling a map ``(N, N, N)`` with Gaussians (see ``AUTO_THRESHOLD_HELP``).

    Solvent = voxels between ``solvent_radius × N`` and ``N / 2`` from the centre (the corners are left
    out: reconstructions are often flat there, which would fake a noise-free solvent).  Its level and noise are taken
    robustly (median, 1.4826 × MAD); the threshold is ``median + n_sd × sd``: the lowest level at which
    no solvent noise remains, which keeps weak (flexible) density.  A flat solvent (sd below 1e-3 of the
    map's SD: masked or noise-free maps) says nothing about noise, and Otsu's two-class threshold of the
    whole map is used instead.  Finally the threshold is lowered, if needed, to select at least
    ``n_gaussians`` voxels.
    """
    vol = volume.detach().double()
    n = vol.shape[-1]
    c = torch.arange(n, dtype=torch.float64, device=vol.device) - n // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    r2 = x**2 + y**2 + z**2
    outside = r2 > (solvent_radius * n) ** 2
    shell = outside & (r2 <= (n / 2) ** 2)  # corners beyond N/2 are often flat (masked reconstructions)
    solvent = vol[shell] if int(shell.sum()) >= 100 else vol[outside]
    med = solvent.median()
    sd = 1.4826 * (solvent - med).abs().median()
    if solvent.numel() > 0 and float(sd) > 1e-3 * float(vol.std()):
        thr = float(med + n_sd * sd)
    else:
        thr = _otsu(vol.flatten())
    k = min(max(int(n_gaussians), 1), vol.numel())
    kth = torch.topk(volume.detach().flatten(), k).values[-1]  # in the map's dtype, for exact comparisons
    below_kth = float(torch.nextafter(kth, torch.tensor(-math.inf, dtype=kth.dtype, device=kth.device)))
    return min(thr, below_kth)


def _sample_points(volume: Tensor, threshold: float, n: int, generator: torch.Generator | None) -> Tensor:
    """``n`` uniform random points inside voxels above ``threshold`` → ``(n, 3)`` px (CPU)."""
    idx = torch.nonzero(volume.detach().cpu() > threshold)  # (K, 3) as (z, y, x)
    if idx.shape[0] == 0:
        raise InputError(
            f"initial threshold {threshold:g} selects no voxel of the consensus map (its maximum is "
            f"{float(volume.max()):g}); give a lower --initial-threshold or leave it out for the automatic one"
        )
    if n > 8 * idx.shape[0]:
        log.warning("WARNING: %d Gaussians for %d voxels above the threshold %g: using %d (8 per voxel); give a "
                    "lower --initial-threshold or fewer --n-gaussians", n, idx.shape[0], threshold, 8 * idx.shape[0])
        n = 8 * int(idx.shape[0])
    pick = torch.randint(idx.shape[0], (n,), generator=generator)
    jitter = torch.rand((n, 3), generator=generator, dtype=torch.float64) - 0.5
    zyx = idx[pick].double() + jitter
    return (zyx.flip(-1) - volume.shape[-1] // 2).float()


#: σ (pixels of the fitting grid) aimed at when the map is Fourier-cropped for :func:`fit_to_map`.
FIT_GRID_SIGMA = 2.0
#: σ·oversample accepted while fitting (the final correlation uses the accurate default, 1.5): at 1.0 the
#: splat renderer's correlation with the exact map is 0.998, and fits reach the same correlation (within
#: 1e-4 on a box-128 test with σ 1.4 px) at 1/8 of the cost of an oversampled grid.
FIT_MIN_SPLAT_SIGMA = 1.0
#: Distinct Gaussian widths above which :func:`fit_to_map` renders exactly instead of by splatting.
MAX_SPLAT_WIDTH_CLASSES = 8


def _fft_friendly_even(n: int) -> int:
    """Smallest even ``m ≥ n`` whose prime factors are 2, 3, 5, 7."""
    m = max(2, n + (n % 2))
    while True:
        r = m
        for p in (2, 3, 5, 7):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 2


def fit_grid_size(box: int, width: float, grid_sigma: float = FIT_GRID_SIGMA) -> int:
    """Box of the Fourier-cropped grid on which Gaussians of σ ``width`` px are fitted (``≤ box``).

    The Gaussian's transform at the cropped Nyquist frequency is ``exp(-π² σ'²/2)`` with ``σ' = σ·n/box``:
    ``3·10⁻⁹`` for ``σ' = 2``, so cropping the map beyond it changes the fit by nothing measurable.
    """
    n = _fft_friendly_even(math.ceil(box * grid_sigma / max(width, 1e-3)))
    return box if n >= box else max(n, min(box, 16))


def _crop_indices(box: int, n: int, device: torch.device) -> Tensor:
    """Rows of a ``box`` fftfreq axis holding the frequencies of an ``n`` fftfreq axis."""
    return ((torch.fft.fftfreq(n, device=device) * n).round().long()) % box


def _half_weights(n: int, device: torch.device) -> Tensor:
    """Weights ``(n, n, n//2+1)`` turning sums over the rfft half into sums over the full spectrum; the
    Nyquist planes of each axis get 0 (their content is unused and ambiguous after cropping)."""
    w = torch.full((n, n, n // 2 + 1), 2.0, device=device)
    w[..., 0] = 1.0
    if n % 2 == 0:
        w[..., n // 2] = 0.0
        w[n // 2] = 0.0
        w[:, n // 2] = 0.0
    return w


class _CroppedTarget:
    """A map's spectrum cropped to an ``n`` grid, with the half-spectrum weights (see :func:`fit_to_map`)."""

    def __init__(self, full_spectrum: Tensor, box: int, n: int) -> None:
        rows = _crop_indices(box, n, full_spectrum.device)
        self.n, self.factor = n, n / box
        self.spectrum = full_spectrum[rows][:, rows][..., : n // 2 + 1]
        self.weights = _half_weights(n, full_spectrum.device)

    def model_spectrum(self, model: GaussianModel, oversample: int) -> Tensor:
        f = self.factor
        return gaussian_spectrum(model.positions * f, model.amplitudes, model.widths * f, self.n, oversample)

    def loss(self, model: GaussianModel, oversample: int) -> Tensor:
        """``Σ_k w |model − target|²``: the real-space mean squared difference (up to out-of-band terms)."""
        f = self.factor
        if model.widths.dim() == 0:
            return spectral_fit_loss(model.positions * f, model.amplitudes, model.widths * f, self.n,
                                     self.spectrum, self.weights, oversample)
        diff = self.model_spectrum(model, oversample) - self.spectrum
        return self.dot(diff, diff)

    def dot(self, a: Tensor, b: Tensor) -> Tensor:
        """``Σ_k w Re(a conj(b))`` = real-space ``mean(A·B)`` (DC included)."""
        return (self.weights * (a * b.conj()).real).sum()


def _fit_exact(model: GaussianModel, vol: Tensor, scale: float, n_steps: int, opt_groups: list) -> None:
    """Real-space fit with the exact renderer (many distinct widths)."""
    box = vol.shape[-1]
    with torch.no_grad():
        rendered = model.render(box)
        gain = float((rendered * vol).sum() / (rendered * rendered).sum().clamp_min(1e-30))
        if gain > 0:
            model.log_amplitude.add_(math.log(gain))
    opt = torch.optim.Adam(opt_groups)
    for _ in range(n_steps):
        opt.zero_grad()
        loss = (((model.render(box) - vol) / scale) ** 2).mean()
        loss.backward()
        opt.step()


def _fit_splat(model: GaussianModel, vol: Tensor, scale: float, n_steps: int, opt_groups: list) -> None:
    """Fourier-space fit on a cropped grid with the splatting renderer (see :func:`fit_to_map`)."""
    box = vol.shape[-1]
    full = rfft3_centered(vol)
    grid: tuple[int, int] | None = None
    target: _CroppedTarget | None = None
    opt = torch.optim.Adam(opt_groups)
    for step in range(n_steps + 1):
        if step % 25 == 0:  # re-choose the grid as the width changes
            width = float(model.widths.detach().min())
            n = fit_grid_size(box, width)
            choice = (n, auto_oversample(width * n / box, FIT_MIN_SPLAT_SIGMA))
            if choice != grid:
                grid, target = choice, _CroppedTarget(full, box, n)
                log.debug("Gaussian fit: grid %d (oversample %d) for sigma %.2f px", n, choice[1], width)
        assert target is not None and grid is not None
        if step == 0:
            with torch.no_grad():
                m = target.model_spectrum(model, grid[1])
                gain = float(target.dot(m, target.spectrum) / target.dot(m, m).clamp_min(1e-30))
                if gain > 0:
                    model.log_amplitude.add_(math.log(gain))
        if step == n_steps:
            break
        opt.zero_grad()
        loss = target.loss(model, grid[1]) / scale**2
        loss.backward()
        opt.step()


def _fit_correlation(model: GaussianModel, vol: Tensor) -> float:
    """Correlation of the model with the map over the whole box, computed from Fourier coefficients
    (mean excluded) on the model's cropped grid: the model has no content beyond it."""
    box = vol.shape[-1]
    width = float(model.widths.detach().min())
    n = fit_grid_size(box, width)
    full = rfft3_centered(vol.double())
    target = _CroppedTarget(full, box, n)
    m = gaussian_spectrum(model.positions.double() * target.factor, model.amplitudes.double(),
                          model.widths.double() * target.factor, n, auto_oversample(width * n / box))
    m = m.clone()
    m[0, 0, 0] = 0.0  # Pearson: mean excluded
    t_energy = ((full.abs() ** 2) * _rfft_multiplicity(box, vol.device)).sum() - full[0, 0, 0].abs() ** 2
    num = target.dot(m, target.spectrum)
    den = torch.sqrt(target.dot(m, m) * t_energy).clamp_min(1e-30)
    return float(num / den)


def _rfft_multiplicity(n: int, device: torch.device) -> Tensor:
    """Multiplicity ``(n, n, n//2+1)`` of each rfft coefficient in the full spectrum (Parseval weights)."""
    w = torch.full((n, n, n // 2 + 1), 2.0, device=device, dtype=torch.float64)
    w[..., 0] = 1.0
    if n % 2 == 0:
        w[..., n // 2] = 1.0
    return w


def fit_to_map(
    model: GaussianModel,
    volume: Tensor,
    n_steps: int = 150,
    fit_positions: bool = True,
    lr_positions: float = 0.05,
    lr_scalars: float = 0.02,
) -> float:
    """Fit the model to a map by Adam on the mean squared real-space difference; returns the correlation.

    The amplitude is first set by least squares, then positions (if ``fit_positions``), log-amplitude and
    log-width are optimised for ``n_steps``.  Stores the final correlation in ``model.fit_correlation``.

    Scaling: the squared difference is evaluated in Fourier space (Parseval) on the map's spectrum
    cropped to :func:`fit_grid_size` (σ ≈ 2 grid pixels; re-chosen every 25 steps), with the model from
    :func:`relion_dynamight.model.render.gaussian_spectrum` (trilinear splat + analytic Gaussian transform:
    ``O(M + n³ log n)`` per step).  Beyond the crop the model has no content, so this is the real-space
    loss up to a constant.  Models with more than ``MAX_SPLAT_WIDTH_CLASSES`` distinct widths fall back to
    the exact renderer (``O(M·N³)``).
    """
    vol = volume.detach().to(model.positions.device, torch.float32)
    scale = float(vol.std().clamp_min(1e-30))
    groups = [{"params": [model.log_amplitude, model.log_width], "lr": lr_scalars}]
    if fit_positions:
        groups.append({"params": [model.positions], "lr": lr_positions})
    widths = model.widths.detach()
    many_widths = widths.dim() > 0 and torch.unique(widths).numel() > MAX_SPLAT_WIDTH_CLASSES
    if many_widths:
        _fit_exact(model, vol, scale, n_steps, groups)
        with torch.no_grad():
            model.fit_correlation = map_correlation(model.render(vol.shape[-1]), vol)
    else:
        _fit_splat(model, vol, scale, n_steps, groups)
        with torch.no_grad():
            model.fit_correlation = _fit_correlation(model, vol)
    return model.fit_correlation


def initialize_from_map(
    volume: Tensor,
    n_gaussians: int,
    threshold: float | None = None,
    generator: torch.Generator | None = None,
    n_steps: int = 150,
) -> GaussianModel:
    """Fill the map ``(N, N, N)`` above ``threshold`` (default :func:`auto_threshold`) with Gaussians and fit.

    Points are uniform inside the selected voxels; the initial σ is the mean distance to the two nearest
    neighbours; then :func:`fit_to_map`.  Raises :class:`InputError` when no voxel is selected.  The
    returned model lives on the map's device and has ``fit_correlation`` set.
    """
    if threshold is None:
        threshold = auto_threshold(volume, n_gaussians)
    points = _sample_points(volume, threshold, int(n_gaussians), generator).to(volume.device)
    n_gaussians = points.shape[0]
    width = max(mean_neighbour_distance(points), 0.5) if points.shape[0] > 2 else 2.0
    model = GaussianModel(points, 1.0, width)
    corr = fit_to_map(model, volume, n_steps=n_steps)
    log.info(
        "Consensus model: %d Gaussians above threshold %.4g, sigma %.2f px, correlation with the map %.3f",
        n_gaussians, threshold, float(model.widths.detach()), corr,
    )
    return model


def from_atomic_model(path: str | Path, box: int, pixel_size: float) -> tuple[GaussianModel, Tensor]:
    """Coarse-grain a PDB/mmCIF file → ``(GaussianModel, edges (E, 2) long)``; see :func:`coarse_grain`.

    Coordinates are Å with the origin at the map's first voxel (as RELION and ChimeraX place a map whose
    header origin is 0), so ``pixel = coordinate / pixel_size − N // 2`` on each axis (x, y, z).
    """
    centres, weights, edges = coarse_grain(path)
    points = torch.as_tensor(centres, dtype=torch.float32) / float(pixel_size) - box // 2
    outside = int(((points.abs() > box / 2).any(dim=1)).sum())
    if outside * 2 > len(points):
        raise InputError(f"{path}: {outside} of {len(points)} coarse-grained atoms lie outside the {box}-pixel box "
                         f"at {pixel_size:g} Å/px; fit the model into the consensus map (same origin) and save it "
                         "again")
    if outside:
        log.warning("WARNING: %d of %d coarse-grained Gaussians from %s lie outside the box", outside, len(points),
                    path)
    z = torch.as_tensor(weights, dtype=torch.float32)
    width = max(mean_neighbour_distance(points), 0.5) if points.shape[0] > 2 else 1.0
    model = GaussianModel(points, 1.0, width, relative_amplitudes=z / z.mean())
    return model, torch.as_tensor(edges, dtype=torch.long).reshape(-1, 2)


# ---------------------------------------------------------------------------------------------------------
# Coarse-graining of atomic models (paper, Methods "Initialization of the reference model")

_BACKBONE = {"N", "C", "O", "OXT"}
_PHOSPHATE = {"P", "OP1", "OP2", "OP3", "O1P", "O2P", "O3P"}
_RING_SPLIT = {  # residues whose remaining side chain is split in two groups
    "TYR": ({"CD1", "CD2", "CE1", "CE2"}, {"CZ", "OH"}),
    "TRP": ({"CD1", "CD2", "NE1", "CE2"}, {"CE3", "CZ2", "CZ3", "CH2"}),
}


def _remoteness(atom_name: str) -> str:
    """Greek position letter of an amino-acid atom name (``CA`` → A, ``OG1`` → G); '' when unknown."""
    return atom_name[1] if len(atom_name) > 1 else ""


def _amino_acid_groups(name: str, atoms: dict[str, tuple]) -> list[list[str]]:
    """Backbone (N, C, O), then α–γ side chain (α–δ for PRO), then the rest (two groups for TYR/TRP)."""
    first_letters = {"A", "B", "G", "D"} if name == "PRO" else {"A", "B", "G"}
    backbone = [a for a in atoms if a in _BACKBONE]
    first = [a for a in atoms if a not in _BACKBONE and _remoteness(a) in first_letters]
    rest = [a for a in atoms if a not in _BACKBONE and a not in first]
    groups = [backbone, first]
    if name in _RING_SPLIT and rest:
        a, b = _RING_SPLIT[name]
        groups += [[x for x in rest if x in a], [x for x in rest if x not in a]]
    else:
        groups.append(rest)
    return groups


def _nucleotide_groups(atoms: dict[str, tuple]) -> list[list[str]]:
    """Phosphate, sugar (primed names), base split into halves nearer / farther from C1'."""
    phosphate = [a for a in atoms if a in _PHOSPHATE]
    sugar = [a for a in atoms if ("'" in a or "*" in a) and a not in _PHOSPHATE]
    base = [a for a in atoms if a not in phosphate and a not in sugar]
    ref = atoms.get("C1'") or atoms.get("C1*")
    if ref is None and sugar:
        ref = tuple(sum(atoms[a][k] for a in sugar) / len(sugar) for k in range(3))
    if ref is not None:
        base.sort(key=lambda a: sum((atoms[a][k] - ref[k]) ** 2 for k in range(3)))
    half = (len(base) + 1) // 2
    return [phosphate, sugar, base[:half], base[half:]]


def _bonded(a: tuple | None, b: tuple | None, limit: float = 2.0) -> bool:
    return a is not None and b is not None and sum((a[k] - b[k]) ** 2 for k in range(3)) <= limit**2


def coarse_grain(path: str | Path) -> tuple[list[tuple], list[float], list[tuple[int, int]]]:
    """Coarse-grained centres (Å), combined atomic numbers and bond edges of a PDB/mmCIF file.

    First model, hydrogens, waters and alternative conformations removed; only polymer residues (amino
    acids and nucleotides) are used.  Per amino acid: backbone N/C/O, the α–γ side-chain atoms (α–δ for
    PRO), the remaining side-chain atoms (two groups for TYR and TRP); per nucleotide: phosphate, sugar,
    two base halves.  Empty groups are skipped.  Edges: groups of one residue in a chain (backbone → first
    side-chain group → ...; phosphate → sugar → base → base), and backbone/sugar to the next residue's
    backbone/phosphate when the C–N (or O3'–P) bond is present (≤ 2 Å).
    """
    import gemmi

    from relion_dynamight.relion.atomic_model import read_structure

    st = read_structure(path, "--atomic-model")
    centres: list[tuple] = []
    weights: list[float] = []
    edges: list[tuple[int, int]] = []
    for chain in st[0]:
        prev_link: tuple | None = None  # (atom position that bonds to the next residue, its group index)
        for res in chain:
            info = gemmi.find_tabulated_residue(res.name)
            if info is None or not (info.is_amino_acid() or info.is_nucleic_acid()):
                prev_link = None
                continue
            atoms = {a.name: (a.pos.x, a.pos.y, a.pos.z) for a in res}
            znum = {a.name: float(a.element.atomic_number) for a in res}
            protein = info.is_amino_acid()
            groups = _amino_acid_groups(res.name, atoms) if protein else _nucleotide_groups(atoms)
            index: list[int | None] = []
            for g in groups:
                if not g:
                    index.append(None)
                    continue
                centres.append(tuple(sum(atoms[a][k] for a in g) / len(g) for k in range(3)))
                weights.append(sum(znum[a] for a in g))
                index.append(len(centres) - 1)
            present = [i for i in index if i is not None]
            edges += list(zip(present[:-1], present[1:]))
            if protein:
                head_atom, head = atoms.get("N"), index[0]
            else:
                head_atom, head = atoms.get("P"), index[0] if index[0] is not None else index[1]
            if prev_link is not None and head is not None and _bonded(prev_link[0], head_atom):
                edges.append((prev_link[1], head))
            tail_atom = atoms.get("C") if protein else atoms.get("O3'", atoms.get("O3*"))
            tail = index[0] if protein else index[1]
            prev_link = (tail_atom, tail) if tail is not None else None
    if not centres:
        raise InputError(f"atomic model {path} contains no amino-acid or nucleotide residues")
    return centres, weights, edges
