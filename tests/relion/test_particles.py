"""Particle batches: poses, shifts (sign and per-group pixel size), CTF, streaming."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from particle_files import make_project
from relion_dynamight.imaging.geometry import euler_to_matrix
from relion_dynamight.relion.mrc import write_stack
from relion_dynamight.relion.particles import ParticleBatch, ParticleData


def blob_project(tmp_path: Path, version: str) -> tuple:
    """Images of a Gaussian blob at the box centre translated by ``-origin`` (RELION's convention)."""
    p = make_project(tmp_path, n=20, box=48, version=version, pixel_sizes=(1.1, 1.7))
    pix = np.where(np.arange(20) % 2 == 0, 1.1, 1.7)
    if version == "3.0":
        origin = p.particles[["rlnOriginX", "rlnOriginY"]].to_numpy()
    else:
        origin = p.particles[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / pix[:, None]
    y, x = np.mgrid[:48, :48]
    centre = 24 - origin  # (n, 2) x, y of the blob
    imgs = np.exp(-((x[None] - centre[:, 0, None, None]) ** 2 + (y[None] - centre[:, 1, None, None]) ** 2) / 8.0)
    for s, rows in enumerate(np.array_split(np.arange(20), 2)):
        write_stack(tmp_path / f"Extract/job001/Movies/mic{s:03d}.mrcs", imgs[rows].astype(np.float32), 1.0)
    return p, origin


@pytest.mark.parametrize("version", ["3.1", "3.0"])
def test_shift_recentres_the_particle(tmp_path: Path, version: str) -> None:
    """Ground truth: image centroid + batch.shifts == box centre (pixels of each particle's own group)."""
    p, origin = blob_project(tmp_path, version)
    data = ParticleData(p.star, project_dir=tmp_path)
    b = data.batch(np.arange(20))
    img = b.images.numpy()
    y, x = np.mgrid[:48, :48]
    cx = (img * x).sum((1, 2)) / img.sum((1, 2))
    cy = (img * y).sum((1, 2)) / img.sum((1, 2))
    assert np.abs(origin).max() > 1.0
    np.testing.assert_allclose(cx + b.shifts[:, 0].numpy(), 24.0, atol=1e-3)
    np.testing.assert_allclose(cy + b.shifts[:, 1].numpy(), 24.0, atol=1e-3)


def test_batch_fields(tmp_path: Path) -> None:
    p = make_project(tmp_path, n=30, pixel_sizes=(1.1, 1.7))
    data = ParticleData(p.star, project_dir=tmp_path)
    assert len(data) == 30 and data.box == 32 and data.table.version == "3.1"
    idx = [29, 4, 4, 11]
    b = data.batch(idx)
    assert isinstance(b, ParticleBatch) and len(b) == 4
    assert b.index.dtype == torch.int64 and b.index.tolist() == idx
    assert b.images.dtype == torch.float32 and b.images.shape == (4, 32, 32)
    np.testing.assert_array_equal(b.images.numpy(), p.images[idx])
    ang = torch.tensor(p.particles[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()[idx])
    expected = euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2]).float()
    assert b.rotations.dtype == torch.float32 and b.rotations.shape == (4, 3, 3)
    np.testing.assert_allclose(b.rotations.numpy(), expected.numpy(), atol=1e-6, rtol=0)
    pix = np.where(np.array(idx) % 2 == 0, 1.1, 1.7)
    origins = p.particles[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()[idx] / pix[:, None]
    np.testing.assert_allclose(b.shifts.numpy(), origins, atol=1e-5)
    np.testing.assert_allclose(b.ctf.pixel_size.numpy(), pix, rtol=1e-6)
    np.testing.assert_allclose(b.ctf.voltage.numpy(), np.where(np.array(idx) % 2 == 0, 300.0, 200.0))
    np.testing.assert_allclose(b.ctf.defocus_u.numpy(), p.particles["rlnDefocusU"].to_numpy()[idx], rtol=1e-6)
    assert b.ctf_premultiplied.dtype == torch.bool and not b.ctf_premultiplied.any()
    moved = b.to(torch.device("cpu"))
    assert moved.images.device.type == "cpu" and moved.ctf.voltage.device.type == "cpu"
    if torch.cuda.is_available():
        cuda = b.to("cuda")
        assert cuda.images.is_cuda and cuda.ctf.defocus_u.is_cuda and cuda.ctf_premultiplied.is_cuda


def test_iter_batches_and_preload(tmp_path: Path) -> None:
    p = make_project(tmp_path, n=23, float16=True)
    lazy = ParticleData(p.star, project_dir=tmp_path)
    pre = ParticleData(p.star, project_dir=tmp_path, preload=True)
    sel = np.array([22, 0, 5, 6, 7, 13, 1])
    batches = list(lazy.iter_batches(sel, batch_size=3))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert torch.cat([b.index for b in batches]).tolist() == sel.tolist()
    np.testing.assert_array_equal(torch.cat([b.images for b in batches]).numpy(), p.images[sel])
    all_lazy = torch.cat([b.images for b in lazy.iter_batches(None, batch_size=8)])
    all_pre = torch.cat([b.images for b in pre.iter_batches(None, batch_size=8)])
    assert all_lazy.shape == (23, 32, 32)
    np.testing.assert_array_equal(all_lazy.numpy(), all_pre.numpy())


def test_streaming_memory_independent_of_particle_count(tmp_path: Path) -> None:
    """Iterating 600 particles in batches of 10 never holds more than a few batches of images."""
    p = make_project(tmp_path, n=600, box=64, n_stacks=6)
    data = ParticleData(p.star, project_dir=tmp_path)
    batch_bytes = 10 * 64 * 64 * 4
    total = 0.0
    tracemalloc.start()
    try:
        for b in data.iter_batches(np.arange(600), batch_size=10):
            total += float(b.images.sum())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.isclose(total, p.images.astype(np.float64).sum(), rtol=1e-4, atol=1e-2)
    all_bytes = 600 * 64 * 64 * 4
    assert peak < 0.15 * all_bytes, f"peak {peak} bytes ({peak / batch_bytes:.1f} batches) vs all images {all_bytes}"
