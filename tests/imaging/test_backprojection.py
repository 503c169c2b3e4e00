"""Fourier backprojection engine (relion_dynamight.imaging.backprojection) on real relion_project data."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from backprojection_data import make_projections, read_mrc
from relion_dynamight.imaging.backprojection import (
    FourierAccumulator, inverse_weight, normalise_backprojection, prepare_spectra, wiener_term_from_fsc)
from relion_dynamight.imaging.ctf import ctf_2d
from relion_dynamight.imaging.fourier import rfft2_centered, rfft3_centered, shell_index_3d
from relion_dynamight.relion.particles import ParticleData

BOX = 48


def _cc(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / torch.sqrt((a * a).sum() * (b * b).sum()))


def _shell_power(vol: torch.Tensor) -> torch.Tensor:
    f = rfft3_centered(vol.double()).abs() ** 2
    shells = shell_index_3d(vol.shape[-1]).flatten()
    keep = shells <= vol.shape[-1] // 2
    total = torch.zeros(vol.shape[-1] // 2 + 1, dtype=torch.float64).index_add_(0, shells[keep], f.flatten()[keep])
    count = torch.zeros_like(total).index_add_(0, shells[keep], torch.ones_like(f.flatten()[keep]))
    return total / count


@pytest.fixture(scope="module")
def clean_data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from runs import relion_available

    if not relion_available():
        pytest.skip("RELION 3.1.3 binaries not found (install with: apt-get install -y relion)")
    out = make_projections(tmp_path_factory.mktemp("clean"), box=BOX, n=300, seed=3)
    data = ParticleData(out["star"])
    acc = FourierAccumulator(BOX)
    for batch in data.iter_batches(None, 128):
        spectra, weights = prepare_spectra(batch.images, batch.shifts, ctf_2d(batch.ctf, BOX), batch.ctf_premultiplied)
        acc.insert(spectra, weights, batch.rotations)
    return {"acc": acc, "truth": torch.from_numpy(read_mrc(out["truth"])), "data": data}


@pytest.mark.parametrize("method", ["gridding", "floor"])
def test_noise_free_reconstruction_reproduces_the_projected_map(clean_data: dict, method: str) -> None:
    vol = clean_data["acc"].reconstruct(method=method)
    truth = clean_data["truth"]
    cc = _cc(vol, truth)
    scale = float((vol * truth).sum() / (truth * truth).sum())
    print(f"{method}: CC vs truth {cc:.5f}, scale {scale:.4f}")
    assert vol.shape == (BOX,) * 3 and vol.dtype == torch.float32
    assert cc >= 0.99
    assert abs(scale - 1.0) < 0.03  # absolute density scale of the projections is kept


def test_accumulators_add_and_normalisation_paths_agree(clean_data: dict) -> None:
    data = clean_data["data"]
    rows = np.arange(len(data))
    parts = [FourierAccumulator(BOX), FourierAccumulator(BOX)]
    for acc, share in zip(parts, (rows[:100], rows[100:])):
        for batch in data.iter_batches(share, 64):
            acc.insert(*prepare_spectra(batch.images, batch.shifts, ctf_2d(batch.ctf, BOX)), batch.rotations)
    summed = FourierAccumulator(BOX).add_(parts[0]).add_(parts[1])
    whole = clean_data["acc"]
    assert summed.count == whole.count == len(data)
    assert torch.allclose(summed.weight, whole.weight, rtol=1e-4, atol=1e-4 * float(whole.weight.max()))
    # reconstruct() is normalise_backprojection() of the padded real-space backprojection
    ref = whole.reconstruct()
    via_bp = normalise_backprojection(whole.backprojection_volume(crop=False), whole.weight_grid(), BOX)
    assert float((via_bp - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    assert whole.backprojection_volume().shape == (BOX,) * 3


def test_hermitian_x0_plane_and_radius(clean_data: dict) -> None:
    acc = clean_data["acc"]
    grid = acc.data_grid()
    plane = grid[:, :, 0]
    mirror = torch.roll(torch.flip(plane, dims=(0, 1)), shifts=(1, 1), dims=(0, 1))
    assert torch.allclose(plane, mirror.conj(), atol=1e-5 * float(plane.abs().max()))
    inv = inverse_weight(acc.weight_grid(), BOX, method="floor")
    k = torch.fft.fftfreq(2 * BOX, d=1 / (2 * BOX))
    kz, ky, kx = torch.meshgrid(k, k, torch.arange(BOX + 1.0), indexing="ij")
    assert float(inv[torch.sqrt(kx**2 + ky**2 + kz**2) >= BOX].abs().max()) == 0.0
    with pytest.raises(ValueError):
        inverse_weight(acc.weight_grid(), BOX, method="nonsense")  # type: ignore[arg-type]


def test_max_radius_limits_the_inserted_frequencies(clean_data: dict) -> None:
    data = clean_data["data"]
    acc = FourierAccumulator(BOX, max_radius_px=8)
    batch = next(data.iter_batches(None, 64))
    acc.insert(*prepare_spectra(batch.images, batch.shifts, ctf_2d(batch.ctf, BOX)), batch.rotations)
    vol = acc.reconstruct(mask_corners=False)
    power = _shell_power(vol)
    print("shell power / shell 4:", np.round((power / power[4]).numpy(), 5))
    assert float(power[12:].max()) < 1e-3 * float(power[4])
    assert _cc(vol, clean_data["truth"]) > 0.8


def test_prepare_spectra_premultiplied_and_no_ctf(clean_data: dict) -> None:
    batch = next(clean_data["data"].iter_batches(None, 4))
    ctf = ctf_2d(batch.ctf, BOX)
    plain, w_plain = prepare_spectra(batch.images, torch.zeros(4, 2), None)
    assert torch.allclose(plain, rfft2_centered(batch.images).to(plain.dtype)) and bool((w_plain == 1).all())
    pre, w_pre = prepare_spectra(batch.images, torch.zeros(4, 2), ctf, torch.tensor([True, False, True, False]))
    assert torch.allclose(pre[0], plain[0]) and torch.allclose(pre[1], plain[1] * ctf[1], atol=1e-7)
    assert torch.allclose(w_pre, ctf * ctf)


def test_wiener_term_regularises(clean_data: dict) -> None:
    acc = clean_data["acc"]
    good = torch.full((BOX // 2 + 1,), 0.999, dtype=torch.float64)
    bad = torch.full((BOX // 2 + 1,), 0.001, dtype=torch.float64)
    base = acc.reconstruct()
    nearly = acc.reconstruct(wiener=wiener_term_from_fsc(acc.weight_grid(), good, BOX))
    damped = acc.reconstruct(wiener=wiener_term_from_fsc(acc.weight_grid(), bad, BOX))
    assert _cc(nearly, base) > 0.999
    assert float(damped.std()) < 0.1 * float(base.std())


def test_insert_rejects_wrong_box() -> None:
    acc = FourierAccumulator(32)
    with pytest.raises(ValueError):
        acc.insert(torch.zeros(1, 16, 9, dtype=torch.complex64), torch.ones(1, 16, 9), torch.eye(3)[None])
    with pytest.raises(ValueError):
        FourierAccumulator(33)
