"""``relion_dynamight reconstruct``: CTF-weighted Fourier reconstruction like ``relion_reconstruct``.

Per particle: FFT, shift by +origin, multiply by the CTF (weight CTF²), trilinear insertion into a
2× padded grid (:mod:`relion_dynamight.imaging.backprojection`); then RELION 3.1's Pipe & Menon
weighting, inverse FFT, crop and gridding correction.  Under ``mpiexec -n K`` each rank inserts a
contiguous share of the particles (:func:`~relion_dynamight.parallel.mpi.split_range`), the
accumulators are summed with ``Comm.allreduce_sum`` and rank 0 alone writes the outputs.

``--halves`` also writes ``<out>_half1.mrc``, ``<out>_half2.mrc`` (``rlnRandomSubset`` 1 and 2), their
FSC as ``<out>_fsc.star`` (table ``fsc``) and ``<out>_fsc.png``.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from relion_dynamight.errors import InputError
from relion_dynamight.imaging.backprojection import FourierAccumulator, prepare_spectra
from relion_dynamight.imaging.ctf import ctf_2d
from relion_dynamight.imaging.fourier import fsc as fourier_shell_correlation
from relion_dynamight.imaging.fourier import resolution_at
from relion_dynamight.logs import progress
from relion_dynamight.parallel.mpi import Comm, split_range, world

if TYPE_CHECKING:  # annotations only: the heavy readers are imported where they are used
    import pandas as pd

    from relion_dynamight.relion.jobdir import Job
    from relion_dynamight.relion.particles import ParticleBatch, ParticleData

log = logging.getLogger("relion_dynamight")

MAP_LABEL = "DensityMap.mrc"
HALFMAP_LABEL = "DensityMap.mrc.relion.halfmap.reconstruct"


# ---------------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------------
def accumulate(data: ParticleData, groups: Sequence[np.ndarray], ctf: bool = True,
               max_radius_px: float | None = None, batch_size: int = 256,
               device: torch.device | str = "cpu", comm: Comm | None = None,
               check_abort: Callable[[], None] | None = None) -> list[FourierAccumulator]:
    """One :class:`FourierAccumulator` per group of particle rows, summed over MPI ranks.

    Each rank inserts its :func:`split_range` share of every group (ranks get contiguous slices, so
    the sum does not depend on the number of ranks beyond float rounding).  ``check_abort`` is called
    before every batch.
    """
    comm = comm or Comm(None)
    device = torch.device(device)
    accs = [FourierAccumulator(data.box, device=device, max_radius_px=max_radius_px) for _ in groups]
    shares = [np.asarray(g, dtype=np.int64)[list(split_range(len(g), comm.rank, comm.size))] for g in groups]
    total = sum(math.ceil(len(s) / batch_size) for s in shares)

    def batches() -> Iterable[tuple[FourierAccumulator, ParticleBatch]]:
        for acc, share in zip(accs, shares):
            for batch in data.iter_batches(share, batch_size):
                yield acc, batch

    for acc, batch in progress(batches(), total, "Backprojecting", log):
        if check_abort is not None:
            check_abort()
        batch = batch.to(device)
        ctf_values = ctf_2d(batch.ctf, data.box) if ctf else None
        spectra, weights = prepare_spectra(batch.images, batch.shifts, ctf_values, batch.ctf_premultiplied)
        acc.insert(spectra, weights, batch.rotations)
    if check_abort is not None:
        check_abort()
    for acc in accs:
        acc.reduce_(comm)
    return accs


def reconstruct_particles(data: ParticleData, indices: Sequence[int] | np.ndarray, ctf: bool = True,
                          max_radius_px: float | None = None, batch_size: int = 256,
                          device: torch.device | str = "cpu", comm: Comm | None = None,
                          check_abort: Callable[[], None] | None = None) -> tuple[Tensor, FourierAccumulator]:
    """Map ``(N, N, N)`` float32 of the particle rows ``indices`` and its (rank-summed) accumulator.

    ``data`` is a :class:`~relion_dynamight.relion.particles.ParticleData`; with ``comm`` each rank
    inserts its share and every rank returns the same map.
    """
    (acc,) = accumulate(data, [np.asarray(indices, dtype=np.int64)], ctf, max_radius_px, batch_size, device,
                        comm, check_abort)
    return acc.reconstruct(), acc


def fsc_table(curve: Tensor, box: int, pixel_size: float) -> "pd.DataFrame":
    """RELION-style ``fsc`` table: rlnSpectralIndex, rlnResolution (1/Å), rlnAngstromResolution, FSC."""
    import pandas as pd

    idx = np.arange(len(curve))
    res = idx / (box * pixel_size)
    ang = np.where(idx > 0, box * pixel_size / np.maximum(idx, 1), 999.0)
    return pd.DataFrame({"rlnSpectralIndex": idx, "rlnResolution": res, "rlnAngstromResolution": ang,
                         "rlnFourierShellCorrelation": curve.cpu().double().numpy()})


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------
def run(job: Job, star: Path, output: Path, subset: int | None = None, ctf: bool = False,
        maxres: float | None = None, halves: bool = False, threads: int = 1, batch_size: int = 256,
        **_: object) -> list[tuple[str, str]]:
    """Reconstruct ``star`` into ``output`` (see module docstring); returns the output nodes."""
    from relion_dynamight.parallel.device import choose_device
    from relion_dynamight.relion.mrc import write_map
    from relion_dynamight.relion.particle_checks import require_one_pixel_size
    from relion_dynamight.relion.particles import ParticleData

    from relion_dynamight.parallel.device import thread_count

    torch.set_num_threads(thread_count(int(threads), "--j"))
    comm = world()
    star, output = Path(star), Path(output)
    _check_options(star, output, subset, halves, maxres, batch_size)
    data = ParticleData(star)
    _check_not_input(output, star, data)
    groups, names = _select(data, star, subset, halves)
    pixel = require_one_pixel_size(data.table)
    radius = None if maxres is None else min(math.ceil(data.box * pixel / maxres), data.box / 2)
    device = choose_device("", comm.local_rank)
    log.info("Reconstructing %d particles of %s (box %d, %.3f Å/px, CTF %s, %d rank(s), %s)",
             sum(len(g) for g in groups), star, data.box, pixel, "on" if ctf else "off", comm.size, device)
    accs = accumulate(data, groups, ctf, radius, batch_size, device, comm, job.check_abort)
    if comm.rank != 0:
        return []
    total = FourierAccumulator(data.box, device=device, max_radius_px=radius)
    for acc in accs:
        total.add_(acc)
    write_map(output, total.reconstruct().cpu().numpy(), pixel)
    log.info("Wrote %s", output)
    nodes = [(str(output), MAP_LABEL)]
    if halves:
        nodes += _write_halves(accs[names.index("half1")], accs[names.index("half2")], output, pixel)
    return nodes


def _check_options(star: Path, output: Path, subset: int | None, halves: bool, maxres: float | None,
                   batch_size: int) -> None:
    if subset is not None and subset not in (1, 2):
        raise InputError(f"--subset {subset}: must be 1 or 2 (the rlnRandomSubset half set)")
    if subset is not None and halves:
        raise InputError("--subset and --halves exclude each other; give one of them")
    if maxres is not None and not maxres > 0:
        raise InputError(f"--maxres {maxres}: must be a positive resolution in Å")
    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size}: must be at least 1")
    if _same_path(output, star):
        raise InputError(f"--o {output}: would overwrite the input STAR file; choose another output name")


def _check_not_input(output: Path, star: Path, data: ParticleData) -> None:
    outputs = [output, *(_half_paths(output))]
    stacks = [Path(p) for p in getattr(data.images, "_paths", [])]
    for out in outputs:
        for stack in stacks:
            if _same_path(out, stack):
                raise InputError(f"--o {output}: would overwrite the input image stack {stack}; "
                                 "choose another output name")
        if _same_path(out, star):
            raise InputError(f"--o {output}: would overwrite the input STAR file {star}; choose another name")
    if output.suffix.lower() not in (".mrc", ".map"):
        raise InputError(f"--o {output}: the output map must end in .mrc")


def _same_path(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _select(data: ParticleData, star: Path, subset: int | None,
            halves: bool) -> tuple[list[np.ndarray], list[str]]:
    """Particle rows per accumulator, and the accumulators' names."""
    n = len(data)
    if n == 0:
        raise InputError(f"{star}: the particle table is empty")
    if subset is None and not halves:
        return [np.arange(n)], ["all"]
    sets = data.table.random_subset
    if sets is None:
        raise InputError(f"{star}: column _rlnRandomSubset is missing; it is needed for "
                         f"{'--halves' if halves else '--subset'} (run a 3D auto-refine first or drop the option)")
    if subset is not None:
        rows = np.flatnonzero(sets == subset)
        if rows.size == 0:
            raise InputError(f"{star}: no particle has _rlnRandomSubset {subset} (half set {subset} is empty)")
        return [rows], [f"half{subset}"]
    groups, names = [], []
    for k in (1, 2):
        rows = np.flatnonzero(sets == k)
        if rows.size == 0:
            raise InputError(f"{star}: no particle has _rlnRandomSubset {k} (half set {k} is empty); "
                             "--halves needs both half sets")
        groups.append(rows)
        names.append(f"half{k}")
    rest = np.flatnonzero((sets != 1) & (sets != 2))
    if rest.size:
        log.warning("%d particles have _rlnRandomSubset other than 1/2: used in the full map only", rest.size)
        groups.append(rest)
        names.append("other")
    return groups, names


def _half_paths(output: Path) -> list[Path]:
    stem = output.with_suffix("")
    return [Path(f"{stem}_half1{output.suffix}"), Path(f"{stem}_half2{output.suffix}"),
            Path(f"{stem}_fsc.star"), Path(f"{stem}_fsc.png")]


def _write_halves(acc1: FourierAccumulator, acc2: FourierAccumulator, output: Path,
                  pixel: float) -> list[tuple[str, str]]:
    from relion_dynamight.relion.mrc import write_map

    half1_path, half2_path, star_path, png_path = _half_paths(output)
    maps = [acc1.reconstruct(), acc2.reconstruct()]
    write_map(half1_path, maps[0].cpu().numpy(), pixel)
    write_map(half2_path, maps[1].cpu().numpy(), pixel)
    curve = fourier_shell_correlation(maps[0], maps[1]).cpu()
    box = acc1.box
    res = resolution_at(curve, 0.143, box, pixel)
    log.info("Half-map FSC = 0.143 at %.2f Å (FSC = 0.5 at %.2f Å)", res, resolution_at(curve, 0.5, box, pixel))
    table = fsc_table(curve, box, pixel)
    _write_fsc_star(star_path, table)
    _plot_fsc(png_path, table, res)
    log.info("Wrote %s, %s, %s, %s", half1_path, half2_path, star_path, png_path)
    return [(str(half1_path), HALFMAP_LABEL)]


def _write_fsc_star(path: Path, table: "pd.DataFrame") -> None:
    import starfile

    from relion_dynamight.relion.jobdir import atomic_write_text

    tmp = path.with_name(f".{path.name}.tmp.star")
    starfile.write({"fsc": table}, tmp, overwrite=True)
    body = "\n".join(line for line in tmp.read_text().splitlines() if not line.startswith("# Created by"))
    tmp.unlink()
    atomic_write_text(path, f"\n# version 30001\n\n{body.strip()}\n\n")


def _plot_fsc(path: Path, table: "pd.DataFrame", res: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(table["rlnResolution"], table["rlnFourierShellCorrelation"], color="tab:blue", label="half maps")
    ax.axhline(0.143, color="grey", ls="--", lw=1, label="0.143")
    ax.axhline(0.0, color="black", lw=0.5)
    ax.set_xlabel("resolution (1/Å)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.05)
    ax.set_title(f"Half-map FSC: {res:.2f} Å at 0.143")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
