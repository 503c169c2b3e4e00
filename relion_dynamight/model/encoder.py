"""Encoder of the VAE: a real-space particle image → mean and log-variance of its latent code.

Like the original DynaMight: the image is average-pooled (``downsample`` × ``downsample``), the pixels
inside the inscribed circle are flattened and passed through fully connected layers with ReLU; a last
linear layer gives ``(μ, log σ²)``.  The encoder does not see the CTF.

Input convention: images ``(B, N, N)`` indexed ``[y, x]``, already translated by ``+origin`` so the
particle sits at the box centre (relion-facts §9), and normalised per data set (roughly zero mean, unit
variance); the caller (the trainer) does both.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def circular_mask(n: int, device: torch.device | None = None) -> Tensor:
    """Boolean ``(n, n)`` disc of radius ``n / 2`` centred on pixel ``n // 2`` (inclusive)."""
    c = torch.arange(n, device=device, dtype=torch.float32) - n // 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return (xx**2 + yy**2) <= (n / 2.0) ** 2


class Encoder(nn.Module):
    """Fully connected image encoder.

    Args:
        box: image size ``N`` in pixels.
        latent_dim: latent dimension ``L``.
        hidden: widths of the hidden layers (ReLU after each).
        downsample: average-pooling factor applied first (1 = none).

    ``forward(images (B, N, N)) -> (mu (B, L), logvar (B, L))``.
    """


    mask: Tensor
    def __init__(self, box: int, latent_dim: int = 6, hidden: tuple = (256, 128), downsample: int = 2) -> None:
        super().__init__()
        if downsample < 1 or box // downsample < 2:
            raise ValueError(f"downsample {downsample} is not valid for box {box}")
        self.box = int(box)
        self.latent_dim = int(latent_dim)
        self.downsample = int(downsample)
        small = self.box // self.downsample
        self.register_buffer("mask", circular_mask(small), persistent=False)
        n_in = int(self.mask.sum())
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(n_in, int(width)), nn.ReLU()]
            n_in = int(width)
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(n_in, 2 * self.latent_dim)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if images.shape[-2:] != (self.box, self.box):
            raise ValueError(f"encoder built for box {self.box}, got images {tuple(images.shape)}")
        x = images.unsqueeze(1)
        if self.downsample > 1:
            x = F.avg_pool2d(x, self.downsample)
        x = x[:, 0][:, self.mask]
        out = self.head(self.body(x))
        return out[:, : self.latent_dim], out[:, self.latent_dim :]


def reparameterize(mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Sample ``z = mu + exp(logvar / 2) * eps`` with ``eps ~ N(0, 1)`` drawn from ``generator``.

    The generator must live on the same device as ``mu`` (torch requires it).
    """
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps
