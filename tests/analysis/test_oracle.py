"""The Bayes oracle of the science benchmark (:mod:`relion_dynamight.analysis.oracle`): it must recover the
truth from clean images, fall back to the prior when the images carry nothing, and its deformation field must
be the identity at the reference conformation and the true motion at the Gaussians."""

from __future__ import annotations

import json

import numpy as np
import pytest
import starfile
import torch

from relion_dynamight.analysis import oracle
from relion_dynamight.analysis.phantom import adk_phantom
from relion_dynamight.analysis.phantom_images import clean_images
from relion_dynamight.imaging.warp import grid_nodes
from relion_dynamight.jobs.simulate import RUN_DATA, simulate_project
from relion_dynamight.relion.particles import ParticleData

BOX, PIXEL = 32, 3.0


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict:
    sim = simulate_project(tmp_path_factory.mktemp("oracle") / "proj", n_particles=120, box=BOX, pixel_size=PIXEL,
                           snr=0.05, motion="adk", seed=3, envelope_bfactor=40.0, snr_region="disc")
    star = starfile.read(sim["project"] / RUN_DATA, always_dict=True)
    images = ParticleData(sim["project"] / RUN_DATA, project_dir=sim["project"]).batch(np.arange(120)).images.float()
    return {**sim, "optics": star["optics"], "table": star["particles"], "images": images}


def _clean_at(sim: dict, envelope: float = 40.0):
    n = len(sim["table"])
    return lambda t: clean_images(sim["phantom"], sim["table"], sim["optics"], np.full(n, t), BOX, PIXEL, envelope)


def test_clean_images_give_back_the_true_coordinates(project: dict) -> None:
    truth = np.asarray(project["hinge_angles"])
    n = len(truth)
    clean = clean_images(project["phantom"], project["table"], project["optics"], truth, BOX, PIXEL, 40.0)
    post = oracle.posterior_conformations(clean, _clean_at(project), sigma=1e-3 * float(clean.std()))
    assert np.abs(post.mean - truth).max() <= 0.5 * (oracle.DEFAULT_GRID[1] - oracle.DEFAULT_GRID[0]) + 1e-9
    assert len(post.sd) == n and post.sd.max() < 0.02


def test_the_noisy_data_are_informative_but_shrunk(project: dict) -> None:
    truth = np.asarray(project["hinge_angles"])
    post = oracle.posterior_conformations(project["images"], _clean_at(project), project["noise_sigma"])
    rho = abs(np.corrcoef(np.argsort(np.argsort(post.mean)), np.argsort(np.argsort(truth)))[0, 1])
    assert 0.3 < rho < 1.0
    assert 0.0 < oracle.shrinkage(post.mean, truth) < 1.0          # the posterior mean shrinks to the prior
    assert np.all(post.sd > 0) and post.sd.mean() < 0.9 * np.std(oracle.DEFAULT_GRID)   # less uncertain than the prior


def test_no_information_gives_the_prior(project: dict) -> None:
    post = oracle.posterior_conformations(project["images"], _clean_at(project), sigma=1e9)
    assert np.allclose(post.mean, 0.0, atol=1e-6)
    assert np.allclose(post.sd, np.std(oracle.DEFAULT_GRID), rtol=1e-6)


def test_true_field_is_identity_at_reference_and_the_motion_at_the_gaussians() -> None:
    phantom = adk_phantom(BOX, PIXEL)
    weights = oracle.field_weights(phantom, BOX, smoothing=0.3)
    nodes = grid_nodes(BOX, BOX)
    assert torch.allclose(oracle.true_field(phantom, 0.0, weights), nodes, atol=1e-5)
    field = oracle.true_field(phantom, 0.4, weights)
    true = phantom.true_positions(0.4).float()
    # sample the field at the voxel nearest to each Gaussian: the displacement there is the Gaussian's own
    idx = (phantom.positions.round().long() + BOX // 2).clamp(0, BOX - 1)
    at = field[idx[:, 2], idx[:, 1], idx[:, 0]] - nodes[idx[:, 2], idx[:, 1], idx[:, 0]]
    expected = true - phantom.positions.float()
    near = (phantom.positions - phantom.positions.round()).norm(dim=1) < 0.3
    for part in (phantom.moving, ~phantom.moving):
        err = (at - expected)[near & part].norm(dim=1)
        assert float(err.median()) < 0.25, float(err.median())
    assert float(expected[near & phantom.moving].norm(dim=1).median()) > 1.0


def test_coordinate_groups_are_equal_count_bins() -> None:
    coords = np.random.default_rng(0).uniform(-0.5, 0.5, 1000)
    labels, centres = oracle.coordinate_groups(coords, 8)
    assert set(np.unique(labels)) == set(range(8))
    assert np.all(np.bincount(labels) >= 120) and np.all(np.diff(centres) > 0)
    for g in range(8):
        assert np.isclose(coords[labels == g].mean(), centres[g])


def test_phantom_json_states_the_noise_the_oracle_needs(project: dict) -> None:
    info = json.loads((project["truth"] / "phantom.json").read_text())
    assert info["noise_sigma"] == pytest.approx(project["noise_sigma"]) and info["envelope_bfactor"] == 40.0
