"""Ground-truth scores of the science benchmark (issue 11) on cases whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from relion_dynamight.analysis.phantom import builtin_phantom
from relion_dynamight.analysis.truth_scores import (crossing, gap_closure, latent_order, region_masks,
                                                    resolution_vs_truth)
from relion_dynamight.imaging.gaussians import render_volume

BOX, PIXEL = 32, 3.0


def test_crossing_interpolates_between_shells() -> None:
    curve = torch.tensor([1.0, 0.9, 0.7, 0.3, 0.1])
    # 0.5 is half-way between shell 2 (0.7) and 3 (0.3): shell 2.5
    assert crossing(curve, 0.5, 8, 2.0) == pytest.approx(8 * 2.0 / 2.5)
    assert crossing(torch.ones(5), 0.5, 8, 2.0) == 4.0                  # never falls: Nyquist


def test_gap_closure() -> None:
    assert gap_closure(5.0, 5.0, 4.0) == pytest.approx(0.0)
    assert gap_closure(4.0, 5.0, 4.0) == pytest.approx(1.0)
    assert gap_closure(1 / (0.5 / 5 + 0.5 / 4), 5.0, 4.0) == pytest.approx(0.5)
    assert np.isnan(gap_closure(5.0, 5.0, 5.0))


def test_latent_order() -> None:
    rng = np.random.default_rng(0)
    truth = rng.uniform(-1, 1, 500)
    z = np.stack([rng.normal(size=500), truth * 3 + 0.01 * rng.normal(size=500), rng.normal(size=500)], 1)
    order = latent_order(z, truth)
    assert order.best > 0.99 and order.r2 > 0.99
    noise = latent_order(rng.normal(size=(500, 3)), truth)
    assert noise.best < 0.2


def test_region_masks_and_resolution() -> None:
    phantom = builtin_phantom(BOX, PIXEL)
    masks = region_masks(phantom, BOX)
    assert torch.allclose(masks["moving"] + masks["static"], masks["full"])
    assert float(masks["moving"].sum()) > 0.1 * float(masks["full"].sum())
    truth = render_volume(phantom.positions, phantom.amplitudes, phantom.widths, BOX).float()
    assert resolution_vs_truth(truth, truth, masks["full"], PIXEL) == 2 * PIXEL
    # a blurred map is worse against the truth, and moving the arm hurts only the moving region
    moved = render_volume(phantom.true_positions(15.0), phantom.amplitudes, phantom.widths, BOX).float()
    noise = 0.05 * truth.std() * torch.randn(truth.shape, generator=torch.Generator().manual_seed(1))
    static = resolution_vs_truth(moved + noise, truth, masks["static"], PIXEL)
    moving = resolution_vs_truth(moved + noise, truth, masks["moving"], PIXEL)
    assert moving > static + 1.0
