"""``explore-latent-space DIR --half-set H``: headless latent-space analysis (and the napari viewer).

Reads ``DIR/forward_deformations/latent_space.star`` (one row per particle: ``rlnImageName``,
``rlnRandomSubset``, ``dmValidation``, ``dmLatent1..L``), the training checkpoint (both halves' Gaussian
models, encoders and decoders) and the refinement's particle STAR file, then writes to
``DIR/explore/half{H}/``:

* ``figures/latent_*.png``: PCA embedding (UMAP too when ``umap-learn`` is installed) coloured by motion
  amount and direction, density, pose angles and defocus; ``nuisance.csv``: how much of each nuisance
  variable the latent explains (R², |correlation|).
* ``embedding.csv``: per particle its STAR row, PCA coordinates (the coordinates polygons refer to),
  cluster, motion.
* ``maps/consensus.mrc``, ``maps/motion_variability.mrc`` and ``maps/motion_mean.mrc`` (Å, per-Gaussian
  motion rendered as a map), ``maps/cluster_KK.mrc`` (``--clusters``), ``maps/point_NNN.mrc``
  (``--latent-points``).
* ``movies/pcK/frame_NNN.mrc`` + ``movies/pcK.gif`` (``--movie-pcs``), ``movies/path/...`` (``--movie-path``).
* ``DIR/subsets/half{H}_*.star`` (clusters, ``--axis-range``, ``--polygon``), declared as output nodes.
* half set 0: ``errors/errors_per_particle.{star,csv}``, ``errors/errors_per_gaussian.{star,csv}``,
  ``maps/error_map.mrc``, figures.
* ``DIR/report.html`` (and a copy in the analysis folder): everything above on one self-contained page.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from relion_dynamight.analysis import explore_figures as figs
from relion_dynamight.analysis import latent as lat
from relion_dynamight.analysis import subsets as sub
from relion_dynamight.analysis.errors import half_set_errors
from relion_dynamight.analysis.report import Section, write_report
from relion_dynamight.errors import InputError
from relion_dynamight.relion.mrc import write_map
from relion_dynamight.training.trained import LATENT_STAR

log = logging.getLogger("relion_dynamight")

SUBSET_LABEL = "ParticleGroupMetadata.star.relion.dynamight"


@dataclass
class LatentTable:
    """Rows of ``latent_space.star`` (input order): ``half (n,)``, ``validation (n,)`` bool, ``z (n, L)``."""

    names: list[str]
    half: np.ndarray
    validation: np.ndarray
    z: Tensor


@dataclass
class ExploreOptions:
    latent_points: Path | None = None
    clusters: int | None = None
    axis_ranges: Sequence[str] = ()
    polygons: Sequence[Path] = ()
    movie_pcs: int = 2
    movie_path: Path | None = None
    n_frames: int = 10
    seed: int = 0
    rigid_body_masks: Sequence[Path] = ()


@dataclass
class ExploreInputs:
    """Everything the analysis needs, already loaded (tests build this directly)."""

    job_dir: Path
    half_set: int
    models: dict[int, lat.DeformableModel]
    latent: LatentTable
    table: Any  # relion.star.ParticleTable of the refinement
    box: int
    pixel_size: float
    #: ``encode(h, rows) -> (len(rows), L)`` latent means from half h's encoder (needed for half set 0).
    encode: Callable[[int, np.ndarray], Tensor] | None = None
    command: str = ""


@dataclass
class Results:
    out_dir: Path
    sections: list[Section] = field(default_factory=list)
    nodes: list[tuple[str, str]] = field(default_factory=list)
    embedding: Tensor | None = None
    rows: np.ndarray | None = None
    z: Tensor | None = None
    pca: lat.Pca | None = None
    colourings: dict[str, tuple[np.ndarray, str]] = field(default_factory=dict)   # name → (per particle, kind)
    gaussian_errors: np.ndarray | None = None    # half set 0: mean deformation error per Gaussian (Å)


# -- entry point ------------------------------------------------------------------------------------
def run(job: Any, output_directory: Path, half_set: int = 1, checkpoint_file: Path | None = None,
        no_gui: bool = False, gpu_id: str = "", latent_points: Path | None = None, clusters: int | None = None,
        axis_range: Sequence[str] = (), polygon: Sequence[Path] = (), movie_pcs: int = 2,
        movie_path: Path | None = None, n_frames: int = 10, refinement_star_file: Path | None = None,
        seed: int = 0, mask_file: Path | None = None, rigid_body_masks: str | None = None,
        **_: Any) -> list[tuple[str, str]]:
    """Run the analysis for ``--half-set`` 0, 1 or 2 and return the subset STAR output nodes."""
    if half_set not in (0, 1, 2):
        raise InputError(f"--half-set {half_set}: use 1 or 2 (that half's particles) or 0 (validation particles, "
                         "error estimates)")
    from relion_dynamight.model.rigid import mask_paths

    options = ExploreOptions(latent_points=latent_points, clusters=clusters, axis_ranges=tuple(axis_range),
                             polygons=tuple(polygon), movie_pcs=movie_pcs, movie_path=movie_path,
                             n_frames=n_frames, seed=seed,
                             rigid_body_masks=tuple(mask_paths(rigid_body_masks)))
    _check_options(options)
    inputs = load_inputs(Path(output_directory), half_set, checkpoint_file, gpu_id, refinement_star_file)
    if options.rigid_body_masks:
        from relion_dynamight.model.rigid import read_body_masks

        read_body_masks(options.rigid_body_masks, inputs.box)      # checked before the analysis
    if mask_file is not None:
        restrict_models(inputs, Path(mask_file))
    inputs.command = shlex.join(["relion_dynamight", *sys.argv[1:]]) if sys.argv else ""
    results = explore(inputs, options, job)
    if not no_gui and gui_possible():
        start_viewer(inputs, results)
    return results.nodes


def start_viewer(inputs: ExploreInputs, results: Results) -> None:
    """Open the napari viewer.  Every file is already written: a viewer that cannot start or crashes is one
    WARNING line, and the job still succeeds with its files (Qt aborts the process when its platform plugin
    cannot start, so that is probed in a child process first)."""
    from relion_dynamight.gui.viewer import launch, viewer_problem

    problem = viewer_problem()
    if problem is None:
        try:
            launch(inputs, results)
            return
        except Exception as exc:  # napari/Qt raise anything; the analysis is done and must not be lost
            problem = f"{type(exc).__name__}: {exc}"
    log.warning("WARNING: the viewer could not start (%s); the figures, maps and subsets are in %s (open "
                "report.html)", " ".join(problem.split())[:300], results.out_dir)


def restrict_models(inputs: ExploreInputs, mask_file: Path) -> None:
    """``--mask-file``: every analysis, map and movie sees the deformations only inside the soft mask
    (:class:`relion_dynamight.analysis.latent.MaskedDecoder`), as ``deformable-backprojection --mask-file``."""
    from relion_dynamight.model.regularizers import mask_to_gaussian_weights
    from relion_dynamight.relion.mrc import read_soft_mask

    mask = torch.from_numpy(read_soft_mask(mask_file, inputs.box, "--mask-file"))
    for h, model in inputs.models.items():
        inside = int((mask_to_gaussian_weights(mask.to(model.device), model.positions) > 0.5).sum())
        log.info("Half %d: deformations restricted to %s: %d of %d Gaussians inside (mask > 0.5)", h, mask_file,
                 inside, model.positions.shape[0])
        inputs.models[h] = lat.restrict_to_mask(model, mask)


def gui_possible() -> bool:
    """A display is set and the optional napari extra is installed (checked without importing it)."""
    import importlib.util

    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        log.info("No display: running headless (figures, maps and subsets are written to files)")
        return False
    if importlib.util.find_spec("napari") is None:
        log.info("napari is not installed: running headless (pip install 'relion-dynamight[gui]' for the viewer)")
        return False
    return True


def _check_options(o: ExploreOptions) -> None:
    if o.n_frames < 2:
        raise InputError(f"--n-frames {o.n_frames}: a movie needs at least 2 frames")
    if o.movie_pcs < 0:
        raise InputError(f"--movie-pcs {o.movie_pcs}: give 0 (no movies) or more")
    if o.clusters is not None and o.clusters < 1:
        raise InputError(f"--clusters {o.clusters}: give at least 1 cluster")
    for p in (o.latent_points, o.movie_path, *o.polygons):
        if p is not None and not Path(p).is_file():
            raise InputError(f"{p}: file not found; check the path")


# -- loading ----------------------------------------------------------------------------------------
def read_latent_star(path: Path) -> LatentTable:
    """Read ``latent_space.star``; clear errors when it is missing or lacks columns."""
    from relion_dynamight.relion.star import read_star

    blocks = read_star(path)
    frame = next((b for b in blocks.values() if any(c.startswith("dmLatent") for c in b.columns)), None)
    if frame is None:
        raise InputError(f"{path}: no dmLatent1.. columns; it was not written by optimize-deformations")
    dims = sorted(int(c[8:]) for c in frame.columns if c.startswith("dmLatent") and c[8:].isdigit())
    if dims != list(range(1, len(dims) + 1)):
        raise InputError(f"{path}: latent columns are dmLatent{dims}, not dmLatent1..dmLatentL; it was not written "
                         "by optimize-deformations (rerun it)")
    for col in ("rlnImageName", "rlnRandomSubset"):
        if col not in frame:
            raise InputError(f"{path}: column _{col} is missing; rerun optimize-deformations")
    try:
        z = torch.as_tensor(frame[[f"dmLatent{d}" for d in dims]].to_numpy(dtype=np.float32))
    except (TypeError, ValueError):
        raise InputError(f"{path}: a dmLatent column holds a non-number; rerun optimize-deformations") from None
    bad = (~torch.isfinite(z).all(dim=1)).nonzero().flatten()
    if bad.numel():
        raise InputError(f"{path}: particle row {int(bad[0]) + 1} has a NaN or Inf latent value; rerun "
                         "optimize-deformations")
    validation = (frame["dmValidation"].to_numpy(dtype=np.int64) != 0 if "dmValidation" in frame
                  else np.zeros(len(frame), dtype=bool))
    return LatentTable(names=[str(v) for v in frame["rlnImageName"]], half=frame["rlnRandomSubset"].to_numpy(np.int64),
                       validation=validation, z=z)


def load_inputs(job_dir: Path, half_set: int, checkpoint_file: Path | None, gpu_id: str,
                refinement_star_file: Path | None) -> ExploreInputs:
    """Latent table, checkpoint models and refinement particles of a trained job directory."""
    from relion_dynamight.parallel.device import choose_device
    from relion_dynamight.parallel.mpi import world
    from relion_dynamight.relion.star import load_particles
    from relion_dynamight.training import checkpoint as ckpt

    device = choose_device(gpu_id, world().local_rank)
    if checkpoint_file is not None:
        state = ckpt.load_checkpoint(Path(checkpoint_file), device)
    else:
        latest = ckpt.load_latest(job_dir, device)
        if latest is None:
            raise InputError(f"{job_dir}: no training checkpoint in {ckpt.checkpoint_dir(job_dir)}; run "
                             f"'relion_dynamight optimize-deformations --output-directory {job_dir} ...' first")
        state = latest
    latent_path = job_dir / LATENT_STAR
    if not latent_path.is_file():
        raise InputError(f"{latent_path} not found: optimize-deformations writes it when training ends; run it "
                         f"to completion (or continue it with --checkpoint-file) before explore-latent-space")
    latent = read_latent_star(latent_path)
    config = state["config"]
    if latent.z.shape[1] != int(config["latent_dim"]):
        raise InputError(f"{latent_path} has {latent.z.shape[1]} latent dimensions but the checkpoint "
                         f"{state.get('path', '')} has {config['latent_dim']}; give the checkpoint of this job")
    star = refinement_star_file or _config_star(config)
    if star is None or not Path(star).is_file():
        if refinement_star_file is not None:
            raise InputError(f"--refinement-star-file {star}: file not found; check the path")
        log.info("Refinement STAR file %s not found: subsets take their columns from %s", star, latent_path)
        star = latent_path
    table = load_particles(star)
    if len(table) != len(latent.names) or table.image_names != latent.names:
        raise InputError(f"{latent_path} does not list the particles of {star} in the same order "
                         f"({len(latent.names)} vs {len(table)} rows); give the STAR file used for training")
    if checkpoint_file is not None and Path(checkpoint_file).resolve() != ckpt.final_path(job_dir).resolve():
        import dataclasses

        from relion_dynamight.training.trained import checkpoint_latents

        codes = checkpoint_latents(state, Path(checkpoint_file), job_dir, device)   # that checkpoint's encoders
        latent = dataclasses.replace(latent, z=codes.to(latent.z.dtype))
    models, trainers = models_from_checkpoint(state, device)
    box = int(config["box"])
    pixel = float(config.get("pixel_size") or table.pixel_sizes[0])

    def encode(h: int, rows: np.ndarray) -> Tensor:
        from relion_dynamight.relion.particles import ParticleData

        data = ParticleData(star)
        return trainers[h].latents(data, np.asarray(rows, dtype=np.int64), lambda: None)

    return ExploreInputs(job_dir=job_dir, half_set=half_set, models=models, latent=latent, table=table, box=box,
                         pixel_size=pixel, encode=encode)


def _config_star(config: dict[str, Any]) -> Path | None:
    for key in ("star_file", "refinement_star_file"):
        if config.get(key):
            return Path(str(config[key]))
    return None


def models_from_checkpoint(state: dict[str, Any], device: torch.device) -> tuple[dict[int, lat.DeformableModel], dict]:
    """Both halves' trained models from a loaded checkpoint → (analysis models, training HalfModels)."""
    from relion_dynamight.training.trained import half_models

    models, trainers = {}, half_models(state, device)
    for h, trainer in trainers.items():
        g = trainer.gaussians
        m = g.positions.shape[0]
        models[h] = lat.DeformableModel(positions=g.positions.detach(), amplitudes=g.amplitudes.detach().expand(m),
                                  widths=g.widths.detach().expand(m), decoder=trainer.decoder,
                                  encoder=trainer.encoder)
    return models, trainers


# -- analysis ---------------------------------------------------------------------------------------
def explore(inputs: ExploreInputs, options: ExploreOptions, job: Any = None) -> Results:
    """The headless analysis (see module docstring); returns the report sections and output nodes."""
    out = inputs.job_dir / "explore" / f"half{inputs.half_set}"
    res = Results(out_dir=out)
    check = job.check_abort if job is not None else (lambda: None)
    if inputs.half_set != 0:
        validate_selections(inputs, options)
    if inputs.half_set == 0:
        _error_analysis(inputs, res, check)
    else:
        _latent_analysis(inputs, options, res, check)
        if options.rigid_body_masks:
            _rigid_bodies(inputs, options, res, check)
        _point_maps(inputs, options, res)
        _movies(inputs, options, res, check)
        _subsets(inputs, options, res)
    title = f"DynaMight latent space: {inputs.job_dir} half set {inputs.half_set}"
    commands = [inputs.command] if inputs.command else []
    commands += [f"relion_reconstruct --i {node} --o {Path(node).with_suffix('')}_rec.mrc --ctf"
                 for node, _ in res.nodes[:3]]
    for path in (out / "report.html", inputs.job_dir / "report.html"):
        write_report(path, title, commands, res.sections)
    log.info("Report: %s", inputs.job_dir / "report.html")
    return res


def validate_selections(inputs: ExploreInputs, o: ExploreOptions) -> None:
    """Check clusters, ranges, polygon and point files before any heavy work (clear one-line errors)."""
    n, dim = len(_half_rows(inputs)), inputs.latent.z.shape[1]
    if o.clusters is not None and o.clusters > n:
        raise InputError(f"--clusters {o.clusters} is more than the {n} particles of half set {inputs.half_set}; "
                         f"ask for at most {n}")
    for spec in o.axis_ranges:
        sub.parse_axis_ranges(spec, dim, _n_pcs(dim))
    for poly in o.polygons:
        sub.read_polygon(poly)
    for points in (o.latent_points, o.movie_path):
        if points is not None:
            parse_points(points, dim)


def _n_pcs(latent_dim: int) -> int:
    return max(2, min(latent_dim, 6))


def _half_rows(inputs: ExploreInputs) -> np.ndarray:
    rows = np.flatnonzero(inputs.latent.half == inputs.half_set)
    if rows.size < 2:
        raise InputError(f"half set {inputs.half_set} has {rows.size} particles in latent_space.star; need at least 2")
    return rows


def _latent_analysis(inputs: ExploreInputs, o: ExploreOptions, res: Results, check: Callable[[], None]) -> None:
    model = inputs.models[inputs.half_set]
    rows = _half_rows(inputs)
    z = inputs.latent.z[rows].to(model.device)
    p = lat.pca(z, _n_pcs(z.shape[1]))
    emb = p.transform(z)[:, :2]
    res.rows, res.z, res.pca, res.embedding = rows, z, p, emb
    log.info("Half %d: %d particles, latent dimension %d; PCA explains %s", inputs.half_set, len(rows), z.shape[1],
             ", ".join(f"{100 * float(e):.0f}%" for e in p.explained[:4]))
    stats = lat.motion_statistics(model, z, on_batch=check)
    px = inputs.pixel_size
    nuisance = _nuisance(inputs.table, rows, z.device)
    out_figs = res.out_dir / "figures"
    panels = [figs.Panel("motion amount (RMS Å)", _np(stats.rms * px)),
              figs.Panel("motion direction", _np(stats.direction() * px)),
              figs.Panel("particle density", _np(lat.density_2d(emb)))]
    panels += [figs.Panel(name, _np(values), "cyclic" if name.startswith("angle") else "continuous")
               for name, values in nuisance.items()]
    clusters = None
    if o.clusters is not None:
        centres, labels = lat.kmeans(z, o.clusters, seed=o.seed)
        clusters = (centres, labels)
        panels.append(figs.Panel(f"k-means clusters (k={o.clusters})", _np(labels + 1), "categorical"))
    res.colourings = {pn.title: (np.asarray(pn.values), pn.kind) for pn in panels}
    res.colourings["particle index"] = (rows + 1.0, "continuous")
    fig_paths = [figs.scatter_panels(out_figs / "latent_pca.png", _np(emb), panels,
                                     suptitle=f"half {inputs.half_set}: latent PCA")]
    fig_paths.append(figs.explained_variance(out_figs / "pca_variance.png", _np(p.explained)))
    umap = lat.umap_embedding(z, seed=o.seed)
    if umap is not None:
        fig_paths.append(figs.scatter_panels(out_figs / "latent_umap.png", _np(umap), panels, "UMAP1", "UMAP2"))
    _write_embedding(res.out_dir / "embedding.csv", rows, emb, stats, px, clusters, inputs.latent.validation)
    nuis_rows = _nuisance_table(nuisance, z, emb)
    pd.DataFrame(nuis_rows, columns=["variable", "R2_latent", "max_abs_corr_PC1_PC2"]).to_csv(
        res.out_dir / "nuisance.csv", index=False)
    res.sections.append(Section(
        "Latent space", text=(f"{len(rows)} particles of half set {inputs.half_set}, latent dimension {z.shape[1]}. "
                              "Coordinates for --polygon and --axis-range pcK are the PCA coordinates in embedding.csv."),
        figures=[(f, f.stem) for f in fig_paths],
        tables=[("Principal components", ["PC", "variance explained", "std"],
                 [[k + 1, float(e), float(s)] for k, (e, s) in enumerate(zip(p.explained, p.std))]),
                ("Nuisance variables: R² of a linear fit from the latent (near 0 = not encoded)",
                 ["variable", "R² from latent", "max |corr| with PC1/PC2"], nuis_rows)],
        files=[(res.out_dir / "embedding.csv", "per-particle coordinates"), (res.out_dir / "nuisance.csv", "")]))
    _gaussian_motion(inputs, model, stats, res, out_figs)
    if clusters is not None:
        _cluster_outputs(inputs, model, clusters, res)


def _nuisance(table: Any, rows: np.ndarray, device: torch.device) -> dict[str, Tensor]:
    values = {}
    angles = table.angles_deg[rows]
    for k, name in enumerate(("rot", "tilt", "psi")):
        values[f"angle {name} (deg)"] = torch.as_tensor(angles[:, k], device=device)
    values["defocus U (Å)"] = torch.as_tensor(table.column("rlnDefocusU")[rows], device=device)
    return {k: v.float() for k, v in values.items()}


def _nuisance_table(nuisance: dict[str, Tensor], z: Tensor, emb: Tensor) -> list[list[Any]]:
    out = []
    for name, v in nuisance.items():
        feats = lat.angular_features(v) if name.startswith("angle") else v[:, None]
        r2 = float(lat.linear_r2(feats, z).max())
        out.append([name, r2, lat.max_abs_correlation(feats, emb)])
    return out


def _write_embedding(path: Path, rows: np.ndarray, emb: Tensor, stats: lat.MotionStats, px: float,
                     clusters: tuple[Tensor, Tensor] | None, validation: np.ndarray) -> None:
    frame = pd.DataFrame({"star_row": rows + 1, "PC1": _np(emb[:, 0]), "PC2": _np(emb[:, 1]),
                          "motion_rms_A": _np(stats.rms * px), "validation": validation[rows].astype(int)})
    if clusters is not None:
        frame["cluster"] = _np(clusters[1] + 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False, float_format="%.6g")


def _gaussian_motion(inputs: ExploreInputs, model: lat.DeformableModel, stats: lat.MotionStats, res: Results,
                     figdir: Path) -> None:
    px, box, maps = inputs.pixel_size, inputs.box, res.out_dir / "maps"
    write_map(maps / "consensus.mrc", _np(lat.render(model.positions, model.amplitudes, model.widths, box)), px)
    write_map(maps / "motion_variability.mrc", _np(lat.gaussian_value_map(model, stats.std * px, box)), px)
    write_map(maps / "motion_mean.mrc", _np(lat.gaussian_value_map(model, stats.mean_abs * px, box)), px)
    pos_a = _np(model.positions * px)
    f1 = figs.gaussian_projections(figdir / "gaussian_motion.png", pos_a, _np(stats.std * px),
                                   "per-Gaussian motion (RMS deviation across particles)")
    np.savetxt(res.out_dir / "gaussian_motion.csv",
               np.column_stack([np.arange(1, len(pos_a) + 1), pos_a, _np(stats.std * px), _np(stats.mean_abs * px)]),
               delimiter=",", header="gaussian,x_A,y_A,z_A,motion_variability_A,mean_displacement_A", comments="",
               fmt=["%d", "%.3f", "%.3f", "%.3f", "%.4f", "%.4f"])
    res.sections.append(Section(
        "Which parts move", text=("Per Gaussian: RMS deviation of its displacement across particles (Å), also as "
                                  "maps (voxel value = Gaussian-weighted motion in Å, 0 outside the model)."),
        figures=[(f1, "per-Gaussian motion")],
        files=[(maps / "consensus.mrc", "consensus Gaussian model"),
               (maps / "motion_variability.mrc", "motion variability (Å)"),
               (maps / "motion_mean.mrc", "mean displacement (Å)"), (res.out_dir / "gaussian_motion.csv", "")]))


def _cluster_outputs(inputs: ExploreInputs, model: lat.DeformableModel, clusters: tuple[Tensor, Tensor],
                     res: Results) -> None:
    centres, labels = clusters
    maps = lat.deformed_maps(model, centres, inputs.box)
    files, rows_out = [], []
    for k in range(len(centres)):
        path = write_map(res.out_dir / "maps" / f"cluster_{k + 1:02d}.mrc", _np(maps[k]), inputs.pixel_size)
        files.append((path, f"deformed model at the centre of cluster {k + 1}"))
        assert res.rows is not None
        members = res.rows[_np(labels == k).astype(bool)]
        node = _write_subset_node(inputs, res, f"half{inputs.half_set}_cluster{k + 1:02d}", members)
        rows_out.append([k + 1, len(members), node or "(empty)"])
    np.savetxt(res.out_dir / "cluster_centres.txt", _np(centres), fmt="%.6g",
               header="k-means centres, one latent point per line (usable as --latent-points)")
    res.sections.append(Section(f"Clusters (k-means, k={len(centres)})", tables=[
        ("Cluster subsets", ["cluster", "particles", "STAR file"], rows_out)], files=files))


def _write_subset_node(inputs: ExploreInputs, res: Results, name: str, rows: np.ndarray) -> str | None:
    if len(rows) == 0:
        log.warning("WARNING: subset %s is empty; no STAR file written", name)
        return None
    path = sub.write_subset(inputs.table, rows, inputs.job_dir / "subsets" / f"{name}.star")
    res.nodes.append((str(path), SUBSET_LABEL))
    log.info("Subset %s: %d particles -> %s", name, len(rows), path)
    return str(path)


def parse_points(path: Path, latent_dim: int) -> list[list[float]]:
    """Latent points file: one point per line, ``L`` numbers (latent coordinates) or 2 numbers (PCA-plane
    coordinates PC1 PC2, as in ``embedding.csv``; read as latent coordinates when L = 2).  ``#`` comments and
    blank lines are ignored; all lines must be of one kind."""
    points: list[list[float]] = []
    for number, raw in enumerate(Path(path).read_text(errors="replace").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            values = [float(f) for f in line.replace(",", " ").split()]
        except ValueError:
            raise InputError(f"{path}: line {number} ({line[:40]!r}) is not a list of numbers") from None
        if len(values) not in (latent_dim, 2):
            raise InputError(f"{path}: line {number} has {len(values)} numbers; give {latent_dim} latent "
                             "coordinates (or 2 PCA coordinates PC1 PC2) per line")
        if points and len(values) != len(points[0]):
            raise InputError(f"{path}: line {number} mixes latent ({latent_dim} numbers) and PCA (2 numbers) "
                             "points; use one kind per file")
        points.append(values)
    if not points:
        raise InputError(f"{path}: no points found; write one latent point per line")
    return points


def read_points(path: Path, latent_dim: int, p: lat.Pca) -> Tensor:
    """:func:`parse_points` → latent points ``(P, L)`` (PCA coordinates mapped back through ``p``)."""
    points = parse_points(path, latent_dim)
    if len(points[0]) == latent_dim:
        return torch.tensor(points, dtype=torch.float32)
    return p.inverse(torch.tensor(points, dtype=p.mean.dtype, device=p.mean.device)).cpu()


def _point_maps(inputs: ExploreInputs, o: ExploreOptions, res: Results) -> None:
    if o.latent_points is None:
        return
    model = inputs.models[inputs.half_set]
    z, p = _latent_results(res)
    pts = read_points(o.latent_points, z.shape[1], p).to(model.device)
    maps = lat.deformed_maps(model, pts, inputs.box)
    files = [(write_map(res.out_dir / "maps" / f"point_{k + 1:03d}.mrc", _np(m), inputs.pixel_size),
              f"point {k + 1}") for k, m in enumerate(maps)]
    res.sections.append(Section(f"Maps at {len(files)} latent points from {o.latent_points}", files=files))


def _movies(inputs: ExploreInputs, o: ExploreOptions, res: Results, check: Callable[[], None]) -> None:
    model = inputs.models[inputs.half_set]
    z, p = _latent_results(res)
    paths: list[tuple[str, Tensor]] = []
    for k in range(min(o.movie_pcs, int((p.std > 0).sum()))):
        paths.append((f"pc{k + 1}", lat.pc_path(p, k, o.n_frames)))
    if o.movie_path is not None:
        waypoints = read_points(o.movie_path, z.shape[1], p).to(model.device)
        paths.append(("path", lat.interpolate_path(waypoints, o.n_frames)))
    figures, files = [], []
    for name, points in paths:
        check()
        folder = res.out_dir / "movies" / name
        projections = []
        for f, z in enumerate(points):
            vol = lat.deformed_maps(model, z[None], inputs.box)[0]
            write_map(folder / f"frame_{f:03d}.mrc", _np(vol), inputs.pixel_size)
            projections.append(_np(vol.sum(dim=0)))
        written = figs.movie(res.out_dir / "movies" / f"{name}.gif", np.stack(projections))
        np.savetxt(folder / "latent_points.txt", _np(points), fmt="%.6g", header="latent point of each frame")
        figures += [(w, f"movie {name} (projection along z)") for w in written if w.suffix == ".gif"]
        files.append((folder, f"{len(points)} MRC frames (open as a series in ChimeraX)"))
    if paths:
        res.sections.append(Section("Movies", text=("Along principal components from -2σ to +2σ, and along "
                                                    "the given path; GIFs show projections along z."),
                                    figures=figures, files=files))


def _rigid_bodies(inputs: ExploreInputs, o: ExploreOptions, res: Results, check: Callable[[], None]) -> None:
    """``--rigid-body-masks``: each particle's best rigid motion of every body (:mod:`..analysis.rigid_fit`) in
    ``rigid_transforms.star``, with how far from rigid the learned motion is."""
    from relion_dynamight.analysis.rigid_fit import RigidFit, body_columns, rigid_fit
    from relion_dynamight.imaging.warp import sample_volume
    from relion_dynamight.model.rigid import read_body_masks

    model = inputs.models[inputs.half_set]
    z, _ = _latent_results(res)
    masks, centres = read_body_masks(o.rigid_body_masks, inputs.box)
    masks, centres = masks.to(model.device), centres.to(model.device, model.positions.dtype)
    weights = sample_volume(masks, model.positions, box=inputs.box).clamp(0.0, 1.0).to(model.positions.dtype)
    for path, w in zip(o.rigid_body_masks, weights):
        if float(w.sum()) < 3.0:
            raise InputError(f"--rigid-body-masks {path}: fewer than 3 Gaussians of the model lie inside; give a "
                             "mask around a domain of the consensus map")
    parts = []
    for start in range(0, z.shape[0], 256):
        check()
        deformed = model.positions + lat.displacements(model, z[start:start + 256])
        parts.append(rigid_fit(model.positions, deformed, weights, centres))
    fit = RigidFit(torch.cat([p.rotation for p in parts]), torch.cat([p.shift for p in parts]),
                   torch.cat([p.residual for p in parts]), centres)
    px, omega = inputs.pixel_size, fit.axis_angle_deg()
    shift, residual = _np(fit.shift) * px, _np(fit.residual) * px
    columns = body_columns(omega, shift, residual)
    rows_out = [[k + 1, str(path), float(columns[f"dmBody{k + 1}Angle"].mean()),
                 float(np.sqrt((shift[:, k] ** 2).sum(1).mean())), float(residual[:, k].mean())]
                for k, path in enumerate(o.rigid_body_masks)]
    assert res.rows is not None
    star = sub.write_subset(inputs.table, res.rows, res.out_dir / "rigid_transforms.star", extra_columns=columns)
    log.info("Rigid-body fits of %d particles, %d bodies: %s", len(res.rows), len(o.rigid_body_masks), star)
    res.sections.append(Section(
        "Rigid bodies", text=("Per particle and body, the rigid motion closest to the learned deformation of the "
                              "body's Gaussians (rotation about the body's centre, translation), and the RMS motion "
                              "that is not rigid."),
        tables=[("Per body", ["body", "mask", "mean rotation (°)", "RMS translation (Å)", "mean non-rigid RMS (Å)"],
                 rows_out)],
        files=[(star, "per-particle rotations (axis-angle, °), translations (Å) and residuals (Å)")]))


def _latent_results(res: Results) -> tuple[Tensor, lat.Pca]:
    """``(z, pca)`` of a finished latent analysis (half set 1 or 2)."""
    assert res.z is not None and res.pca is not None, "the latent analysis runs first"
    return res.z, res.pca


def _subsets(inputs: ExploreInputs, o: ExploreOptions, res: Results) -> None:
    rows_out = []
    z, p = _latent_results(res)
    emb, rows = p.transform(z), res.rows
    assert rows is not None
    for i, spec in enumerate(o.axis_ranges, start=1):
        conditions = sub.parse_axis_ranges(spec, z.shape[1], emb.shape[1])
        keep = _np(sub.select_ranges(conditions, z, emb)).astype(bool)
        node = _write_subset_node(inputs, res, f"half{inputs.half_set}_range{i}", rows[keep])
        rows_out.append([f"--axis-range {spec}", int(keep.sum()), node or "(empty)"])
    for i, poly in enumerate(o.polygons, start=1):
        vertices = sub.read_polygon(poly)
        keep = _np(sub.inside_polygon(emb[:, :2], vertices)).astype(bool)
        node = _write_subset_node(inputs, res, f"half{inputs.half_set}_polygon{i}", rows[keep])
        rows_out.append([f"--polygon {poly}", int(keep.sum()), node or "(empty)"])
    if rows_out:
        res.sections.append(Section("Selected subsets", tables=[("Subsets", ["selection", "particles", "STAR file"],
                                                                 rows_out)]))


# -- half set 0: error estimates -----------------------------------------------------------------
def _error_analysis(inputs: ExploreInputs, res: Results, check: Callable[[], None]) -> None:
    rows = np.flatnonzero(inputs.latent.validation)
    if rows.size == 0:
        raise InputError(f"{inputs.job_dir / LATENT_STAR}: no validation particles (dmValidation = 1); train with "
                         "--validation-fraction > 0 to get error estimates")
    if inputs.encode is None:
        raise InputError("error estimates need both halves' encoders; the checkpoint has none")
    z1, z2 = inputs.encode(1, rows), inputs.encode(2, rows)
    px = inputs.pixel_size
    err = half_set_errors(inputs.models, z1, z2, px, on_batch=check)
    out = res.out_dir / "errors"
    particles = pd.DataFrame({"rlnImageName": [inputs.latent.names[r] for r in rows],
                              "rlnRandomSubset": inputs.latent.half[rows],
                              "dmDeformationErrorMean": _np(err.particle_mean),
                              "dmDeformationErrorRms": _np(err.particle_rms),
                              "dmDeformationMotion": _np(err.particle_motion)})
    m1 = inputs.models[1]
    pos = _np(m1.positions * px)
    res.gaussian_errors = _np(err.gaussian_mean)
    gaussians = pd.DataFrame({"dmGaussian": np.arange(1, len(pos) + 1), "dmX": pos[:, 0], "dmY": pos[:, 1],
                              "dmZ": pos[:, 2], "dmDeformationErrorMean": _np(err.gaussian_mean),
                              "dmDeformationErrorRms": _np(err.gaussian_rms),
                              "dmDeformationMotion": _np(err.gaussian_motion)})
    _write_star_csv(out / "errors_per_particle", "errors_per_particle", particles)
    _write_star_csv(out / "errors_per_gaussian", "errors_per_gaussian", gaussians)
    write_map(res.out_dir / "maps" / "error_map.mrc", _np(lat.gaussian_value_map(m1, err.gaussian_mean, inputs.box)), px)
    f1 = figs.error_summary(res.out_dir / "figures" / "errors.png", _np(err.particle_mean), _np(err.particle_motion),
                            _np(err.gaussian_mean), _np(err.gaussian_motion))
    f2 = figs.gaussian_projections(res.out_dir / "figures" / "error_per_gaussian.png", pos, _np(err.gaussian_mean),
                                   "per-Gaussian deformation error between half sets")
    summary = err.summary()
    log.info("Deformation errors on %d validation particles: mean %.2f Å (motion %.2f Å)", rows.size,
             summary["mean_error_A"], summary["mean_motion_A"])
    res.sections.append(Section(
        "Deformation error estimates (half set 0)",
        text=("Validation particles (never used to train a decoder) are embedded by both encoders; both decoders "
              "predict their displacements at the same consensus positions (each half's model, averaged). The "
              "distance between the two predictions estimates the error of the deformations, as in Fig. 6 of "
              "Schwab et al. (2024): regions whose error approaches their motion are not trustworthy."),
        figures=[(f1, "errors per particle and per Gaussian"), (f2, "error per Gaussian")],
        tables=[("Summary", ["quantity", "value"], [[k, v] for k, v in summary.items()])],
        files=[(out / "errors_per_particle.star", ""), (out / "errors_per_particle.csv", ""),
               (out / "errors_per_gaussian.star", ""), (out / "errors_per_gaussian.csv", ""),
               (res.out_dir / "maps" / "error_map.mrc", "error per Gaussian as a map (Å)")]))


def _write_star_csv(stem: Path, block: str, frame: pd.DataFrame) -> None:
    import starfile

    stem.parent.mkdir(parents=True, exist_ok=True)
    starfile.write({block: frame}, stem.with_suffix(".star"), float_format="%.6g")
    frame.to_csv(stem.with_suffix(".csv"), index=False, float_format="%.6g")


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()
