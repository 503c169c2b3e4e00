"""The Gaussian forward model: rendering, projection (vs RELION and vs exact sums), gradients."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from relion_dynamight.imaging.ctf import ctf_2d
from relion_dynamight.imaging.gaussians import project_gaussians, real_from_spectra, render_volume
from relion_dynamight.imaging.geometry import euler_to_matrix
from relion_dynamight.imaging.projection import project_map_real

from projection_data import BOX, _ctf_params, _pose_table, _poses, correlations, relion_project


def _gaussians(m: int, box: int, seed: int = 0, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    pos = (torch.rand(m, 3, generator=g, dtype=dtype) - 0.5) * box * 0.55
    amp = 0.5 + torch.rand(m, generator=g, dtype=dtype)
    widths = torch.full((m,), 1.2, dtype=dtype)
    widths[::3] = 2.0  # two width classes
    return pos, amp, widths


def _random_rotations(b: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ang = torch.rand(b, 3, generator=g, dtype=torch.float64) * torch.tensor([360.0, 180.0, 360.0], dtype=torch.float64)
    return euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2])


def test_render_volume_values() -> None:
    pos = torch.tensor([[0.0, 0.0, 0.0], [5.0, -3.0, 2.0]], dtype=torch.float64)
    vol = render_volume(pos, torch.tensor([2.0, 1.0], dtype=torch.float64), 1.5, 32)
    assert vol.shape == (32, 32, 32)
    assert vol[16, 16, 16] == pytest.approx(2.0, abs=1e-3)
    assert vol[16 + 2, 16 - 3, 16 + 5] == pytest.approx(1.0, abs=1e-3)  # [z, y, x] of (5, -3, 2)
    total = 3.0 * (2 * math.pi) ** 1.5 * 1.5**3
    assert float(vol.sum()) == pytest.approx(total, rel=1e-6)


def test_project_gaussians_matches_relion_project_of_rendered_map(tmp_path: Path, relion: None) -> None:
    pos, amp, widths = _gaussians(400, BOX)
    vol = render_volume(pos, amp, widths, BOX)
    optics, particles = _pose_table(8, seed=21)
    ref = torch.from_numpy(relion_project(tmp_path, vol, optics, particles, ctf=True))
    rotations, shifts = _poses(particles)
    ctf = ctf_2d(_ctf_params(optics, particles), BOX, dtype=torch.float64)
    for oversample in (1, 2):
        spectra = project_gaussians(pos, amp, widths, rotations, BOX, shifts, ctf, oversample=oversample)
        cc = correlations(real_from_spectra(spectra, BOX), ref)
        print(f"oversample {oversample}: min CC vs relion_project of render_volume = {float(cc.min()):.6f}")
        assert float(cc.min()) >= 0.99


@pytest.mark.parametrize("oversample", [1, 2])
def test_splat_matches_exact_sum_and_map_projection(oversample: int) -> None:
    box = 32
    pos, amp, widths = _gaussians(150, box, seed=4)
    rot = _random_rotations(4)
    shifts = torch.tensor([[0.0, 0.0], [1.5, -2.25], [-3.0, 0.5], [0.3, 0.7]], dtype=torch.float64)
    splat = real_from_spectra(project_gaussians(pos, amp, widths, rot, box, shifts, oversample=oversample), box)
    exact = real_from_spectra(project_gaussians(pos, amp, widths, rot, box, shifts, method="exact"), box)
    mapped = project_map_real(render_volume(pos, amp, widths, box), rot, shifts)
    assert float(correlations(splat, exact).min()) > 0.9995
    assert float(correlations(splat, mapped).min()) > 0.999
    # Same scale too: the projection is the line integral of the rendered Gaussians.
    assert float((splat.sum(dim=(-2, -1)) / exact.sum(dim=(-2, -1)) - 1).abs().max()) < 1e-3


def test_per_image_positions_and_scalar_parameters() -> None:
    box = 24
    pos, _, _ = _gaussians(40, box, seed=7)
    rot = _random_rotations(3, seed=2)
    moved = pos[None] + torch.randn(3, 40, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    batch = project_gaussians(moved, 1.0, 1.5, rot, box)
    for i in range(3):
        one = project_gaussians(moved[i], torch.ones(40, dtype=torch.float64), torch.full((40,), 1.5, dtype=torch.float64),
                                rot[i:i + 1], box)
        assert torch.allclose(batch[i:i + 1], one, atol=1e-10)


def test_gradients_match_finite_differences() -> None:
    box = 16
    pos, amp, widths = _gaussians(12, box, seed=9)
    rot = _random_rotations(2, seed=3)
    shifts = torch.tensor([[0.5, -1.0], [0.0, 2.0]], dtype=torch.float64)
    ctf = torch.rand(2, box, box // 2 + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    pos.requires_grad_(True)
    amp.requires_grad_(True)
    shared = torch.tensor([1.3, 2.1], dtype=torch.float64, requires_grad=True)  # per-class width parameters
    classes = torch.arange(12) % 2

    def images(p: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return real_from_spectra(project_gaussians(p, a, w[classes], rot, box, shifts, ctf), box)

    assert torch.autograd.gradcheck(images, (pos, amp, shared), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_gradient_of_a_loss_wrt_positions_points_downhill() -> None:
    """A scalar image loss: autograd equals central differences for every coordinate."""
    box = 24
    pos, amp, widths = _gaussians(20, box, seed=5)
    rot = _random_rotations(3, seed=8)
    target = project_gaussians(pos + 0.7, amp, widths, rot, box)

    def loss(p: torch.Tensor) -> torch.Tensor:
        return (project_gaussians(p, amp, widths, rot, box) - target).abs().pow(2).sum()

    p = pos.clone().requires_grad_(True)
    loss(p).backward()
    eps = 1e-5
    numeric = torch.zeros_like(pos)
    for i in range(pos.shape[0]):
        for j in range(3):
            d = torch.zeros_like(pos)
            d[i, j] = eps
            numeric[i, j] = (loss(pos + d) - loss(pos - d)) / (2 * eps)
    assert torch.allclose(p.grad, numeric, rtol=1e-4, atol=1e-8 * float(numeric.abs().max()))


def test_float32_and_device() -> None:
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    box = 32
    pos, amp, widths = _gaussians(200, box, seed=6, dtype=torch.float32)
    rot = _random_rotations(4).float()
    ref = project_gaussians(pos.double(), amp.double(), widths.double(), rot.double(), box)
    out = project_gaussians(pos.to(device), amp.to(device), widths.to(device), rot.to(device), box)
    assert out.dtype == torch.complex64 and out.device.type == device.type
    cc = correlations(real_from_spectra(out.cpu().to(torch.complex128), box), real_from_spectra(ref, box))
    assert float(cc.min()) > 0.99999


def test_too_many_width_classes_is_a_clear_error() -> None:
    pos, amp, _ = _gaussians(100, 16, seed=2)
    with pytest.raises(ValueError, match="distinct Gaussian widths"):
        project_gaussians(pos, amp, torch.linspace(1.0, 2.0, 100, dtype=torch.float64), _random_rotations(1), 16)
    exact = project_gaussians(pos, amp, torch.linspace(1.0, 2.0, 100, dtype=torch.float64), _random_rotations(1), 16,
                              method="exact")
    assert exact.shape == (1, 16, 9)
