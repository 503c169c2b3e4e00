"""``deformable-backprojection DIR``: deformation-corrected half maps (paper: "Improved 3D reconstruction").

Per half set, only that half's particles and networks are used (gold standard):

1. each particle's deformation signature = the inverse network's displacements at up to 256 probe points
   (consensus Gaussian centres) for its latent code; particles are grouped so that signatures within a
   group agree to ``--group-resolution`` pixels (:mod:`relion_dynamight.imaging.grouping`);
2. per group: Fourier insertion of the members' CTF-multiplied images, one inverse FFT, one warp into the
   consensus frame with the group representative's deformation (inverse network on a coarse grid,
   inverted, up-sampled: :func:`relion_dynamight.training.inverse.dense_forward_positions`);
3. sum over groups, divide by the undeformed CTF² weights (RELION's unregularised Pipe & Menon division, as
   ``reconstruct`` and ``relion_reconstruct``) and gridding-correct;
4. region by region (k-means regions of the consensus refinement's Gaussian model), keep the
   deformation-corrected map only where its half maps reach a finer resolution (masked half-map FSC = 0.5)
   than the standard ones (:mod:`relion_dynamight.analysis.regions`; ``--no-regional-choice`` keeps it everywhere):
   where the particles do not move, or the learned deformations are wrong, the warps can only lose detail.

Groups are shared out over MPI ranks by size; the sums are reduced on every rank; rank 0 writes
``DIR/backprojection/``: ``map_half1.mrc``, ``map_half2.mrc``, ``map.mrc`` (their average),
``standard_half{1,2}.mrc`` (the same particles without deformation correction: exactly ``reconstruct
--halves``), ``deformed_half{1,2}.mrc`` (corrected everywhere) and ``regions.star`` (the choice per region),
``fsc.star`` and ``fsc.png`` (with the standard maps' curve beside the improved one).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from relion_dynamight.errors import InputError
from relion_dynamight.imaging.warp import Interpolation
from relion_dynamight.jobs.backprojection_memory import plan_memory
from relion_dynamight.relion.mrc import read_soft_mask
from relion_dynamight.training import trained as inv

log = logging.getLogger("relion_dynamight")

HALFMAP_LABEL = "DensityMap.mrc.relion.halfmap.dynamight"
#: RMS deformation mismatch (pixels) allowed inside a group; chosen by measurement (README, benchmark).
DEFAULT_GROUP_RESOLUTION = 0.5
#: At most this many groups (warps) per half: each costs one padded inverse FFT and warp, so this bounds the
#: job at a few times a plain reconstruction whatever the motion (README, "Backprojection for large motions").
DEFAULT_MAX_GROUPS = 128
#: Spacing (pixels) of the coarse grid on which the inverse network is evaluated (the paper uses 2).
DEFAULT_FIELD_SPACING = 2.0
N_PROBES = 256


def backprojection_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "backprojection"


# -- the engine on particle data (also used by tests and the benchmark) -------------------------------
def assign_groups(sizes: np.ndarray, n_ranks: int) -> list[list[int]]:
    """Share groups over ranks balancing member counts (largest first onto the least-loaded rank)."""
    load = [0] * n_ranks
    out: list[list[int]] = [[] for _ in range(n_ranks)]
    for g in sorted(range(len(sizes)), key=lambda g: (-int(sizes[g]), g)):
        r = min(range(n_ranks), key=lambda r: (load[r], r))
        out[r].append(g)
        load[r] += int(sizes[g])
    return [sorted(gs) for gs in out]


def backproject_groups(data: Any, rows: np.ndarray, labels: np.ndarray,
                       field: Callable[[int], Tensor | None], box: int, device: torch.device,
                       batch_size: int = 64, comm: Any = None, check_abort: Callable[[], None] = lambda: None,
                       ctf: bool = True, interpolation: Interpolation = "cubic") -> Any:
    """Deformed backprojection of particles ``rows`` of ``data`` (a ``ParticleData``) grouped by ``labels``.

    ``field(g)`` gives group ``g``'s dense position field ``(box, box, box, 3)`` (or None = identity).
    With ``comm`` the groups are shared over its ranks and the sums reduced.  Returns the
    :class:`~relion_dynamight.imaging.deformed_backprojection.DeformedBackprojector`.
    """
    from relion_dynamight.imaging.backprojection import prepare_spectra
    from relion_dynamight.imaging.ctf import ctf_2d
    from relion_dynamight.imaging.deformed_backprojection import DeformedBackprojector

    rank, size = (comm.rank, comm.size) if comm is not None else (0, 1)
    n_groups = int(labels.max()) + 1 if len(labels) else 0
    sizes = np.bincount(labels, minlength=n_groups)
    mine = assign_groups(sizes, size)[rank]
    bp = DeformedBackprojector(box, device=device, interpolation=interpolation)
    from relion_dynamight.logs import progress

    for g in progress(mine, len(mine), f"deformed backprojection, groups of rank {rank}", every_s=30.0):
        members = rows[labels == g]
        for batch in data.iter_batches(members, batch_size):
            b = batch.to(device)
            c = ctf_2d(b.ctf, box) if ctf else None
            spectra, weights = prepare_spectra(b.images, b.shifts, c, b.ctf_premultiplied if ctf else None)
            bp.insert(spectra, weights, b.rotations)
            check_abort()
        bp.finish_group(field(g))
    if comm is not None:
        bp.reduce_(comm)
    return bp


def group_half(net: Any, centres: Tensor, latents: Tensor, tolerance: float,
               max_groups: int | None = None) -> tuple[np.ndarray, Tensor, Tensor]:
    """``(labels (P,), representative index per group (G,), spreads (G,))`` for one half's latents."""
    from relion_dynamight.imaging.grouping import group_by_deformation, group_representatives, group_spreads
    from relion_dynamight.training.inverse import probe_displacements

    m = centres.shape[0]
    probes = centres[torch.linspace(0, m - 1, min(m, N_PROBES)).round().long().unique()]
    feats = probe_displacements(net, probes, latents)
    labels = group_by_deformation(feats, tolerance, max_groups if max_groups and max_groups > 0 else None)
    return labels.numpy(), group_representatives(feats, labels), group_spreads(feats, labels)


# -- the task ---------------------------------------------------------------------------------------
def run(job: Any, output_directory: Path, batch_size: int = 10, checkpoint_file: Path | None = None,
        preload_images: bool = False, gpu_id: str = "", group_resolution: float = DEFAULT_GROUP_RESOLUTION,
        field_spacing: float = DEFAULT_FIELD_SPACING, map_frame: str = "initial",
        interpolation: Interpolation = "cubic", max_groups: int = DEFAULT_MAX_GROUPS,
        regional_choice: bool = True, mask_file: Path | None = None) -> list[tuple[str, str]]:
    """Compute and write the improved half maps; returns their output nodes.

    ``map_frame``: ``"initial"`` writes the maps in the conformation of the consensus refinement
    (:mod:`relion_dynamight.training.reference_frame`); ``"consensus"`` in each half's learned consensus.
    """
    from relion_dynamight.parallel.device import choose_device
    from relion_dynamight.parallel.mpi import world
    from relion_dynamight.training.inverse import dense_forward_positions
    from relion_dynamight.training.reference_frame import compose_positions

    out = Path(output_directory)
    comm = world()
    device = choose_device(gpu_id, comm.local_rank)
    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size} must be at least 1")
    if not group_resolution >= 0:
        raise InputError(f"--group-resolution {group_resolution} must be >= 0 px (0 = one group per particle)")
    if max_groups < 0:
        raise InputError(f"--max-groups {max_groups} must be >= 0 (0 = no limit)")
    if not field_spacing > 0:
        raise InputError(f"--field-spacing {field_spacing} must be > 0 px")
    if map_frame not in ("initial", "consensus"):
        raise InputError(f"--map-frame {map_frame!r}: give 'initial' (the consensus refinement's conformation) "
                         "or 'consensus' (each half's learned consensus)")
    inputs = inv.load_forward(out, checkpoint_file, "deformable-backprojection")
    infos = {h: _inverse_for(out, h, inputs, device) for h in (1, 2)}
    box = inputs.box
    deform_mask = (torch.from_numpy(read_soft_mask(mask_file, box, "--mask-file")).to(device)
                   if mask_file is not None else None)
    plan = plan_memory(box, int(batch_size), device)   # before the images are opened or grids allocated
    data = _particles(inputs, preload_images)
    insert_batch = plan.batch_size   # particles inserted at once: bounds the memory of one insertion step
    log.info("Device %s, %d MPI rank(s); insertion batches of %d particles; group resolution %.2f px; "
             "about %.1f GiB needed%s", device, comm.size, insert_batch, group_resolution, plan.total / 2**30,
             f" of {plan.available / 2**30:.1f} GiB free" if plan.available is not None else "")
    results = {}
    for h in (1, 2):
        t0 = time.monotonic()
        rows = np.flatnonzero(inputs.half == h)
        net = inv.inverse_net_from_file(infos[h], device)
        latents = inputs.latents[rows]
        labels, reps, spreads = group_half(net, infos[h]["centres"].to(device), latents, group_resolution, max_groups)
        log.info("Half %d: %d particles in %d groups (largest spread %.2f px)", h, len(rows), len(reps),
                 float(spreads.max()) if len(spreads) else 0.0)
        residuals: list[float] = []
        reference = (reference_frame(inputs, h, net, latents, device, field_spacing)
                     if map_frame == "initial" else None)

        def field(g: int, net: Any = net, latents: Tensor = latents, reps: Tensor = reps,
                  reference: Tensor | None = reference) -> Tensor:
            pos, res = dense_forward_positions(net, latents[reps[g]], box, field_spacing)
            residuals.append(res)
            return restrict_to_mask(compose_positions(pos, reference), deform_mask)

        results[h] = backproject_groups(data, rows, labels, field, box, device, insert_batch, comm, job.check_abort,
                                        interpolation=interpolation)
        if residuals and max(residuals) > 0.5:
            log.warning("WARNING: half %d: inverting the deformation left up to %.2f px of error (folding fields?)",
                        h, max(residuals))
        log.info("Half %d: backprojection done in %.1f s", h, time.monotonic() - t0)
    if comm.rank != 0:
        return []
    pixel = float(inputs.config.get("pixel_size") or float(data.pixel_sizes[0]))
    points = inputs.state["initial"]["positions"].float() if regional_choice else None
    return write_maps(out, results, box, pixel, points)


def restrict_to_mask(positions: Tensor, mask: Tensor | None) -> Tensor:
    """``x + m(x)·(Γ(x) − x)``: the deformation only where the mask ``m`` ``(N, N, N)`` is 1, the identity where
    it is 0, blended in its soft edge.  ``positions`` ``(N, N, N, 3)`` as :func:`.warp.grid_nodes`."""
    if mask is None:
        return positions
    from relion_dynamight.imaging.warp import grid_nodes

    nodes = grid_nodes(positions.shape[0], positions.shape[0], device=positions.device, dtype=positions.dtype)
    return nodes + mask.to(positions.dtype)[..., None] * (positions - nodes)


def reference_frame(inputs: inv.ForwardInputs, half: int, net: Any, latents: Tensor, device: torch.device,
                    spacing: float) -> Tensor:
    """``h_ref`` of one half (:func:`relion_dynamight.training.reference_frame.reference_pull_field`): the
    conformation of its particles closest to the initial model, logged with how far the consensus drifted."""
    from relion_dynamight.training.reference_frame import (DEFAULT_REFERENCE_PARTICLES, closest_to_initial,
                                                           reference_pull_field)

    decoder, centres = inv.forward_decoder(inputs, half, device)
    initial = inputs.state["initial"]["positions"].to(device=device, dtype=torch.float32)
    k = int(inputs.config.get("consensus_particles") or DEFAULT_REFERENCE_PARTICLES)
    chosen, dist = closest_to_initial(decoder, centres, initial, latents, k)
    drift = float((centres - initial).pow(2).sum(-1).mean().sqrt())
    log.info("Half %d: maps in the conformation of the %d particles closest to the consensus refinement's model "
             "(RMS %.2f px from it; the learned consensus is %.2f px from it)", half, len(chosen),
             float(dist.mean()), drift)
    return reference_pull_field(net, latents[chosen], inputs.box, spacing)


def _inverse_for(out: Path, half: int, inputs: inv.ForwardInputs, device: torch.device) -> dict[str, Any]:
    path = inv.inverse_path(out, half)
    command = f"relion_dynamight optimize-inverse-deformations {out}"
    if not path.is_file():
        raise InputError(f"{path} not found: the inverse deformations have not been trained; run '{command}' "
                         "before deformable-backprojection")
    info = inv.load_inverse(path, device)
    if int(info["epoch"]) < int(info["n_epochs"]) and not bool(info.get("converged", False)):
        raise InputError(f"{path}: inverse training stopped after {info['epoch']} of {info['n_epochs']} epochs; "
                         f"run '{command}' again to finish it")
    if not inv.same_forward(info, inputs):
        raise InputError(f"{path} was trained from {info['forward_checkpoint']} (epoch {info['forward_epoch']}), "
                         f"not from {inputs.checkpoint}; run '{command} --checkpoint-file {inputs.checkpoint}' first")
    return info


def _particles(inputs: inv.ForwardInputs, preload: bool) -> Any:
    from relion_dynamight.relion.particle_checks import require_one_pixel_size
    from relion_dynamight.relion.particles import ParticleData
    from relion_dynamight.training.halves import fingerprint

    star = inputs.config.get("star_file")
    if not star:
        raise InputError(f"{inputs.checkpoint} does not name its particles STAR file; rerun optimize-deformations")
    data = ParticleData(star, preload=preload)
    require_one_pixel_size(data.table)
    if tuple(fingerprint(data.table.image_names)) != tuple(inputs.state["fingerprint"]):
        raise InputError(f"{star} no longer lists the particles the checkpoint {inputs.checkpoint} was trained on "
                         f"({len(data)} vs {inputs.state['fingerprint'][0]} particles or other image names)")
    return data


def write_maps(out: Path, results: dict[int, Any], box: int, pixel: float,
               regions_from: Tensor | None = None) -> list[tuple[str, str]]:
    """Reconstruct each half (RELION's unregularised division, as ``reconstruct``) and write all outputs.

    No FSC-based Wiener term: on the padded grid a per-shell term that grows steeply where the half-map FSC
    falls leaks, after the real-space crop, low-resolution signal into the high shells; measured at SNR 0.02
    (box 64, 4,000 particles per half) it cut the FSC against the true map at ¼–½ Nyquist (e.g. 0.13 → −0.01)
    while a constant term of any size did not (README, "Science").  The standard maps are
    therefore exactly ``relion_dynamight reconstruct --halves`` of the same particles.

    ``regions_from`` (model points ``(M, 3)``, px): split the model into regions and keep the
    deformation-corrected maps only in the regions where their half maps reach a finer FSC = 0.5 resolution
    than the standard ones (:mod:`relion_dynamight.analysis.regions`); the unblended maps are kept as
    ``deformed_half*.mrc``.  None: the deformation-corrected maps everywhere.
    """
    from relion_dynamight.imaging.fourier import fsc, resolution_at
    from relion_dynamight.relion.mrc import write_map

    folder = backprojection_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    deformed = {h: results[h].reconstruct() for h in (1, 2)}
    standard = {h: results[h].standard_reconstruction() for h in (1, 2)}
    maps = dict(deformed)
    if regions_from is not None:
        maps = _regional(folder, deformed, standard, regions_from, pixel)
    for h in (1, 2):
        write_map(folder / f"map_half{h}.mrc", maps[h].cpu().numpy(), pixel)
        write_map(folder / f"standard_half{h}.mrc", standard[h].cpu().numpy(), pixel)
    write_map(folder / "map.mrc", (0.5 * (maps[1] + maps[2])).cpu().numpy(), pixel)
    final = fsc(maps[1], maps[2])
    plain = fsc(standard[1], standard[2])
    write_fsc(folder, final, box, pixel, standard=plain)
    log.info("Half-map FSC = 0.143 at %.2f A (improved maps) and %.2f A (standard, the same particles); "
             "maps in %s", resolution_at(final, 0.143, box, pixel), resolution_at(plain, 0.143, box, pixel), folder)
    return [(str(folder / "map_half1.mrc"), HALFMAP_LABEL), (str(folder / "map_half2.mrc"), HALFMAP_LABEL)]


def _regional(folder: Path, deformed: dict[int, Tensor], standard: dict[int, Tensor], points: Tensor,
              pixel: float) -> dict[int, Tensor]:
    """The per-region choice (see :func:`write_maps`); writes ``deformed_half*.mrc`` and ``regions.star``."""
    from relion_dynamight.analysis.regions import blend, regional_choice
    from relion_dynamight.relion.mrc import write_map

    cpu = {h: (deformed[h].cpu(), standard[h].cpu()) for h in (1, 2)}
    choice = regional_choice((cpu[1][1], cpu[2][1]), (cpu[1][0], cpu[2][0]), points.cpu())
    alpha = choice.alpha()
    for h in (1, 2):
        write_map(folder / f"deformed_half{h}.mrc", cpu[h][0].numpy(), pixel)
    _write_regions(folder, choice, int(alpha.shape[-1]), pixel)
    kept = int(choice.use_second.sum())
    log.info("Regional choice: the deformation-corrected map is kept in %d of %d regions (%.0f%% of the model's "
             "volume); elsewhere the standard reconstruction (deformed_half*.mrc: corrected everywhere)", kept,
             len(choice.use_second), 100 * float(alpha.sum() / choice.weights.sum().clamp_min(1e-12)))
    if kept == 0:
        log.warning("WARNING: in no region did the deformation-corrected half maps reach a finer resolution than "
                    "the standard ones: the learned deformations do not improve this reconstruction, so "
                    "map_half*.mrc are the standard maps")
    return {h: blend(cpu[h][1], cpu[h][0], alpha) for h in (1, 2)}


def _write_regions(folder: Path, choice: Any, box: int, pixel: float) -> None:
    """``regions.star``: per region its volume (voxels), the half-map FSC = 0.5 resolution (Å) of the standard
    and the deformed maps there, and the choice."""
    from relion_dynamight.relion.jobdir import atomic_write_text

    def angstrom(shell: float) -> float:
        return box * pixel / max(float(shell), 1e-3)

    lines = ["", "# version 30001", "", "data_regions", "", "loop_", "_dmRegion #1", "_dmRegionVolume #2",
             "_dmHalfMapFsc05Standard #3", "_dmHalfMapFsc05Deformed #4", "_dmDeformedKept #5"]
    for k in range(len(choice.use_second)):
        lines.append(f"{k + 1} {float(choice.weights[k].sum()):.1f} {angstrom(choice.shell_first[k]):.3f} "
                     f"{angstrom(choice.shell_second[k]):.3f} {int(choice.use_second[k])}")
    atomic_write_text(folder / "regions.star", "\n".join(lines) + "\n\n")


def write_fsc(folder: Path, curve: Tensor, box: int, pixel: float, standard: Tensor | None = None) -> None:
    """``fsc.star`` (RELION's columns) and ``fsc.png`` (with the standard maps' curve when given)."""
    from relion_dynamight.relion.jobdir import atomic_write_text

    lines = ["", "# version 30001", "", "data_fsc", "", "loop_", "_rlnSpectralIndex #1", "_rlnResolution #2",
             "_rlnAngstromResolution #3", "_rlnFourierShellCorrelation #4"]
    res = []
    for i, v in enumerate(curve.tolist()):
        inv_a = i / (box * pixel)
        ang = 1.0 / inv_a if i else 999.0
        res.append(inv_a)
        lines.append(f"{i:d} {inv_a:.6f} {ang:.4f} {v:.6f}")
    atomic_write_text(folder / "fsc.star", "\n".join(lines) + "\n\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(res, curve.tolist(), label="half maps (deformation-corrected)")
    if standard is not None:
        ax.plot(res, standard.tolist(), color="grey", lw=1, label="standard half maps (same particles)")
    ax.axhline(0.143, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("resolution (1/Å)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.05)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "fsc.png", dpi=100)
    plt.close(fig)
