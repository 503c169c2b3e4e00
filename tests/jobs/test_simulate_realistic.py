"""The realistic simulation of issue 11: adenylate kinase's domain motion, a hidden envelope, SNR in the
particle disc, and the one-conformation limit data set (same poses, CTFs, envelope and noise)."""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pytest
import starfile
import torch

from relion_dynamight.analysis.phantom import _read_adk, adk_phantom, kabsch, load_phantom, screw_from_rigid
from relion_dynamight.imaging.ctf import ctf_2d
from relion_dynamight.imaging.fourier import radial_average_2d, rfft2_centered
from relion_dynamight.analysis.phantom_images import clean_images, particle_ctf
from relion_dynamight.jobs.simulate import LIMIT_STAR, RUN_DATA, _disc, simulate_project

BOX, PIXEL = 48, 2.0


def test_screw_reproduces_the_rigid_motion() -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(4, generator=gen, dtype=torch.float64)
    q = q / q.norm()
    w, x, y, z = q.tolist()
    rot = torch.tensor([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]], dtype=torch.float64)
    shift = torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64)
    pts = torch.randn(50, 3, generator=gen, dtype=torch.float64) * 10
    point, axis, degrees, along = screw_from_rigid(rot, shift)
    from relion_dynamight.analysis.phantom import DomainMotion

    moved = DomainMotion(torch.ones(50, dtype=torch.bool), point, axis, degrees, along).move(
        pts, torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(moved, pts @ rot.T + shift, atol=1e-9)


def test_adk_path_joins_the_crystal_structures() -> None:
    """Coordinate −0.5 is the closed structure; +0.5 the open one up to the domains' non-rigid changes."""
    phantom = adk_phantom(64, 1.5)
    closed, opened, _, resseq = _read_adk()
    assert len(phantom.domains) == 2 and int(phantom.moving.sum()) == 212 + 302
    for coordinate, structure, limit in ((-0.5, closed, 1e-6), (0.5, opened, 2.5)):
        pos = phantom.true_positions(coordinate) * 1.5
        rot, shift = kabsch(structure, pos)
        rmsd = float(((structure @ rot.T + shift - pos).norm(dim=1) ** 2).mean().sqrt())
        assert rmsd < limit, (coordinate, rmsd)
    # the CORE does not move, the LID tip moves by more than 20 Å between closed and open
    core = ~phantom.moving
    ends = phantom.true_positions(torch.tensor([-0.5, 0.5], dtype=torch.float64))
    assert torch.equal(ends[0][core], ends[1][core])
    assert float((ends[1] - ends[0]).norm(dim=1).max()) * 1.5 > 20.0


@pytest.fixture(scope="module")
def adk_project(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return simulate_project(tmp_path_factory.mktemp("adk") / "proj", n_particles=60, box=BOX, pixel_size=PIXEL,
                            snr=0.05, motion="adk", seed=2, envelope_bfactor=80.0, snr_region="disc", limit=True,
                            float16_groups=())


def test_truth_of_the_adk_project(adk_project: dict) -> None:
    root = adk_project["project"]
    meta = json.loads((root / "truth" / "phantom.json").read_text())
    assert meta["motion"] == "adk" and meta["envelope_bfactor"] == 80.0 and meta["snr_region"] == "disc"
    coords = adk_project["hinge_angles"]
    assert coords.min() >= -0.5 and coords.max() <= 0.5 and np.ptp(coords) > 0.5
    phantom = load_phantom(root / "truth")
    assert torch.allclose(phantom.true_positions(0.3), adk_project["phantom"].true_positions(0.3))
    # the STAR file does not state the envelope
    particles = starfile.read(root / RUN_DATA, always_dict=True)["particles"]
    assert (particles["rlnCtfBfactor"] == 0).all()


def _stack_images(root, names) -> np.ndarray:
    out = []
    for name in names:
        index, path = name.split("@")
        out.append(mrcfile.mmap(root / path, mode="r").data[int(index) - 1].astype(np.float64))
    return np.stack(out)


def test_limit_has_the_same_noise_in_the_reference_conformation(adk_project: dict) -> None:
    root, sim = adk_project["project"], adk_project
    data = starfile.read(root / RUN_DATA, always_dict=True)
    limit = starfile.read(root / LIMIT_STAR, always_dict=True)["particles"]
    own = _stack_images(root, data["particles"]["rlnImageName"])
    still = _stack_images(root, limit["rlnImageName"])
    table = data["particles"]
    clean_own = clean_images(sim["phantom"], table, data["optics"], sim["hinge_angles"], BOX, PIXEL, 80.0).numpy()
    clean_ref = clean_images(sim["phantom"], table, data["optics"], np.zeros(len(table)), BOX, PIXEL, 80.0).numpy()
    # the same noise: (image − clean) agrees between the two data sets
    assert np.allclose(own - clean_own, still - clean_ref, atol=1e-3 * float(np.abs(own).max()))
    # and the SNR is measured in the particle's disc: noise variance = disc signal variance / snr
    noise = float((own - clean_own).var())
    assert noise == pytest.approx(sim["noise_sigma"] ** 2, rel=0.05)
    disc = _disc(sim["phantom"], 0.5, BOX).numpy()
    assert 0.2 < disc.mean() < 0.8                                   # the particle, not the whole box
    disc_var = float(np.mean([img[disc].var() for img in clean_own]))   # one batch: all 60 particles
    assert sim["noise_sigma"] ** 2 == pytest.approx(disc_var / 0.05, rel=1e-3)
    assert disc_var > 1.3 * float(np.mean([img.var() for img in clean_own]))


def test_hidden_envelope_damps_the_images(adk_project: dict) -> None:
    """With the envelope the clean images lose power at high resolution as exp(−B s²/2) (power)."""
    root, sim = adk_project["project"], adk_project
    data = starfile.read(root / RUN_DATA, always_dict=True)
    table = data["particles"].iloc[:8]
    plain = clean_images(sim["phantom"], table, data["optics"], sim["hinge_angles"][:8], BOX, PIXEL, 0.0)
    damped = clean_images(sim["phantom"], table, data["optics"], sim["hinge_angles"][:8], BOX, PIXEL, 80.0)
    p0 = radial_average_2d(rfft2_centered(plain).abs() ** 2, BOX).mean(0)
    p1 = radial_average_2d(rfft2_centered(damped).abs() ** 2, BOX).mean(0)
    shell = 12
    s = shell / (BOX * PIXEL)
    assert float(p1[shell] / p0[shell]) == pytest.approx(float(np.exp(-80.0 * s * s / 2)), rel=0.05)
    assert ctf_2d(particle_ctf(table, data["optics"], PIXEL), BOX).abs().max() <= 1.0
