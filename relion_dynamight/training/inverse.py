"""Training of the inverse deformation (paper: Methods, "Improved reconstruction"), one half set at a time.

The inverse network ``h`` (:class:`~relion_dynamight.model.decoder.InverseDecoder`) maps a point ``y`` of a
particle's deformed frame and the particle's latent code ``z`` to the consensus frame:
``h(y, z) = y + u(y, z)``.  It is fitted by regression on pairs ``(Γ_z(x), x)`` produced by the trained
forward decoder ``Γ`` of the same half:

* ``x`` = the consensus Gaussian centres (``n_centres`` random ones per step), and
* ``x`` = jitter points ``c + ε`` (``ε ~ N(0, jitter_px²)``) around random centres, so that the inverse
  is also right *between* the centres (where the backprojected density lives), and
* a weak smoothness term ``|u(r + δ) − u(r)|²`` at random points ``r`` of the box (solvent), so the
  field stays tame where there is no signal.

``z`` runs over the latent codes of the half's particles (``latent_space.star``).  Everything is seeded
per half; state (network, Adam, generator, epoch) is saved as HDF5 trees for exact resumption.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from relion_dynamight.imaging.warp import grid_nodes, coarse_size, invert_displacement_field, upsample_field
from relion_dynamight.model.decoder import DeformationDecoder, InverseDecoder

log = logging.getLogger("relion_dynamight")

#: Seconds between progress lines inside one inverse epoch.
PROGRESS_SECONDS = 60.0

#: ``(points (B, K, 3), z (B, L), source (K,) index of the Gaussian each point belongs to) -> deformed (B, K, 3)``
ForwardMap = Callable[[Tensor, Tensor, Tensor], Tensor]


def decoder_forward_map(decoder: DeformationDecoder) -> ForwardMap:
    """The forward deformation of a trained decoder at arbitrary points (its per-Gaussian mask, if any,
    is applied through each point's source Gaussian)."""

    def fmap(points: Tensor, z: Tensor, source: Tensor) -> Tensor:
        return points + decoder.displace(points, z, source)

    return fmap


@dataclass
class InverseConfig:
    n_epochs: int = 200
    batch_size: int = 32          # particles (latent codes) per optimisation step
    lr: float = 2e-3
    lr_final_fraction: float = 0.1  # learning rate decays exponentially to lr * this over the epochs
    n_centres: int = 256          # Gaussian centres per step
    n_jitter: int = 64            # jitter points per step
    jitter_px: float = 1.5
    n_smooth: int = 32            # random box points per step for the smoothness term
    smooth_weight: float = 0.01
    hidden: int = 96
    n_layers: int = 6
    n_freqs: int = 10
    seed: int = 0
    # convergence: stop when the held-out fit RMS improved by less than ``min_improvement`` (relative) over the
    # last ``patience`` epochs (0 = run all ``n_epochs``); ``holdout`` particles of the half are kept out of
    # the fit to measure it
    patience: int = 5
    min_improvement: float = 0.05
    holdout: int = 256

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_inverse_net(latent_dim: int, box: int, config: InverseConfig, seed: int, half: int) -> InverseDecoder:
    """A freshly initialised inverse network, seeded by ``(seed, half)`` only."""
    state = torch.random.get_rng_state()
    torch.manual_seed(_half_seed(seed, half, 1))
    try:
        return InverseDecoder(latent_dim, box, n_freqs=config.n_freqs, hidden=config.hidden,
                              n_layers=config.n_layers)
    finally:
        torch.random.set_rng_state(state)


def _half_seed(seed: int, half: int, purpose: int) -> int:
    return (int(seed) * 1_000_003 + int(half) * 7919 + purpose) % (2**31 - 1)


class InverseTrainer:
    """Trains one half's inverse network; see the module docstring."""

    def __init__(self, half: int, centres: Tensor, latents: Tensor, forward_map: ForwardMap, box: int,
                 config: InverseConfig, device: torch.device) -> None:
        self.half, self.box, self.config, self.device = half, int(box), config, device
        self.centres = centres.to(device=device, dtype=torch.float32)
        self.latents = latents.to(device=device, dtype=torch.float32)
        self.forward_map = forward_map
        self.net = make_inverse_net(self.latents.shape[1], box, config, config.seed, half).to(device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=config.lr)
        self.generator = torch.Generator(device="cpu").manual_seed(_half_seed(config.seed, half, 2))
        self.epoch = 0
        self.history: list[float] = []
        self.val_history: list[float] = []
        self.cache: Tensor | None = None
        n = self.latents.shape[0]
        k = min(int(config.holdout), n // 5) if config.patience > 0 else 0
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(_half_seed(config.seed, half, 3)))
        self.holdout_rows, self.train_rows = perm[:k].sort().values, perm[k:].sort().values

    # -- deformed positions ---------------------------------------------------------------------
    def cache_deformations(self, batch_size: int = 256) -> int:
        """Compute and keep the deformed centres of every particle (CPU RAM); returns the bytes used."""
        p, m = self.latents.shape[0], self.centres.shape[0]
        cache = torch.empty((p, m, 3), dtype=torch.float32)
        src = torch.arange(m, device=self.device)
        with torch.no_grad():
            for start in range(0, p, batch_size):
                z = self.latents[start:start + batch_size]
                pts = self.centres.expand(z.shape[0], -1, -1)
                cache[start:start + z.shape[0]] = self.forward_map(pts, z, src).cpu()
        self.cache = cache
        return cache.numel() * cache.element_size()

    def _pairs(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """``(deformed (B, K, 3), consensus targets (K, 3))`` for particles ``rows`` (centres + jitter)."""
        cfg, m = self.config, self.centres.shape[0]
        k = min(cfg.n_centres, m)
        idx = torch.randperm(m, generator=self.generator)[:k].to(self.device)
        jit_src = torch.randint(0, m, (cfg.n_jitter,), generator=self.generator).to(self.device)
        noise = torch.randn((cfg.n_jitter, 3), generator=self.generator).to(self.device) * cfg.jitter_px
        jitter = self.centres[jit_src] + noise
        z = self.latents[rows]
        with torch.no_grad():
            if self.cache is not None:
                deformed_c = self.cache[rows.cpu()][:, idx.cpu()].to(self.device)
            else:
                deformed_c = self.forward_map(self.centres[idx].expand(len(rows), -1, -1), z, idx)
            deformed_j = self.forward_map(jitter.expand(len(rows), -1, -1), z, jit_src)
        return torch.cat([deformed_c, deformed_j], dim=1), torch.cat([self.centres[idx], jitter], dim=0)

    # -- training -------------------------------------------------------------------------------
    def learning_rate(self, epoch: int) -> float:
        frac = epoch / max(self.config.n_epochs - 1, 1)
        return self.config.lr * self.config.lr_final_fraction ** frac

    def train_epoch(self, check_abort: Callable[[], None] = lambda: None) -> float:
        """One pass over the half's latent codes; returns the RMS fit error (pixels) at the sampled points."""
        cfg = self.config
        for group in self.opt.param_groups:
            group["lr"] = self.learning_rate(self.epoch)
        order = self.train_rows[torch.randperm(self.train_rows.numel(), generator=self.generator)]
        total, count = 0.0, 0
        self.net.train()
        started = last = time.monotonic()
        for start in range(0, order.numel(), cfg.batch_size):
            if time.monotonic() - last >= PROGRESS_SECONDS:   # long epochs (many particles) still show progress
                last = time.monotonic()
                log.info("Half %d inverse epoch %d: %d/%d particles, %.0f s", self.half, self.epoch + 1, start,
                         order.numel(), last - started)
            rows = order[start:start + cfg.batch_size].to(self.device)
            deformed, target = self._pairs(rows)
            z = self.latents[rows]
            pred = deformed + self.net(deformed, z)
            fit = (pred - target).pow(2).sum(-1).mean()
            loss = fit + cfg.smooth_weight * self._smoothness(z)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total += float(fit.detach()) * rows.numel()
            count += rows.numel()
            check_abort()
        self.epoch += 1
        rms = math.sqrt(total / max(count, 1))
        self.history.append(rms)
        if self.holdout_rows.numel():
            self.val_history.append(self.evaluate(self.holdout_rows))
        return rms

    def converged(self) -> str | None:
        """Why training can stop now (held-out fit RMS no longer improving), or None."""
        cfg, hist = self.config, self.val_history
        if cfg.patience <= 0 or len(hist) <= cfg.patience:
            return None
        before, now = min(hist[: -cfg.patience]), min(hist[-cfg.patience:])
        gain = (before - now) / max(before, 1e-12)
        if gain < cfg.min_improvement:
            return (f"the held-out fit RMS ({now:.3f} px, {self.holdout_rows.numel()} particles) improved by "
                    f"{100 * gain:.1f} % over the last {cfg.patience} epochs (< {100 * cfg.min_improvement:.0f} %)")
        return None

    def _smoothness(self, z: Tensor) -> Tensor:
        cfg = self.config
        if cfg.smooth_weight <= 0 or cfg.n_smooth <= 0:
            return torch.zeros((), device=self.device)
        r = (torch.rand((cfg.n_smooth, 3), generator=self.generator) - 0.5) * self.box
        d = torch.randn((cfg.n_smooth, 3), generator=self.generator)
        r, d = r.to(self.device), d.to(self.device)
        pts = torch.cat([r, r + d], dim=0).expand(z.shape[0], -1, -1)
        u = self.net(pts, z)
        return (u[:, : cfg.n_smooth] - u[:, cfg.n_smooth:]).pow(2).sum(-1).mean()

    @torch.no_grad()
    def evaluate(self, rows: Tensor | None = None, batch_size: int = 64) -> float:
        """RMS error (pixels) of ``h(Γ(c)) − c`` over all centres for particles ``rows`` (default: all)."""
        rows = torch.arange(self.latents.shape[0]) if rows is None else rows
        src = torch.arange(self.centres.shape[0], device=self.device)
        total, count = 0.0, 0
        self.net.eval()
        for start in range(0, rows.numel(), batch_size):
            r = rows[start:start + batch_size].to(self.device)
            z = self.latents[r]
            y = self.forward_map(self.centres.expand(r.numel(), -1, -1), z, src)
            err = (y + self.net(y, z) - self.centres).pow(2).sum(-1)
            total += float(err.sum())
            count += err.numel()
        return math.sqrt(total / max(count, 1))

    # -- state ----------------------------------------------------------------------------------
    def state_tree(self) -> dict[str, Any]:
        return {"net": dict(self.net.state_dict()), "opt": self.opt.state_dict(),
                "generator": self.generator.get_state(), "epoch": int(self.epoch),
                "history": torch.tensor(self.history, dtype=torch.float64),
                "val_history": torch.tensor(self.val_history, dtype=torch.float64)}

    def load_tree(self, tree: dict[str, Any]) -> None:
        self.net.load_state_dict(tree["net"])
        self.opt.load_state_dict(tree["opt"])
        self.generator.set_state(tree["generator"].cpu())
        self.epoch = int(tree["epoch"])
        self.history = [float(v) for v in tree["history"].tolist()]
        val = tree.get("val_history")
        self.val_history = [float(v) for v in val.tolist()] if val is not None else []


# -- using a trained inverse network ----------------------------------------------------------------
@torch.no_grad()
def dense_forward_positions(net: InverseDecoder, z: Tensor, box: int, spacing: float = 2.0,
                            n_iter: int = 30) -> tuple[Tensor, float]:
    """Deformed-frame position ``Γ_z(x)`` of every consensus voxel ``x``: ``(box, box, box, 3)`` and the
    inversion residual (pixels).

    The inverse network is evaluated once on a coarse deformed-frame grid (about every ``spacing``
    pixels), inverted by fixed-point iteration (:func:`.warp.invert_displacement_field`) and up-sampled
    trilinearly to every voxel.
    """
    device = next(net.parameters()).device
    n = coarse_size(box, spacing)
    nodes = grid_nodes(box, n, device=device)
    u = net(nodes.reshape(1, -1, 3), z.reshape(1, -1).to(device=device, dtype=torch.float32)).reshape(n, n, n, 3)
    coarse, residual = invert_displacement_field(u, box, n_iter=n_iter)
    return upsample_field(coarse, box), residual


@torch.no_grad()
def probe_displacements(net: InverseDecoder, probes: Tensor, latents: Tensor, batch_size: int = 256) -> Tensor:
    """Inverse displacements ``(P, m, 3)`` at probe points ``(m, 3)`` for latent codes ``(P, L)``.

    Used as each particle's deformation signature for grouping (:mod:`.imaging.grouping`).
    """
    device = next(net.parameters()).device
    out = []
    for start in range(0, latents.shape[0], batch_size):
        z = latents[start:start + batch_size].to(device=device, dtype=torch.float32)
        out.append(net(probes.to(device=device, dtype=torch.float32), z).cpu())
    return torch.cat(out) if out else torch.zeros((0, probes.shape[0], 3))
