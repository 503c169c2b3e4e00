"""Coordinate decoders: (position, latent code) → displacement, in pixels.

Both networks take a point ``(x, y, z)`` in pixels from the box centre, scale it to ``[-0.5, 0.5]`` by
dividing by the box size, lift it with sine/cosine positional encoding, append the latent code and pass
it through a fully connected ELU network whose last layer starts at zero, so both start as the identity
map (displacement 0).  The first layer is split into a position part and a latent part so the encoding
of the ``M`` points is computed once per batch rather than once per particle.

* :class:`DeformationDecoder` (forward model): consensus positions ``(M, 3)`` shared by the batch →
  displacements ``(B, M, 3)``; the deformed model is ``positions + displacements``.
* :class:`InverseDecoder`: points in each particle's deformed frame ``(B, K, 3)`` → displacement that
  brings them back to the consensus frame (``consensus = points + displacement``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from relion_dynamight.model.rigid import RigidBodyDecoder


def positional_encoding(points: Tensor, n_freqs: int = 10) -> Tensor:
    """NeRF encoding of points ``(..., 3)`` in ``[-0.5, 0.5]`` → ``(..., 3 * 2 * n_freqs)``.

    Frequencies ``π · 2^k`` for ``k = 0 .. n_freqs - 1``; the output holds all sines (coordinate-major,
    frequency-minor) followed by all cosines, so every value lies in ``[-1, 1]``.
    """
    freqs = math.pi * 2.0 ** torch.arange(n_freqs, device=points.device, dtype=points.dtype)
    angles = (points.unsqueeze(-1) * freqs).flatten(-2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class _CoordinateMLP(nn.Module):
    """ELU network on ``[encoding(point), z]`` with a split first layer and a zero-initialised output."""

    def __init__(self, latent_dim: int, box: int, n_freqs: int, hidden: int, n_layers: int) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError("n_layers must be at least 1")
        self.box = int(box)
        self.latent_dim = int(latent_dim)
        self.n_freqs = int(n_freqs)
        first = nn.Linear(3 * 2 * self.n_freqs + self.latent_dim, hidden)
        self.first_points = nn.Linear(3 * 2 * self.n_freqs, hidden)
        self.first_latent = nn.Linear(self.latent_dim, hidden, bias=False)
        with torch.no_grad():  # same initial distribution as one layer on the concatenated input
            self.first_points.weight.copy_(first.weight[:, : 3 * 2 * self.n_freqs])
            self.first_points.bias.copy_(first.bias)
            self.first_latent.weight.copy_(first.weight[:, 3 * 2 * self.n_freqs :])
        self.hidden = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(n_layers - 1))
        self.out = nn.Linear(hidden, 3)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def encode_points(self, points: Tensor) -> Tensor:
        """First-layer contribution of points ``(..., 3)`` in pixels → ``(..., hidden)``."""
        return self.first_points(positional_encoding(points / self.box, self.n_freqs))

    def run(self, point_features: Tensor, z: Tensor) -> Tensor:
        """``point_features (B or 1, K, hidden)`` + latent ``z (B, L)`` → displacement ``(B, K, 3)``."""
        h = F.elu(point_features + self.first_latent(z).unsqueeze(1))
        for layer in self.hidden:
            h = F.elu(layer(h))
        return self.out(h)


class DeformationDecoder(nn.Module):
    """Forward deformation: ``forward(positions (M, 3) px, z (B, L)) -> displacements (B, M, 3) px``.

    Args:
        latent_dim: latent dimension ``L``.
        box: box size in pixels (positions are divided by it before the encoding).
        n_freqs: positional-encoding frequencies per coordinate.
        hidden, n_layers: width and number of hidden (linear + ELU) layers; the defaults give about
            10 k parameters like the original.
        mask: optional per-Gaussian weights ``(M,)`` in ``[0, 1]`` multiplying the displacements
            (deformation only inside the user's mask, see ``regularizers.mask_to_gaussian_weights``).
    """


    mask: Tensor | None
    def __init__(
        self,
        latent_dim: int,
        box: int,
        n_freqs: int = 10,
        hidden: int = 32,
        n_layers: int = 8,
        mask: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.net = _CoordinateMLP(latent_dim, box, n_freqs, hidden, n_layers)
        self.register_buffer("mask", None if mask is None else mask.detach().clone().float())

    @property
    def latent_dim(self) -> int:
        return self.net.latent_dim

    def set_mask(self, mask: Tensor | None) -> None:
        """Replace the per-Gaussian mask ``(M,)`` (``None`` = deform everywhere)."""
        device = self.net.out.weight.device
        self.mask = None if mask is None else mask.detach().to(device=device, dtype=torch.float32).clone()

    def displace(self, points: Tensor, z: Tensor, source: Tensor) -> Tensor:
        """Displacements ``(B, K, 3)`` at per-particle points ``(B, K, 3)`` (e.g. jittered around the Gaussians);
        the per-Gaussian mask applies through each point's ``source`` Gaussian ``(K,)``."""
        disp = self.net.run(self.net.encode_points(points), z)
        if self.mask is not None:
            disp = disp * self.mask.to(disp.dtype)[source][None, :, None]
        return disp

    def forward(self, positions: Tensor, z: Tensor) -> Tensor:
        disp = self.net.run(self.net.encode_points(positions).unsqueeze(0), z)
        if self.mask is not None:
            if self.mask.shape[0] != positions.shape[0]:
                raise ValueError(f"decoder mask has {self.mask.shape[0]} entries for {positions.shape[0]} Gaussians")
            disp = disp * self.mask.to(disp.dtype)[None, :, None]
        return disp


class InverseDecoder(nn.Module):
    """Inverse deformation: ``forward(points (B, K, 3) px deformed frame, z (B, L)) -> (B, K, 3) px``.

    ``points + output`` is the position in the consensus frame.  Defaults follow the original's inverse
    network (6 hidden layers of 96 units).
    """

    def __init__(self, latent_dim: int, box: int, n_freqs: int = 10, hidden: int = 96, n_layers: int = 6) -> None:
        super().__init__()
        self.net = _CoordinateMLP(latent_dim, box, n_freqs, hidden, n_layers)

    @property
    def latent_dim(self) -> int:
        return self.net.latent_dim

    def forward(self, points: Tensor, z: Tensor) -> Tensor:
        if points.dim() == 2:  # shared points: encode once, broadcast over the batch
            points = points.unsqueeze(0)
        out = self.net.run(self.net.encode_points(points), z)
        return out.expand(z.shape[0], -1, -1) if out.shape[0] != z.shape[0] else out


def decoder_from_config(config: Mapping[str, Any], mask: Tensor | None = None) -> DeformationDecoder | RigidBodyDecoder:
    """The decoder that a training configuration (:func:`relion_dynamight.training.config.default_config`) describes:
    ``latent_dim``, ``box``, ``decoder_freqs``, ``decoder_hidden``, ``decoder_layers``; untrained weights.  With
    ``rigid_bodies`` (the body mask files) a :class:`~relion_dynamight.model.rigid.RigidBodyDecoder` whose masks
    are filled by ``set_bodies`` or by loading a checkpoint's state."""
    if config.get("rigid_bodies"):
        return RigidBodyDecoder(int(config["latent_dim"]), int(config["box"]), len(config["rigid_bodies"]))
    return DeformationDecoder(int(config["latent_dim"]), int(config["box"]), n_freqs=int(config["decoder_freqs"]),
                              hidden=int(config["decoder_hidden"]), n_layers=int(config["decoder_layers"]), mask=mask)

