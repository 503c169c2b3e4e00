"""``relion_dynamight simulate``: a ready RELION project with a flexible data set whose truth is known.

Layout written under ``out_dir`` (paths relative to it, i.e. to the RELION project directory)::

    default_pipeline.star                        RELION 5 pipeline with the Refine3D/job001/ process
    Extract/job001/Movies/micNNN.mrcs            one stack per micrograph; optics group 1 float32 (mode 2),
                                                 group 2 float16 (mode 12) unless ``float16_groups`` says otherwise
    Refine3D/job001/run_data.star                RELION 3.1+ particles (data_optics + data_particles)
    Refine3D/job001/run_class001.mrc             consensus map reconstructed from all particles
    Refine3D/job001/run_half{1,2}_class001_unfil.mrc   half maps from rlnRandomSubset 1 / 2
    truth/phantom.json                           Gaussians of the reference conformation, moving domain, hinge
    truth/particles.csv                          per-particle hinge angle, pose, origin, CTF, subset
    truth/map_reference.mrc, truth/map_motion_K.mrc    true maps at angle 0 and along the motion

Physics: images = CTF · projection translated by −origin (+ white Gaussian noise of variance
``signal variance / snr``, the signal variance being the mean over the first batch of the clean images'
variance over the whole box; ``snr = 0`` → no noise; own torch generator), with the projection made by
:func:`relion_dynamight.imaging.gaussians.project_gaussians` (oversample 2) of the particle's own
conformation.  Poses are uniform on SO(3) (random unit quaternions); origins uniform in
±``max_shift`` pixels; per micrograph one strongly astigmatic CTF (defocus U 1–3 µm, V = U − 0.15…0.4 µm,
random angle); micrographs alternate between two optics groups (300 kV / 2.7 mm / Q0 0.1 and
200 kV / 1.4 mm / Q0 0.07, same pixel size and box) and, per pair, between the two random subsets, so
``rlnRandomSubset`` is constant per micrograph and both subsets hold both optics groups.

Maps: the half maps and the consensus are reconstructed from the written particles with the
project's own Fourier backprojection (:class:`relion_dynamight.imaging.backprojection.FourierAccumulator`,
weights with a floor as RELION 4/5's ``--skip_gridding``, FSC-based Wiener term like RELION's last iteration).
Should that module be missing, the maps fall back to rendered averages over the particles' hinge angles.

Scale: images are in the phantom's density units × pixels (not normalised to unit noise like RELION's
Extract), so reconstructions of them are on the scale of the true maps in ``truth/``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import starfile
import torch
from torch import Tensor

from relion_dynamight.analysis.phantom_images import clean_images, particle_ctf, particle_poses
from relion_dynamight.analysis.phantom import Phantom, adk_phantom, builtin_phantom, load_phantom, phantom_from_atoms
from relion_dynamight.errors import InputError
from relion_dynamight.imaging.ctf import ctf_2d
from relion_dynamight.imaging.fourier import fsc as fourier_shell_correlation
from relion_dynamight.imaging.gaussians import render_volume
from relion_dynamight.imaging.geometry import matrix_to_euler
from relion_dynamight.relion.mrc import write_map, write_stack

log = logging.getLogger("relion_dynamight")

REFINE_DIR = "Refine3D/job001"
EXTRACT_DIR = "Extract/job001"
RUN_DATA = f"{REFINE_DIR}/run_data.star"
CONSENSUS = f"{REFINE_DIR}/run_class001.mrc"
HALF_MAPS = (f"{REFINE_DIR}/run_half1_class001_unfil.mrc", f"{REFINE_DIR}/run_half2_class001_unfil.mrc")
LIMIT_DIR = "truth/limit"
LIMIT_STAR = f"{LIMIT_DIR}/particles.star"
MOTIONS = ("hinge", "none", "adk")
#: Conformation coordinate range of the adenylate-kinase path: −0.5 closed … +0.5 open.
ADK_RANGE = 0.5

#: The two optics groups: same pixel size and box, different microscopes.
OPTICS = (
    {"rlnOpticsGroupName": "opticsGroup1", "rlnVoltage": 300.0, "rlnSphericalAberration": 2.7,
     "rlnAmplitudeContrast": 0.1},
    {"rlnOpticsGroupName": "opticsGroup2", "rlnVoltage": 200.0, "rlnSphericalAberration": 1.4,
     "rlnAmplitudeContrast": 0.07},
)


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------
def run(job: object, output: Path, n_particles: int = 2000, box: int = 64, pixel_size: float = 3.0,
        snr: float = 0.1, motion: str = "hinge", pdb: Path | None = None, seed: int = 0,
        envelope_bfactor: float = 0.0, snr_region: str = "box", limit: bool = False) -> None:
    """CLI task: refuse to overwrite an existing project, then :func:`simulate_project`."""
    out = Path(output)
    for existing in (RUN_DATA, "default_pipeline.star"):
        if (out / existing).exists():
            raise InputError(f"{out / existing}: already exists; choose a new --o directory or delete it")
    check = getattr(job, "check_abort", None)
    result = simulate_project(out, n_particles=n_particles, box=box, pixel_size=pixel_size, snr=snr, motion=motion,
                              pdb=pdb, seed=seed, envelope_bfactor=envelope_bfactor, snr_region=snr_region,
                              limit=limit, check_abort=check)
    log.info("Simulated %d particles (box %d, %.3g Å/px, SNR %g, motion %s) in %s", n_particles, box, pixel_size,
             snr, motion, out)
    log.info("Particles: %s; consensus map: %s; truth: %s", result["star"], result["consensus"], result["truth"])
    return None


def simulate_project(out_dir: Path, n_particles: int = 2000, box: int = 64, pixel_size: float = 3.0,
                     snr: float = 0.1, motion: str = "hinge", pdb: Path | None = None, seed: int = 0, *,
                     max_angle: float = 20.0, max_shift: float = 3.0, float16_groups: Sequence[int] = (2,),
                     n_micrographs: int | None = None, batch_size: int = 256, envelope_bfactor: float = 0.0,
                     snr_region: str = "box", limit: bool = False,
                     check_abort: Callable[[], None] | None = None) -> dict:
    """Write a simulated RELION project into ``out_dir`` (see module docstring) and describe it.

    Returns a dict: ``project``, ``star``, ``consensus``, ``half1``, ``half2``, ``truth``, ``pipeline``
    (paths), ``reference_map`` and ``motion_maps`` (list of ``(angle, path)``), ``phantom``
    (:class:`Phantom`), ``hinge_angles`` (``(n,)`` degrees, STAR row order), ``particles`` (the
    particle DataFrame), ``noise_sigma``, ``fsc`` (half-map FSC per shell), ``reconstruction`` (how
    the maps were made).  ``float16_groups=()`` writes float32 stacks only (RELION 3.1 cannot read
    float16).  ``check_abort`` is called between batches.

    Realism options: ``motion="adk"`` (adenylate kinase's LID and NMP domains between its closed and open
    structures, :func:`~relion_dynamight.analysis.phantom.adk_phantom`; coordinate uniform in ±0.5);
    ``envelope_bfactor`` (Å²) damps the images by ``exp(−B s²/4)`` without saying so in the STAR file (the
    data's own envelope); ``snr_region="disc"`` measures the signal variance inside the particle's disc (its
    largest radius over the motion plus 3 σ) instead of the whole box; ``limit=True`` also writes the same
    particles (poses, CTFs, envelope and noise) all in the reference conformation: ``truth/limit/particles.star``
    with its stacks, the best any flexibility correction can do.
    """
    _validate(n_particles, box, pixel_size, snr, motion, max_angle, float16_groups)
    if snr_region not in ("box", "disc"):
        raise InputError(f"--snr-region {snr_region!r}: use 'box' or 'disc'")
    if not envelope_bfactor >= 0 or not math.isfinite(envelope_bfactor):
        raise InputError(f"--envelope-bfactor {envelope_bfactor}: must be a finite B-factor >= 0 (Å²)")
    out_dir = Path(out_dir)
    phantom = _phantom(motion, pdb, box, pixel_size)
    spread = ADK_RANGE if motion == "adk" else max_angle
    rng = np.random.default_rng(seed)
    n_mics = n_micrographs or int(np.clip(n_particles // 40, 4, 500))
    n_mics = max(2, min(n_mics, n_particles))
    optics = _optics_table(box, pixel_size)
    particles, angles = _particle_table(n_particles, n_mics, pixel_size, motion, spread, max_shift, rng)
    writer = _StackWriter(out_dir, particles, pixel_size, tuple(float16_groups))
    limit_particles = _limit_names(particles) if limit else None
    limit_writer = (_StackWriter(out_dir, limit_particles, pixel_size, tuple(float16_groups))
                    if limit_particles is not None else None)
    noise_gen = torch.Generator().manual_seed(int(seed) * 7919 + 17)
    accumulators = _new_accumulators(box)
    noise_sigma: float | None = None if snr > 0 else 0.0
    disc = _disc(phantom, spread if motion != "none" else 0.0, box) if snr_region == "disc" else None
    for rows in writer.batches(batch_size, phantom.positions.shape[0]):
        if check_abort is not None:
            check_abort()
        clean = clean_images(phantom, particles.iloc[rows], optics, angles[rows], box, pixel_size, envelope_bfactor)
        if noise_sigma is None:
            signal = clean[:, disc] if disc is not None else clean.flatten(1)
            noise_sigma = math.sqrt(float(signal.var(dim=-1).mean()) / snr)
        noise = noise_sigma * torch.randn(clean.shape, generator=noise_gen, dtype=clean.dtype)
        written = writer.write(rows, (clean + noise).numpy())
        _insert(accumulators, particles.iloc[rows], optics, torch.from_numpy(written), box, pixel_size)
        if limit_writer is not None:
            still = clean_images(phantom, particles.iloc[rows], optics, np.zeros(len(rows)), box, pixel_size,
                                  envelope_bfactor)
            limit_writer.write(rows, (still + noise).numpy())
    _write_star(out_dir / RUN_DATA, optics, particles)
    if limit_particles is not None:
        _write_star(out_dir / LIMIT_STAR, optics, limit_particles)
    half1, half2, consensus, curve, how = _reconstruct(accumulators, phantom, angles, particles, box)
    paths = {"consensus": write_map(out_dir / CONSENSUS, consensus.numpy(), pixel_size),
             "half1": write_map(out_dir / HALF_MAPS[0], half1.numpy(), pixel_size),
             "half2": write_map(out_dir / HALF_MAPS[1], half2.numpy(), pixel_size)}
    truth = _write_truth(out_dir / "truth", phantom, particles, angles, motion, spread, snr,
                         float(noise_sigma or 0.0), seed, envelope_bfactor, snr_region)
    pipeline = _write_pipeline(out_dir)
    (out_dir / REFINE_DIR / "RELION_JOB_EXIT_SUCCESS").touch()
    return {"project": out_dir, "star": out_dir / RUN_DATA, **paths, "truth": out_dir / "truth", "pipeline": pipeline,
            "reference_map": truth["reference_map"], "motion_maps": truth["motion_maps"], "phantom": phantom,
            "hinge_angles": angles, "particles": particles, "noise_sigma": float(noise_sigma or 0.0),
            "fsc": curve.tolist(), "reconstruction": how}


def _phantom(motion: str, pdb: Path | None, box: int, pixel_size: float) -> Phantom:
    if motion == "adk":
        if pdb:
            raise InputError("--motion adk uses the shipped adenylate kinase structures; drop --pdb")
        return adk_phantom(box, pixel_size)
    return phantom_from_atoms(Path(pdb), box, pixel_size) if pdb else builtin_phantom(box, pixel_size)


def _disc(phantom: Phantom, spread: float, box: int) -> Tensor:
    """Pixels ``(box, box)`` bool inside the particle's largest radius over the motion (+3 σ)."""
    coords = torch.tensor([-spread, 0.0, spread], dtype=torch.float64)
    radius = float(phantom.true_positions(coords).norm(dim=-1).max()) + 3 * float(phantom.widths.max())
    c = torch.arange(box, dtype=torch.float64) - box // 2
    return (c[:, None] ** 2 + c[None, :] ** 2) <= min(radius, box / 2) ** 2


def _limit_names(particles: pd.DataFrame) -> pd.DataFrame:
    """The particle table with image names in ``truth/limit/`` (the same particles in one conformation)."""
    out = particles.copy()
    out["rlnImageName"] = out["rlnImageName"].str.replace(f"@{EXTRACT_DIR}/", f"@{LIMIT_DIR}/", regex=False)
    return out


def true_positions(truth: Path | Phantom, angles_deg: Tensor | float) -> Tensor:
    """True Gaussian positions (pixels from the box centre) at hinge angle(s): ``(M, 3)`` or ``(B, M, 3)``.

    ``truth`` is a project directory, its ``truth/`` folder, ``truth/phantom.json`` or a :class:`Phantom`.
    Per-particle angles are in ``truth/particles.csv`` (column ``hinge_angle``).
    """
    if not isinstance(truth, Phantom):
        path = Path(truth)
        if (path / "truth").is_dir():
            path = path / "truth"
        truth = load_phantom(path)
    return truth.true_positions(angles_deg)


def load_truth(project_dir: Path) -> tuple[Phantom, pd.DataFrame]:
    """The phantom and the per-particle truth table (rows in ``run_data.star`` order) of a project."""
    truth = Path(project_dir) / "truth"
    return load_phantom(truth), pd.read_csv(truth / "particles.csv")


# ---------------------------------------------------------------------------------------------
# metadata
# ---------------------------------------------------------------------------------------------
def _validate(n: int, box: int, pixel: float, snr: float, motion: str, max_angle: float,
              float16_groups: Sequence[int]) -> None:
    if n < 4:
        raise InputError(f"--n-particles {n}: need at least 4 particles (two per random subset)")
    if box < 16 or box % 2:
        raise InputError(f"--box {box}: use an even box of at least 16 pixels")
    if not pixel > 0:
        raise InputError(f"--pixel-size {pixel}: must be positive (Å per pixel)")
    if not snr >= 0 or not math.isfinite(snr):
        raise InputError(f"--snr {snr}: must be a finite number >= 0 (0 = no noise)")
    if motion not in MOTIONS:
        raise InputError(f"--motion {motion}: use one of {', '.join(MOTIONS)}")
    if not 0 <= max_angle <= 180:
        raise InputError(f"max_angle {max_angle}: use 0..180 degrees")
    if set(float16_groups) - {1, 2}:
        raise InputError(f"float16_groups {tuple(float16_groups)}: optics groups are 1 and 2")


def _optics_table(box: int, pixel: float) -> pd.DataFrame:
    rows = []
    for i, group in enumerate(OPTICS, start=1):
        rows.append({"rlnOpticsGroupName": group["rlnOpticsGroupName"], "rlnOpticsGroup": i,
                     "rlnMicrographOriginalPixelSize": pixel, "rlnVoltage": group["rlnVoltage"],
                     "rlnSphericalAberration": group["rlnSphericalAberration"],
                     "rlnAmplitudeContrast": group["rlnAmplitudeContrast"], "rlnImagePixelSize": pixel,
                     "rlnImageSize": box, "rlnImageDimensionality": 2})
    return pd.DataFrame(rows)


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` rotation matrices uniform on SO(3) (normalised Gaussian quaternions) → ``(n, 3, 3)``."""
    q = rng.standard_normal((n, 4))
    w, x, y, z = (q / np.linalg.norm(q, axis=1, keepdims=True)).T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], axis=-2)


def _particle_table(n: int, n_mics: int, pixel: float, motion: str, max_angle: float, max_shift: float,
                    rng: np.random.Generator) -> tuple[pd.DataFrame, np.ndarray]:
    """Particles sorted by micrograph, with poses, origins, CTFs, optics groups and subsets."""
    mic_of = np.sort(np.concatenate([np.arange(n_mics), rng.integers(0, n_mics, n - n_mics)]))  # none empty
    mic_group = np.arange(n_mics) % 2 + 1                  # alternate optics groups
    mic_subset = (np.arange(n_mics) // 2) % 2 + 1          # pairs alternate subsets: both groups in both
    if n_mics < 4:                                         # too few micrographs for that pattern
        mic_subset = np.arange(n_mics) % 2 + 1
    du = rng.uniform(10000.0, 30000.0, n_mics)
    dv = du - rng.uniform(1500.0, 4000.0, n_mics)
    dang = rng.uniform(-180.0, 180.0, n_mics)
    rot, tilt, psi = (np.round(a.numpy(), 6) for a in matrix_to_euler(torch.from_numpy(random_rotations(n, rng))))
    origins = np.round(rng.uniform(-max_shift, max_shift, (n, 2)) * pixel, 6)
    angles = rng.uniform(-max_angle, max_angle, n) if motion != "none" else np.zeros(n)
    stack_index = np.zeros(n, dtype=np.int64)
    for j in range(n_mics):
        members = np.nonzero(mic_of == j)[0]
        stack_index[members] = np.arange(1, len(members) + 1)
    particles = pd.DataFrame({
        "rlnCoordinateX": np.round(rng.uniform(100, 3900, n), 1),
        "rlnCoordinateY": np.round(rng.uniform(100, 3900, n), 1),
        "rlnImageName": [f"{k:06d}@{EXTRACT_DIR}/Movies/mic{j + 1:03d}.mrcs" for k, j in zip(stack_index, mic_of)],
        "rlnMicrographName": [f"MotionCorr/job001/Movies/mic{j + 1:03d}.mrc" for j in mic_of],
        "rlnOpticsGroup": mic_group[mic_of],
        "rlnAngleRot": rot, "rlnAngleTilt": tilt, "rlnAnglePsi": psi,
        "rlnOriginXAngst": origins[:, 0], "rlnOriginYAngst": origins[:, 1],
        "rlnDefocusU": np.round(du[mic_of], 2), "rlnDefocusV": np.round(dv[mic_of], 2),
        "rlnDefocusAngle": np.round(dang[mic_of], 3), "rlnPhaseShift": np.zeros(n), "rlnCtfBfactor": np.zeros(n),
        "rlnCtfScalefactor": np.ones(n), "rlnClassNumber": np.ones(n, dtype=np.int64),
        "rlnGroupNumber": mic_group[mic_of], "rlnNormCorrection": np.ones(n),
        "rlnRandomSubset": mic_subset[mic_of],
    })
    return particles, angles


class _StackWriter:
    """Writes one ``.mrcs`` per micrograph, batch by batch (whole micrographs per batch)."""

    def __init__(self, out_dir: Path, particles: pd.DataFrame, pixel: float, float16_groups: tuple[int, ...]):
        self.out_dir = out_dir
        self.pixel = pixel
        self.float16_groups = float16_groups
        names = particles["rlnImageName"].str.split("@", n=1).str[1]
        self.stacks = names.to_numpy()
        self.groups = particles["rlnOpticsGroup"].to_numpy()
        _, first = np.unique(self.stacks, return_index=True)
        self.starts = np.sort(first).tolist() + [len(particles)]  # particles are sorted by micrograph

    def batches(self, batch_size: int, n_gaussians: int) -> list[np.ndarray]:
        """Row index arrays of whole micrographs, about ``batch_size`` particles each (fewer for big models)."""
        limit = max(8, min(batch_size, 2_000_000 // max(n_gaussians, 1)))
        out, start = [], 0
        for end in self.starts[1:]:
            if end - start >= limit or end == self.starts[-1]:
                out.append(np.arange(start, end))
                start = end
        return out

    def write(self, rows: np.ndarray, images: np.ndarray) -> np.ndarray:
        """Write the stacks of ``rows`` (whole micrographs); returns the images as stored (float16-rounded)."""
        stored = images.astype(np.float32)
        for name in dict.fromkeys(self.stacks[rows]):
            sel = np.nonzero(self.stacks[rows] == name)[0]
            half = int(self.groups[rows[sel[0]]]) in self.float16_groups
            if half:
                stored[sel] = stored[sel].astype(np.float16).astype(np.float32)
            write_stack(self.out_dir / name, stored[sel], self.pixel, float16=half)
        return stored


# ---------------------------------------------------------------------------------------------
# reconstruction of the consensus and half maps
# ---------------------------------------------------------------------------------------------
def _new_accumulators(box: int) -> list | None:
    try:
        from relion_dynamight.imaging.backprojection import FourierAccumulator
    except ImportError:  # the reconstruction engine is not available: fall back to rendered maps
        return None
    return [FourierAccumulator(box), FourierAccumulator(box)]


def _insert(accumulators: list | None, particles: pd.DataFrame, optics: pd.DataFrame, images: Tensor, box: int,
            pixel: float) -> None:
    if accumulators is None:
        return
    from relion_dynamight.imaging.backprojection import prepare_spectra

    rotations, origins = particle_poses(particles, pixel)
    ctf = ctf_2d(particle_ctf(particles, optics, pixel), box)
    subset = torch.tensor(particles["rlnRandomSubset"].to_numpy())
    spectra, weights = prepare_spectra(images, origins, ctf)
    for k, acc in enumerate(accumulators, start=1):
        sel = (subset == k).nonzero().squeeze(1)
        acc.insert(spectra[sel], weights[sel], rotations[sel])


def _reconstruct(accumulators: list | None, phantom: Phantom, angles: np.ndarray, particles: pd.DataFrame,
                 box: int) -> tuple[Tensor, Tensor, Tensor, Tensor, str]:
    """Half maps, consensus, half-map FSC and a description of the method."""
    if accumulators is None:
        # TODO: remove once relion_dynamight.imaging.backprojection is always present.
        maps = []
        for k in (1, 2):
            sel = particles["rlnRandomSubset"].to_numpy() == k
            maps.append(_mean_rendered(phantom, angles[sel], box))
        consensus = _mean_rendered(phantom, angles, box)
        return maps[0], maps[1], consensus, fourier_shell_correlation(maps[0], maps[1]), "rendered mean conformation"
    from relion_dynamight.imaging.backprojection import FourierAccumulator, wiener_term_from_fsc

    # "floor" weights (RELION 4/5 --skip_gridding): 10x cheaper than Pipe & Menon and as good here.
    raw = [acc.reconstruct(method="floor") for acc in accumulators]
    curve = fourier_shell_correlation(raw[0], raw[1])
    halves = [acc.reconstruct(wiener=wiener_term_from_fsc(acc.weight_grid(), curve, box), method="floor")
              for acc in accumulators]
    both = FourierAccumulator(box).add_(accumulators[0]).add_(accumulators[1])
    consensus = both.reconstruct(wiener=wiener_term_from_fsc(both.weight_grid(), curve, box, whole_map=True),
                                 method="floor")
    return halves[0], halves[1], consensus, curve, "relion_dynamight.imaging.backprojection (floor weights, FSC Wiener)"


def _mean_rendered(phantom: Phantom, angles: np.ndarray, box: int, bins: int = 9) -> Tensor:
    """Average of rendered maps over the distribution of hinge angles (histogram with ``bins`` bins)."""
    if len(angles) == 0 or float(np.ptp(angles)) == 0.0:
        return render_volume(phantom.true_positions(float(angles[0]) if len(angles) else 0.0), phantom.amplitudes,
                             phantom.widths, box).float()
    counts, edges = np.histogram(angles, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    total = torch.zeros(box, box, box, dtype=torch.float64)
    for c, w in zip(centres, counts):
        if w:
            total += w * render_volume(phantom.true_positions(float(c)), phantom.amplitudes, phantom.widths, box)
    return (total / counts.sum()).float()


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
def _write_star(path: Path, optics: pd.DataFrame, particles: pd.DataFrame) -> None:
    """RELION 3.1+ particle STAR (``# version 30001``, data_optics + data_particles)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    starfile.write({"optics": optics, "particles": particles}, tmp, overwrite=True)
    body = "\n".join(line for line in tmp.read_text().splitlines() if not line.startswith("# Created by"))
    path.write_text(f"\n# version 30001\n\n{body.strip()}\n\n")
    tmp.unlink()


def _write_truth(truth_dir: Path, phantom: Phantom, particles: pd.DataFrame, angles: np.ndarray, motion: str,
                 max_angle: float, snr: float, noise_sigma: float, seed: int, envelope_bfactor: float = 0.0,
                 snr_region: str = "box") -> dict:
    """``particles.csv`` (conformation coordinate per particle), true maps and ``phantom.json``."""
    truth_dir.mkdir(parents=True, exist_ok=True)
    table = particles[["rlnImageName", "rlnMicrographName", "rlnOpticsGroup", "rlnRandomSubset", "rlnAngleRot",
                       "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnDefocusU",
                       "rlnDefocusV", "rlnDefocusAngle"]].copy()
    table.insert(0, "hinge_angle", angles)
    table.to_csv(truth_dir / "particles.csv", index=False)
    limit = max_angle if motion != "none" else 0.0
    motion_angles = np.linspace(-limit, limit, 5) if motion != "none" else np.zeros(1)
    unit = "degrees" if motion == "hinge" else "(−0.5 closed, +0.5 open)" if motion == "adk" else ""
    reference = write_map(truth_dir / "map_reference.mrc", _render(phantom, 0.0), phantom.pixel_size)
    maps = []
    for k, a in enumerate(motion_angles):
        maps.append((float(a), write_map(truth_dir / f"map_motion_{k}.mrc", _render(phantom, float(a)),
                                         phantom.pixel_size)))
    phantom.save(truth_dir / "phantom.json", extra={
        "motion": motion, "max_angle": limit, "angle_distribution": f"uniform in [-{limit}, {limit}] {unit}".strip(),
        "snr": snr, "snr_region": snr_region, "noise_sigma": noise_sigma, "seed": seed,
        "envelope_bfactor": envelope_bfactor,
        "reference_map": "map_reference.mrc",
        "motion_maps": [{"angle": a, "file": p.name} for a, p in maps],
        "particles": "particles.csv (rows in Refine3D/job001/run_data.star order; hinge_angle = the conformation "
                     f"coordinate, {unit or 'always 0'})",
    })
    return {"reference_map": reference, "motion_maps": maps}


def _render(phantom: Phantom, angle: float) -> np.ndarray:
    return render_volume(phantom.true_positions(angle), phantom.amplitudes, phantom.widths, phantom.box).numpy()


def _write_pipeline(out_dir: Path) -> Path:
    """A RELION 5 ``default_pipeline.star`` with the Refine3D job and its output nodes."""
    from relion_dynamight.relion.pipeline import Pipeline, write_pipeline

    pipe = Pipeline(version="5", job_counter=2)
    process = f"{REFINE_DIR}/"
    pipe.add_process(process, "relion.refine3d", status="Succeeded")
    pipe.add_output_edge(process, RUN_DATA, "ParticleGroupMetadata.star.relion.refine3d")
    pipe.add_output_edge(process, CONSENSUS, "DensityMap.mrc.relion.refine3d")
    pipe.add_output_edge(process, HALF_MAPS[0], "DensityMap.mrc.relion.halfmap.refine3d")
    return write_pipeline(out_dir, pipe)
