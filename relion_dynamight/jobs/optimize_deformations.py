"""``optimize-deformations``: train the two half-set VAEs on a Gaussian model of the consensus map.

Reads the particles and the consensus map, builds (or coarse-grains) the common initial Gaussian model,
splits the particles into gold-standard halves, trains (resuming from the job's latest checkpoint when
one exists), and writes ``DIR/forward_deformations/``: ``checkpoints/``, ``latent_space.star``,
``consensus_half{1,2}.mrc``, ``loss_curves.png`` and ``latent_space.png``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from relion_dynamight.errors import InputError
from relion_dynamight.training import checkpoint as ckpt
from relion_dynamight.training.config import auto_batch_size, default_config, merge_resumed
from relion_dynamight.training.halves import HalfSplit, fingerprint, make_split

log = logging.getLogger("relion_dynamight")

#: Relative pixel-size difference between map and particles that is accepted with a warning.
PIXEL_TOLERANCE = 0.01


def run(job: Any, refinement_star_file: Path, output_directory: Path | None, initial_model: Path,
        n_gaussians: int = 10000, initial_threshold: float | None = None, regularization_factor: float = 1.0,
        n_threads: int = 1, preload_images: bool = False, gpu_id: str = "", n_latent_dimensions: int = 6,
        n_epochs: int = 50, batch_size: int | None = None, checkpoint_file: Path | None = None,
        atomic_model: Path | None = None, mask_file: Path | None = None, seed: int = 0,
        validation_fraction: float = 0.1, live_every: int = 5, rigid_body_masks: str | None = None,
        schedule: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """Run the task (see the module docstring); returns no output nodes (RELION declares none here)."""
    from relion_dynamight.parallel.device import choose_device, thread_count
    from relion_dynamight.parallel.mpi import world
    from relion_dynamight.relion.particles import ParticleData

    if output_directory is None:
        raise InputError("not a RELION project job: give --output-directory DIR (e.g. DynaMight/job001/)")
    _check_options(n_gaussians, n_latent_dimensions, n_epochs, batch_size, regularization_factor, live_every)
    out = Path(output_directory)
    comm = world()
    torch.set_num_threads(thread_count(int(n_threads), "--n-threads"))
    device = choose_device(gpu_id, comm.local_rank)
    if comm.size > 2:
        log.warning("WARNING: %d MPI ranks; only ranks 0 and 1 train (one half each)", comm.size)
    log.info("Device: %s, %d thread(s), %d MPI rank(s)", device, torch.get_num_threads(), comm.size)

    from relion_dynamight.relion.particle_checks import require_one_pixel_size

    data = ParticleData(refinement_star_file, preload=preload_images)
    require_one_pixel_size(data.table)
    fp = fingerprint(data.table.image_names)
    volume, map_pixel = _read_consensus(initial_model, data)
    bodies = _rigid_bodies(rigid_body_masks, mask_file, int(data.box))
    requested = default_config(
        box=int(data.box), pixel_size=float(data.pixel_sizes[0]), n_gaussians=int(n_gaussians),
        latent_dim=int(n_latent_dimensions), regularization_factor=float(regularization_factor),
        batch_size=batch_size, seed=int(seed), validation_fraction=float(validation_fraction),
        initial_threshold=initial_threshold, atomic_model=str(atomic_model) if atomic_model else None,
        mask_file=str(mask_file) if mask_file else None, star_file=str(refinement_star_file),
        initial_model=str(initial_model), live_every=int(live_every), rigid_bodies=bodies,
        schedule={"n_epochs": int(n_epochs), **(schedule or {})})

    state = _find_checkpoint(out, checkpoint_file, device, fp)
    if state is not None:
        log.info("Continuing from %s (%d epochs done)", state["path"], state["epoch"])
        config = merge_resumed(state["config"], requested)
        split = HalfSplit(state["split_half"], state["split_validation"], state["extra"].get("split_source", "?"))
        initial = state["initial"]
        edges = initial.get("edges")
    else:
        config = requested
        split = make_split(data.table, int(seed), float(validation_fraction))
        initial, edges = _initial_model(volume, config, atomic_model, device)
        if bodies:
            from relion_dynamight.model.rigid import read_body_masks

            initial["body_masks"], initial["body_centres"] = read_body_masks(bodies, int(config["box"]))
            log.info("Rigid bodies: %d (%s), centres at %s px", len(bodies), ", ".join(bodies),
                     "; ".join(" ".join(f"{v:.1f}" for v in c) for c in initial["body_centres"].tolist()))
        smallest = min(len(split.indices(h)) for h in (1, 2))
        if smallest < 2:
            raise InputError(f"a half set has only {smallest} training particle(s); at least 2 per half are needed "
                             "(use more particles or a smaller --validation-fraction)")
        if config["batch_size"] is None:
            config["batch_size"] = auto_batch_size(config, device, smallest)
            log.info("Automatic batch size: %d", config["batch_size"])
        elif config["batch_size"] > smallest:
            log.warning("WARNING: --batch-size %d is larger than the smallest half's %d training particles; "
                        "using %d", config["batch_size"], smallest, smallest)
            config["batch_size"] = smallest
        if comm.size > 1:  # identical start on every rank (the automatic batch size depends on the device)
            config, initial, edges = comm.bcast((config, initial, edges), root=0)
    log.info("Particles: %d; %s", len(split), split.summary())

    from relion_dynamight.training.trainer import Trainer

    mask_weights = _mask_weights(mask_file, initial, config["box"], device)
    trainer = Trainer(config, data, split, initial, device, comm, out, fp, job.check_abort,
                      mask_weights=mask_weights, fixed_edges=None if edges is None else edges.to(device))
    if state is not None:
        trainer.restore(state)
    else:
        trainer.prepare()
    epochs = trainer.run()
    final = trainer.write_checkpoint(epochs, final=True)
    latents = trainer.latents()
    if comm.rank == 0:
        log.info("Final checkpoint: %s", final)
        from relion_dynamight.training.outputs import write_outputs

        assert latents is not None and final is not None     # rank 0 gathers both
        written = write_outputs(out, data.table, split, latents, final, config)
        job.outputs_to_check += [written["latent_space"], written["consensus_half1"], written["consensus_half2"]]
    return []


#: Largest latent dimension accepted (the encoder's last hidden layer has 128 units).
MAX_LATENT = 128


def _check_options(n_gaussians: int, latent: int, n_epochs: int, batch_size: int | None, reg: float,
                   live_every: int = 5) -> None:
    if n_gaussians < 3:
        raise InputError(f"--n-gaussians {n_gaussians} is too small; use at least 3 (typically 1000-30000)")
    if latent < 1:
        raise InputError(f"--n-latent-dimensions {latent} must be at least 1")
    if latent > MAX_LATENT:
        raise InputError(f"--n-latent-dimensions {latent}: at most {MAX_LATENT} (DynaMight uses 6; a few more for "
                         "complex motions)")
    if latent > 16:
        log.warning("WARNING: --n-latent-dimensions %d is far above DynaMight's 6: training is slower and the "
                    "latent space harder to read", latent)
    if n_epochs < 1:
        raise InputError(f"--n-epochs {n_epochs} must be at least 1")
    if batch_size is not None and batch_size < 1:
        raise InputError(f"--batch-size {batch_size} must be at least 1")
    if live_every < 0:
        raise InputError(f"--live-every {live_every} must be 0 (never) or a number of epochs")
    if reg < 0:
        raise InputError(f"--regularization-factor {reg} must not be negative")


def check_consensus_map(volume: Any, path: Path) -> None:
    """Refuse a consensus map that cannot be a refinement's (non-finite, constant) and warn about one that looks
    contrast-inverted (the protein darker than the solvent), before the Gaussians are fitted to it."""
    import numpy as np

    vol = np.asarray(volume, dtype=np.float64)
    if not np.isfinite(vol).all():
        raise InputError(f"{path}: the consensus map has {int((~np.isfinite(vol)).sum())} NaN/Inf voxels; give the "
                         "refinement's map (run_class001.mrc)")
    lo, hi = float(vol.min()), float(vol.max())
    if hi - lo <= 1e-12 * max(abs(hi), abs(lo), 1e-30):
        what = "all zero" if hi == 0.0 and lo == 0.0 else f"constant ({hi:g})"
        raise InputError(f"{path}: the consensus map is {what}; give the refinement's map (run_class001.mrc)")
    median = float(np.median(vol))
    if median - lo > 3.0 * (hi - median):
        log.warning("WARNING: %s looks contrast-inverted (its darkest voxel is %.1f× further from the median than "
                    "its brightest); RELION maps have bright protein: invert it (relion_image_handler "
                    "--multiply_constant -1) if the Gaussians land in the solvent", path,
                    (median - lo) / max(hi - median, 1e-30))


def _read_consensus(path: Path, data: Any) -> tuple[torch.Tensor, float]:
    from relion_dynamight.relion.mrc import read_map

    volume, pixel = read_map(path)
    box = int(data.box)
    particle_pixel = float(data.pixel_sizes[0])
    if volume.shape[0] != box:
        raise InputError(f"{path}: map box {volume.shape[0]} differs from the particle box {box}; give the "
                         "consensus map of the refinement that produced these particles")
    if abs(pixel - particle_pixel) > PIXEL_TOLERANCE * particle_pixel:
        raise InputError(f"{path}: map pixel size {pixel:.4f} Å differs from the particles' {particle_pixel:.4f} Å "
                         "by more than 1 %; give the matching consensus map")
    check_consensus_map(volume, path)
    if abs(pixel - particle_pixel) > 1e-4 * particle_pixel:
        log.warning("WARNING: map pixel size %.4f Å differs slightly from the particles' %.4f Å; using the "
                    "particles' pixel size", pixel, particle_pixel)
    return torch.from_numpy(volume), particle_pixel


def _initial_model(volume: torch.Tensor, config: dict[str, Any], atomic_model: Path | None,
                   device: torch.device) -> tuple[dict[str, Any], torch.Tensor | None]:
    """The common initial Gaussian model (tree) and, for an atomic model, its bond graph."""
    from relion_dynamight.model.consensus import fit_to_map, from_atomic_model, initialize_from_map
    from relion_dynamight.training import rng
    from relion_dynamight.training.half import gaussian_tree

    edges = None
    if atomic_model is not None:
        log.warning("WARNING: regularising with an atomic model can bias the result (paper: model bias); "
                    "validate with the half sets")
        model, edges = from_atomic_model(atomic_model, int(config["box"]), float(config["pixel_size"]))
        fit_to_map(model.to(device), volume.to(device), fit_positions=False)
        config["n_gaussians"] = model.n_gaussians
    else:
        gen = rng.generator(int(config["seed"]), 0, 3)
        model = initialize_from_map(volume.to(device), int(config["n_gaussians"]), config.get("initial_threshold"),
                                    generator=gen)
        config["n_gaussians"] = model.n_gaussians   # fewer when the threshold selects too few voxels
    tree = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in gaussian_tree(model.params()).items()}
    if edges is not None:
        tree["edges"] = edges
    return tree, edges


def _rigid_bodies(rigid_body_masks: str | None, mask_file: Path | None, box: int) -> list[str] | None:
    """``--rigid-body-masks a.mrc,b.mrc`` → the mask files (checked now, before any work), or None."""
    from relion_dynamight.model.rigid import mask_paths

    paths = [str(p) for p in mask_paths(rigid_body_masks)]
    if not paths:
        return None
    if mask_file is not None:
        raise InputError("--rigid-body-masks and --mask-file exclude each other: the bodies' masks already say "
                         "what moves; drop --mask-file")
    from relion_dynamight.relion.mrc import read_soft_mask

    for path in paths:
        read_soft_mask(path, box, "--rigid-body-masks")
    return paths


def _mask_weights(mask_file: str | Path | None, initial: dict[str, Any], box: int,
                  device: torch.device) -> torch.Tensor | None:
    if mask_file is None:
        return None
    from relion_dynamight.model.regularizers import mask_to_gaussian_weights
    from relion_dynamight.relion.mrc import read_map

    mask, _ = read_map(mask_file)
    if mask.shape[0] != box:
        raise InputError(f"{mask_file}: mask box {mask.shape[0]} differs from the particle box {box}")
    weights = mask_to_gaussian_weights(torch.from_numpy(mask).to(device), initial["positions"].to(device))
    if float(weights.max()) <= 0:
        raise InputError(f"{mask_file}: no Gaussian lies inside the mask; check the mask")
    log.info("Mask %s: %d of %d Gaussians may move", mask_file, int((weights > 0.5).sum()), weights.numel())
    return weights


def _find_checkpoint(out: Path, checkpoint_file: Path | None, device: torch.device,
                     fp: tuple[int, str]) -> dict[str, Any] | None:
    if checkpoint_file is not None:
        return ckpt.load_checkpoint(checkpoint_file, device="cpu", fingerprint=fp)
    return ckpt.load_latest(out, device="cpu", fingerprint=fp)

