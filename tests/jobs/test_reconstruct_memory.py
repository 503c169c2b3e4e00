"""The final division's memory savings keep the results: compact shell grids, cached inverse weights, no NaN."""

from __future__ import annotations

import torch

import relion_dynamight.imaging.backprojection as bpm
from relion_dynamight.imaging.deformed_backprojection import DeformedBackprojector
from relion_dynamight.imaging.geometry import grid_points_3d

BOX = 24


def _filled(n_images: int, seed: int = 0) -> DeformedBackprojector:
    gen = torch.Generator().manual_seed(seed)
    bp = DeformedBackprojector(BOX)
    ident = grid_points_3d(BOX)
    for g in range(2):
        imgs = torch.randn(n_images, BOX, BOX, generator=gen)
        rot = torch.linalg.qr(torch.randn(n_images, 3, 3, generator=gen))[0]
        spectra, weights = bpm.prepare_spectra(imgs, torch.zeros(n_images, 2))
        bp.insert(spectra, weights, rot)
        bp.finish_group(ident + 0.4 * (g + 1) * torch.sin(ident / 5.0))
    return bp


def test_shell_grid_matches_float64_radius():
    size = 2 * BOX
    r = bpm._radius_grid(size, torch.device("cpu"))
    for radius in (BOX / 2, BOX / 2 - 0.3, 7.25):
        shells, inside = bpm._shell_grid(size, BOX, 2, radius, torch.device("cpu"))
        assert shells.dtype == torch.int32 and inside.dtype == torch.bool
        assert torch.equal(shells.long(), torch.round(r / 2).long().clamp_max(BOX // 2))
        assert torch.equal(inside, r < 2 * radius)


def test_same_wiener_reuses_the_inverse_weights(monkeypatch):
    bp = _filled(40)
    calls = []
    real = bpm.inverse_weight

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(bpm, "inverse_weight", counting)
    wiener = bpm.wiener_term_from_fsc(bp.weight_grid(), torch.linspace(1, 0, BOX // 2 + 1), BOX)
    bp.undeformed.reconstruct(wiener=wiener)
    standard = bp.standard_reconstruction(wiener=wiener.clone())          # equal values: a cache hit
    assert len(calls) == 1
    bp.undeformed.cache_inverse = False
    bp.undeformed._changed()
    uncached = bp.standard_reconstruction(wiener=wiener)
    assert len(calls) == 2 and torch.equal(standard, uncached)
    bp.undeformed.cache_inverse = True
    bp.standard_reconstruction(wiener=2 * wiener)                          # another term: recomputed
    assert len(calls) == 3
    bp.undeformed.insert(*bpm.prepare_spectra(torch.randn(1, BOX, BOX), torch.zeros(1, 2)), torch.eye(3)[None])
    bp.standard_reconstruction(wiener=2 * wiener)                          # the sums changed: recomputed
    assert len(calls) == 4


def test_sparse_weights_give_a_finite_map():
    """Few views leave voxels inside without any weight; Pipe-Menon's values there used to overflow float32 and
    make the whole unregularised map NaN (0 · inf)."""
    bp = _filled(6)
    assert bool((bp.weight_grid() == 0).any())
    for vol in (bp.standard_reconstruction(), bp.reconstruct()):
        assert bool(torch.isfinite(vol).all())
        assert float(vol.abs().max()) > 0
