"""Encoder, positional encoding and coordinate decoders (issue 3)."""

from __future__ import annotations

import math

import torch

from relion_dynamight.model.decoder import DeformationDecoder, InverseDecoder, positional_encoding
from relion_dynamight.model.encoder import Encoder, reparameterize


def test_encoder_shapes_and_mask_ignores_corners():
    torch.manual_seed(0)
    enc = Encoder(box=32, latent_dim=5)
    images = torch.randn(3, 32, 32)
    mu, logvar = enc(images)
    assert mu.shape == (3, 5) and logvar.shape == (3, 5)
    corners = images.clone()
    corners[:, :3, :3] += 100.0  # outside the inscribed circle after 2x pooling
    mu2, _ = enc(corners)
    assert torch.allclose(mu, mu2)
    centre = images.clone()
    centre[:, 14:18, 14:18] += 1.0
    assert not torch.allclose(mu, enc(centre)[0])


def test_reparameterize_uses_generator_and_variance():
    mu = torch.full((20000, 2), 3.0)
    logvar = torch.log(torch.full((20000, 2), 4.0))
    z1 = reparameterize(mu, logvar, torch.Generator().manual_seed(5))
    z2 = reparameterize(mu, logvar, torch.Generator().manual_seed(5))
    assert torch.equal(z1, z2)
    assert abs(float(z1.mean()) - 3.0) < 0.05 and abs(float(z1.std()) - 2.0) < 0.05


def test_positional_encoding_shape_and_range():
    pts = torch.rand(50, 3) - 0.5
    enc = positional_encoding(pts, n_freqs=10)
    assert enc.shape == (50, 60)
    assert float(enc.abs().max()) <= 1.0
    # sin² + cos² = 1 for each coordinate/frequency pair
    assert torch.allclose(enc[:, :30] ** 2 + enc[:, 30:] ** 2, torch.ones(50, 30), atol=1e-6)
    assert torch.allclose(enc[:, 0], torch.sin(math.pi * pts[:, 0]))


def test_decoders_start_as_identity_and_default_size():
    dec = DeformationDecoder(latent_dim=6, box=64)
    n_params = sum(p.numel() for p in dec.parameters())
    assert 8000 <= n_params <= 12000
    disp = dec(torch.randn(100, 3) * 10, torch.randn(4, 6))
    assert disp.shape == (4, 100, 3) and float(disp.detach().abs().max()) == 0.0
    inv = InverseDecoder(latent_dim=6, box=64)
    out = inv(torch.randn(4, 30, 3), torch.randn(4, 6))
    assert out.shape == (4, 30, 3) and float(out.detach().abs().max()) == 0.0


def _rotation_z(angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def test_decoder_fits_latent_dependent_rotation_of_half_the_points():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    pts = (torch.rand(200, 3, generator=gen) - 0.5) * 20
    moving = pts[:, 0] > 0
    targets = []
    for angle in (0.35, -0.35):  # ±20° hinge about the z axis through the centre
        d = pts @ _rotation_z(angle).T - pts
        d[~moving] = 0.0
        targets.append(d)
    target = torch.stack(targets)
    z = torch.zeros(2, 6)
    z[0, 0], z[1, 0] = 1.0, -1.0
    dec = DeformationDecoder(6, box=32)
    opt = torch.optim.Adam(dec.parameters(), lr=3e-3)
    for _ in range(300):
        opt.zero_grad()
        loss = ((dec(pts, z) - target) ** 2).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        err = (dec(pts, z) - target).norm(dim=-1)
    assert float(target.norm(dim=-1).max()) > 3.0
    assert float(err.pow(2).mean().sqrt()) < 0.2


def test_decoder_mask_restricts_deformation():
    torch.manual_seed(0)
    mask = torch.tensor([1.0, 0.0, 0.5])
    dec = DeformationDecoder(6, box=32, mask=mask)
    torch.nn.init.normal_(dec.net.out.weight)
    disp = dec(torch.randn(3, 3), torch.randn(2, 6)).detach()
    assert float(disp[:, 1].abs().max()) == 0.0
    assert float(disp[:, 0].abs().max()) > 0.0
    dec.set_mask(None)
    assert float(dec(torch.randn(3, 3), torch.randn(2, 6)).detach()[:, 1].abs().max()) > 0.0
