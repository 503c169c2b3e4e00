"""Scores of a DynaMight job against the ground truth of a simulated data set (``simulate``'s ``truth/``).

Used by ``scripts/bench_science.py`` and the tests; nothing here is needed to run a job on real data.

Regions: voxels within :data:`REGION_RADIUS` px of the phantom's Gaussians in the reference conformation,
split into *moving* (closer to a Gaussian of a moving domain) and *static* (closer to a static one); masks
have raised-cosine edges of :data:`EDGE` px (also across the moving/static split).  Resolutions are read from masked FSC curves between a map
and the true map of the reference conformation (``truth/map_reference.mrc``) at ``FSC = 0.5``, interpolated
linearly between shells (:func:`crossing`), in Å.

* **gap closure** ``g = (1/d_map − 1/d_cons) / (1/d_limit − 1/d_cons)`` in spatial frequency, with ``d_cons``
  the standard reconstruction of the same particles and ``d_limit`` the same particles simulated in one
  conformation: 0 = no better than ignoring the motion, 1 = as good as no motion at all;
* **latent order**: |Spearman ρ| between the true conformation coordinate and the best linear read-out of the
  latent codes (least squares within each half), and of the first principal component;
* **deformation**: the decoder's displacement field at the phantom's reference centres against the true
  displacements (:func:`relion_dynamight.analysis.deformation_errors.deformation_errors`), and the *amplitude
  recovered* ``Σ d_learned·d_true / Σ |d_true|²`` over the moving Gaussians (1 = the whole motion);
* **honesty**: the half maps' FSC = 0.143 resolution against the full map's FSC = 0.5 resolution vs truth
  (the two agree for unbiased half maps; ``ratio`` > 1 means the half maps claim more than is there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from relion_dynamight.analysis.phantom import Phantom
from relion_dynamight.analysis.regions import nearest_point
from relion_dynamight.imaging.fourier import crossing_shell, fsc

#: Region masks: voxels within this distance (px) of a Gaussian of the reference conformation.
REGION_RADIUS = 3.0
#: Width (px) of the masks' raised-cosine edge.
EDGE = 2.0


def region_masks(phantom: Phantom, box: int) -> dict[str, Tensor]:
    """Soft masks ``(box, box, box)`` float32 (``[z, y, x]``): ``"full"``, ``"moving"``, ``"static"``."""
    axis = torch.arange(box, dtype=torch.float64) - box // 2
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).flip(-1).reshape(-1, 3)  # (x, y, z)
    d_move = _nearest(grid, phantom.positions[phantom.moving])
    d_stat = _nearest(grid, phantom.positions[~phantom.moving])
    d_all = torch.minimum(d_move, d_stat)
    full = _soft(d_all)
    # moving vs static: a raised-cosine split over ±EDGE px of (d_static − d_moving), so that no mask has a
    # sharp edge (a sharp edge gives both masked maps the same high-frequency content and inflates the FSC)
    t = ((d_stat - d_move) / (2 * EDGE)).clamp(-0.5, 0.5)
    share = 0.5 + 0.5 * torch.sin(math.pi * t)
    moving = full * share
    static = full * (1 - share)
    shape = (box, box, box)
    return {"full": full.reshape(shape).float(), "moving": moving.reshape(shape).float(),
            "static": static.reshape(shape).float()}


def _nearest(points: Tensor, centres: Tensor) -> Tensor:
    """Distance ``(P,)`` of each point to its nearest centre (inf when there are none)."""
    if centres.shape[0] == 0:
        return torch.full((points.shape[0],), math.inf, dtype=points.dtype)
    return nearest_point(points, centres)[0]


def _soft(distance: Tensor) -> Tensor:
    t = ((distance - REGION_RADIUS) / EDGE).clamp(0.0, 1.0)
    return 0.5 + 0.5 * torch.cos(math.pi * t)


def masked_fsc(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """FSC ``(box//2+1,)`` of ``a·mask`` and ``b·mask``."""
    return fsc(a.float() * mask, b.float() * mask)


def crossing(curve: Tensor, threshold: float, box: int, pixel: float) -> float:
    """Resolution (Å) where ``curve`` first falls below ``threshold``, linear between shells; Nyquist if never."""
    shell = crossing_shell(curve, threshold)
    return 2.0 * pixel if shell is None else box * pixel / max(shell, 1e-3)


def resolution_vs_truth(vol: Tensor, truth: Tensor, mask: Tensor, pixel: float, threshold: float = 0.5) -> float:
    """Masked FSC = ``threshold`` resolution (Å) of ``vol`` against ``truth``."""
    return crossing(masked_fsc(vol, truth, mask), threshold, vol.shape[-1], pixel)


def gap_closure(d_map: float, d_consensus: float, d_limit: float, least_gain: float = 0.02) -> float:
    """``(1/d_map − 1/d_cons) / (1/d_limit − 1/d_cons)``; NaN when the limit gains less than ``least_gain``
    (a fraction of ``1/d_cons``) over the consensus: there is no gap to close (e.g. a static region)."""
    gain = 1.0 / d_limit - 1.0 / d_consensus
    return (1.0 / d_map - 1.0 / d_consensus) / gain if gain > least_gain / d_consensus else float("nan")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two 1-D arrays (average ranks for ties are not needed here)."""
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


@dataclass
class LatentOrder:
    best: float          # |ρ| of the least-squares linear read-out
    pc1: float           # |ρ| of the first principal component
    r2: float            # R² of the linear read-out


def latent_order(latents: np.ndarray, truth: np.ndarray) -> LatentOrder:
    """How well the latent codes ``(n, L)`` order the true conformation coordinate ``(n,)``."""
    z = latents - latents.mean(0)
    design = np.concatenate([z, np.ones((len(z), 1))], axis=1)
    coef, *_ = np.linalg.lstsq(design, truth, rcond=None)
    pred = design @ coef
    r2 = 1.0 - float(((truth - pred) ** 2).sum() / max(((truth - truth.mean()) ** 2).sum(), 1e-30))
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    pc1 = z @ vt[0]
    return LatentOrder(abs(spearman(pred, truth)), abs(spearman(pc1, truth)), r2)


@dataclass
class DeformationScore:
    error: float          # mean RMS position error (px) of the learned deformation
    baseline: float       # mean RMS true displacement (px): the error of no deformation at all
    amplitude: float      # Σ d_learned·d_true / Σ |d_true|² over moving Gaussians


@torch.no_grad()
def deformation_score(decoder: torch.nn.Module, latents: Tensor, phantom: Phantom, coords: Tensor,
                      batch: int = 256) -> DeformationScore:
    """The decoder against the true displacements of ``phantom`` at conformation ``coords`` ``(n,)``."""
    from relion_dynamight.analysis.deformation_errors import deformation_errors

    ref = phantom.positions.float()
    errs, baseline, dot, norm = [], [], 0.0, 0.0
    device = next(decoder.parameters()).device
    for i in range(0, latents.shape[0], batch):
        z = latents[i:i + batch]
        truth = phantom.true_positions(coords[i:i + batch]).float()
        e = deformation_errors(decoder, z, ref, truth, phantom.moving)
        errs.append(e.learned)
        baseline.append(e.baseline)
        learned = decoder(ref.to(device), z.to(device=device, dtype=torch.float32)).cpu()[:, phantom.moving]
        true = (truth - ref)[:, phantom.moving]
        dot += float((learned * true).sum())
        norm += float(true.pow(2).sum())
    return DeformationScore(float(torch.cat(errs).mean()), float(torch.cat(baseline).mean()),
                            dot / max(norm, 1e-30))


# -- a whole job against the truth ------------------------------------------------------------------
REGIONS = ("full", "moving", "static")


def _load(path) -> Tensor:
    from relion_dynamight.relion.mrc import read_map

    return torch.from_numpy(read_map(path)[0])


def map_scores(halves: tuple[Tensor, Tensor], truth: Tensor, masks: dict[str, Tensor], pixel: float) -> dict:
    """Per region: FSC = 0.5 resolution vs truth of each half and of their average (``final``), and the
    half maps' own FSC = 0.143 resolution (``half_fsc``)."""
    out: dict = {}
    final = 0.5 * (halves[0] + halves[1])
    for name in REGIONS:
        mask = masks[name]
        out[name] = {"half1": resolution_vs_truth(halves[0], truth, mask, pixel),
                     "half2": resolution_vs_truth(halves[1], truth, mask, pixel),
                     "final": resolution_vs_truth(final, truth, mask, pixel),
                     "half_fsc": crossing(masked_fsc(halves[0], halves[1], mask), 0.143, truth.shape[-1], pixel)}
    return out


def score_job(project, job, consensus_halves: tuple, limit_halves: tuple, forward: Any,
              decoders: dict[int, torch.nn.Module]) -> dict:
    """All scores of a DynaMight job ``project/job`` (see module docstring).

    ``consensus_halves`` / ``limit_halves``: paths of the half maps of the standard reconstruction of the same
    particles and of the one-conformation limit (``reconstruct --halves`` of ``truth/limit/particles.star``).
    ``forward``: the job's trained forward model (:func:`relion_dynamight.training.trained.load_forward`: its
    ``image_names``, ``half`` and ``latents``) and ``decoders`` each half's decoder
    (:func:`~relion_dynamight.training.trained.forward_decoder`).
    """
    from pathlib import Path

    import pandas as pd

    from relion_dynamight.analysis.phantom import load_phantom

    project, job = Path(project), Path(project) / job
    phantom = load_phantom(project / "truth")
    truth = _load(project / "truth" / "map_reference.mrc")
    pixel, box = phantom.pixel_size, phantom.box
    masks = region_masks(phantom, box)
    folder = job / "backprojection"
    maps: dict[str, tuple[Tensor, Tensor]] = {
        "consensus": (_load(consensus_halves[0]), _load(consensus_halves[1])),
        "standard": (_load(folder / "standard_half1.mrc"), _load(folder / "standard_half2.mrc")),
        "improved": (_load(folder / "map_half1.mrc"), _load(folder / "map_half2.mrc")),
        "limit": (_load(limit_halves[0]), _load(limit_halves[1]))}
    result: dict = {"maps": {k: map_scores(v, truth, masks, pixel) for k, v in maps.items()}}
    cons, lim, imp = (result["maps"][k] for k in ("consensus", "limit", "improved"))
    result["gap_closure"] = {r: gap_closure(imp[r]["final"], cons[r]["final"], lim[r]["final"]) for r in REGIONS}
    result["honesty"] = {k: v["full"]["half_fsc"] / v["full"]["final"] for k, v in result["maps"].items()}
    # latent space and decoder, per half
    table = pd.read_csv(project / "truth" / "particles.csv")
    coordinate = dict(zip(table["rlnImageName"], table["hinge_angle"]))
    inputs = forward
    coords = np.array([coordinate[n] for n in inputs.image_names], dtype=np.float64)
    result["latent"], result["deformation"] = {}, {}
    for h in (1, 2):
        rows = np.flatnonzero(inputs.half == h)
        order = latent_order(inputs.latents[rows].numpy().astype(np.float64), coords[rows])
        result["latent"][h] = order.__dict__
        result["deformation"][h] = deformation_score(decoders[h], inputs.latents[rows], phantom,
                                                     torch.from_numpy(coords[rows])).__dict__
    return result


def format_table(result: dict) -> str:
    """The README table: resolutions (Å, FSC = 0.5 vs truth) per map and region, half-map FSC, honesty."""
    lines = ["| half maps (same particles) | full | moving domains | static core | half-map FSC 0.143 | "
             "honesty (half-map / truth) |", "|---|---|---|---|---|---|"]
    names = {"consensus": "`reconstruct --halves` (standard)", "standard": "job: `standard_half*.mrc`",
             "improved": "job: `map_half*.mrc` (improved)", "limit": "same particles in one conformation (limit)"}
    for key, label in names.items():
        s = result["maps"][key]
        lines.append(f"| {label} | {s['full']['final']:.2f} Å | {s['moving']['final']:.2f} Å | "
                     f"{s['static']['final']:.2f} Å | {s['full']['half_fsc']:.2f} Å | {result['honesty'][key]:.3f} |")
    oracle = result.get("oracle")
    if oracle:
        s = oracle["maps"]
        lines.append(f"| oracle: true deformation at the Bayes estimate of each particle's conformation | "
                     f"{s['full']['final']:.2f} Å | {s['moving']['final']:.2f} Å | {s['static']['final']:.2f} Å | "
                     f"{s['full']['half_fsc']:.2f} Å | {s['full']['half_fsc'] / s['full']['final']:.3f} |")
    g = result["gap_closure"]
    lines.append("")
    lines.append(f"gap closure g: full {g['full']:.2f}, moving {g['moving']:.2f}, static {g['static']:.2f}"
                 + (f" (oracle: moving {oracle_gap(result)['moving']:.2f})" if oracle else ""))
    for h in (1, 2):
        lat, dfm = _per_half(result["latent"], h), _per_half(result["deformation"], h)
        ceiling = (f" [oracle: |ρ| {_per_half(oracle['latent'], h):.3f}, amplitude "
                   f"{_per_half(oracle['amplitude'], h):.2f}]" if oracle else "")
        lines.append(f"half {h}: latent |ρ| best {lat['best']:.3f} (PC1 {lat['pc1']:.3f}, R² {lat['r2']:.3f}); "
                     f"deformation error {dfm['error']:.2f} px vs {dfm['baseline']:.2f} px undeformed, "
                     f"amplitude recovered {dfm['amplitude']:.2f}{ceiling}")
    return "\n".join(lines)


def _per_half(values: dict, half: int):
    """``values[half]`` whether the keys are ints or (after a JSON round trip) strings."""
    return values[half] if half in values else values[str(half)]


def oracle_gap(result: dict) -> dict[str, float]:
    """Gap closure of the oracle's map (:mod:`.oracle`) per region: the most a per-particle estimate can give."""
    cons, lim, orc = result["maps"]["consensus"], result["maps"]["limit"], result["oracle"]["maps"]
    return {r: gap_closure(orc[r]["final"], cons[r]["final"], lim[r]["final"]) for r in REGIONS}
