"""Noise spectrum, data term, KL and the gradient-ratio λ (issue 3)."""

from __future__ import annotations

import math

import torch

from relion_dynamight.imaging.fourier import rfft2_centered, shell_index_2d
from relion_dynamight.model.losses import data_loss, gradient_ratio_lambda, kl_loss
from relion_dynamight.model.noise import NoiseSpectrum, radial_noise_spectrum


def test_white_noise_spectrum_is_flat_and_weights_normalise_the_loss():
    n = 32
    gen = torch.Generator().manual_seed(0)
    noise = 2.0 * torch.randn(400, n, n, generator=gen, dtype=torch.float64)
    spec = rfft2_centered(noise)
    power = radial_noise_spectrum(spec)
    assert power.shape == (n // 2 + 1,)
    expected = 4.0 / n**2  # variance / N² with RELION's 1/N² normalisation
    assert torch.allclose(power[2:], torch.full_like(power[2:], expected), rtol=0.1)
    ns = NoiseSpectrum(n)
    assert torch.equal(ns.power, torch.ones(n // 2 + 1, dtype=torch.float64))
    ns.update(spec[:200])
    ns.update(spec[200:])
    assert torch.allclose(ns.power, power, rtol=1e-6)
    w = ns.weights_2d()
    assert w.shape == (n, n // 2 + 1)
    assert bool((w[shell_index_2d(n) > n // 2] == 0).all())
    loss = data_loss(torch.zeros_like(spec[:50]), spec[:50], w)
    assert loss.shape == (50,)
    assert abs(float(loss.mean()) - 1.0) < 0.1


def test_noise_spectrum_follows_coloured_noise_and_state_dict_round_trip():
    n = 32
    gen = torch.Generator().manual_seed(1)
    white = rfft2_centered(torch.randn(300, n, n, generator=gen))
    colour = 1.0 + 3.0 * (shell_index_2d(n) < 6).float()  # stronger at low frequency
    ns = NoiseSpectrum(n)
    ns.update(white * colour)
    ratio = ns.power[2] / ns.power[10]
    assert 12.0 < float(ratio) < 20.0  # power ratio 16
    copy = NoiseSpectrum(n)
    copy.load_state_dict(ns.state_dict())
    assert torch.equal(copy.weights_2d(), ns.weights_2d())


def test_kl_zero_at_prior_and_positive_elsewhere():
    mu, logvar = torch.zeros(4, 6), torch.zeros(4, 6)
    assert torch.equal(kl_loss(mu, logvar), torch.zeros(4))
    kl = kl_loss(torch.ones(2, 6), torch.zeros(2, 6))
    assert torch.allclose(kl, torch.full((2,), 3.0))
    assert bool((kl_loss(torch.zeros(1, 6), torch.full((1, 6), -1.0)) > 0).all())


def test_gradient_ratio_lambda_sets_the_ratio():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    loss_data = (3.0 * w).sum()  # gradient (3, 3)
    loss_geo = (w**2).sum()  # gradient (2, 4)
    lam = gradient_ratio_lambda(loss_data, loss_geo, [w], factor=0.9)
    assert math.isclose(lam, 0.9 * math.sqrt(18.0) / math.sqrt(20.0), rel_tol=1e-6)
    (loss_data + lam * loss_geo).backward()  # the graph is still there
    flat = torch.nn.Parameter(torch.zeros(2))
    assert gradient_ratio_lambda((flat + 1).sum(), (flat**2).sum(), [flat], 1.0, default=7.0) == 7.0
