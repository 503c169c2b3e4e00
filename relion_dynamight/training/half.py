"""One half set's VAE: its own consensus Gaussian model, encoder, decoder, optimisers, noise model and RNG.

Nothing in a :class:`HalfModel` refers to the other half: it is built from the common initial Gaussian
model (fitted to the consensus map before any training), the configuration and its own particle
indices, and it only ever reads its own particles' images.  That is the gold-standard separation.

Per batch (phase ``"all"``)::

    μ, log σ² = encoder(normalised, centred image)          z = μ + σ ε   (ε from the half's generator)
    deformed  = positions + decoder(positions, z)
    predicted = project_gaussians(deformed, amplitude, width, pose, −origin, CTF)
    loss      = data(predicted, observed; 1/noise) + β KL + λ (edge-length + repulsion)

In phase ``"gaussians"`` (warm-up and frozen-network epochs) only the Gaussian parameters are fitted and
the decoder is not evaluated.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from relion_dynamight.imaging.ctf import ctf_2d
from relion_dynamight.imaging.fourier import irfft2_centered, rfft2_centered, shift_phase_2d
from relion_dynamight.imaging.gaussians import project_gaussians
from relion_dynamight.model.consensus import GaussianModel, GaussianParams
from relion_dynamight.training.reference_frame import closest_to_initial
from relion_dynamight.model.decoder import decoder_from_config
from relion_dynamight.model.rigid import RigidBodyDecoder
from relion_dynamight.model.encoder import Encoder
from relion_dynamight.model.losses import data_loss, gradient_ratio_lambda, kl_loss
from relion_dynamight.model.noise import NoiseSpectrum
from relion_dynamight.model.regularizers import (edge_length_loss, mean_neighbour_distance, neighbour_graph,
                                                 repulsion_loss)
from relion_dynamight.training import rng
from relion_dynamight.training.schedule import ALL, Plateau, Schedule

log = logging.getLogger("relion_dynamight")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class EpochStats:
    """What one epoch of one half reports (and the loss history stores)."""

    epoch: int
    half: int
    phase: str
    data: float
    kl: float
    geo: float
    lam: float
    val_mse: float
    seconds: float
    particles: int
    consensus_rmsd: float = 0.0

    def line(self, n_epochs: int) -> str:
        rate = self.particles / max(self.seconds, 1e-9)
        return (f"epoch {self.epoch + 1}/{n_epochs} half {self.half} [{self.phase}]: data {self.data:.5f} "
                f"val-mse {self.val_mse:.4e} KL {self.kl:.3f} geo {self.geo:.4f} lambda {self.lam:.4g} | "
                f"{self.seconds:.1f} s/epoch, {rate:.0f} particles/s"
                + (f" | consensus moved {self.consensus_rmsd:.2f} px" if self.consensus_rmsd else ""))


def gaussian_tree(p: GaussianParams) -> dict[str, Any]:
    return {"positions": p.positions, "log_amplitude": p.log_amplitude, "log_width": p.log_width,
            "relative_amplitudes": p.relative_amplitudes}


def gaussian_from_tree(tree: dict[str, Any], device: torch.device) -> GaussianModel:
    rel = tree.get("relative_amplitudes")
    params = GaussianParams(tree["positions"].to(device), tree["log_amplitude"].to(device),
                            tree["log_width"].to(device), None if rel is None else rel.to(device))
    return GaussianModel.from_params(params)


def encoder_filter(ctf: Tensor | None, premultiplied: Tensor | None, box: int, pixel: float,
                   lowpass: float | None) -> Tensor:
    """Fourier filter ``(B or 1, N, N//2+1)`` for the encoder's images: ``sign(CTF)`` (1 where the data are
    CTF-premultiplied or no ``ctf`` is given) times a raised-cosine low-pass that falls from 1 at
    0.8 / ``lowpass`` to 0 at 1 / ``lowpass`` (Å⁻¹; None = no low-pass)."""
    from relion_dynamight.imaging.fourier import freq_grid_2d

    out = torch.ones((1, box, box // 2 + 1))
    if ctf is not None:
        sign = torch.where(ctf < 0, -1.0, 1.0)
        if premultiplied is not None:
            sign = torch.where(premultiplied[:, None, None], torch.ones_like(sign), sign)
        out = sign
    if lowpass:
        ky, kx = freq_grid_2d(box, device=out.device)
        s = torch.sqrt(kx**2 + ky**2) / pixel                 # 1/Å
        edge = 1.0 / lowpass
        t = ((s - 0.8 * edge) / (0.2 * edge)).clamp(0.0, 1.0)
        out = out * (0.5 + 0.5 * torch.cos(torch.pi * t))
    return out


def free_bits_kl(mu: Tensor, logvar: Tensor, free_bits: float) -> Tensor:
    """KL penalty with "free bits" (Kingma et al. 2016): per latent dimension, the batch-mean KL counts only
    above ``free_bits`` nats, so a posterior that carries little information is not pushed to the prior
    (with Adam even a tiny KL gradient would collapse it while the decoder still ignores ``z``).  0 = plain
    batch-mean KL."""
    per_dim = (-0.5 * (1.0 + logvar - mu**2 - torch.exp(logvar))).mean(0)
    return per_dim.clamp_min(free_bits).sum() if free_bits > 0 else per_dim.sum()


class HalfModel:
    """Training state and epoch loop of one half set (see the module docstring)."""

    def __init__(self, half: int, config: dict[str, Any], initial: dict[str, Any], train_idx: np.ndarray,
                 val_idx: np.ndarray, device: torch.device, mask_weights: Tensor | None = None,
                 fixed_edges: Tensor | None = None) -> None:
        self.half = half
        self.config = config
        self.device = device
        self.box = int(config["box"])
        self.train_idx = np.asarray(train_idx, dtype=np.int64)
        self.val_idx = np.asarray(val_idx, dtype=np.int64)
        self.initial_positions = initial["positions"].to(device)
        self.gaussians = gaussian_from_tree(initial, device)
        seed = int(config["seed"])
        with rng.seeded_global(seed, half, rng.INIT):
            self.encoder = Encoder(self.box, int(config["latent_dim"]), hidden=tuple(config["encoder_hidden"]),
                                   downsample=int(config["encoder_downsample"])).to(device)
            self.decoder = decoder_from_config(config, mask_weights).to(device)
            if isinstance(self.decoder, RigidBodyDecoder):
                self.decoder.set_bodies(initial["body_masks"], initial["body_centres"])
            with torch.no_grad():  # start with small posterior noise so z carries the encoder's signal early
                self.encoder.head.bias[int(config["latent_dim"]):] = float(config.get("encoder_logvar_init", -4.0))
        self.opt_gaussians = torch.optim.Adam(self.gaussians.parameters(), lr=float(config["lr_gaussians"]))
        self.opt_networks = torch.optim.Adam(list(self.encoder.parameters()) + list(self.decoder.parameters()),
                                             lr=float(config["lr_networks"]))
        self.noise = NoiseSpectrum(self.box).to(device)
        self.generator = rng.generator(seed, half, rng.TRAIN)
        self.lam = 0.0
        self.image_mean, self.image_std = 0.0, 1.0
        self.plateau = Plateau(int(config["schedule"]["patience"]))
        self.stopped = False
        self.history: list[dict[str, float]] = []
        self.val_latents = np.zeros((0, int(config["latent_dim"])), dtype=np.float32)  # from the last validation
        self.fixed_edges = fixed_edges
        self._graph: tuple[Tensor, Tensor, float] | None = None

    # -- state -----------------------------------------------------------------------------------
    def state_tree(self) -> dict[str, Any]:
        """Everything needed to continue training exactly (for checkpoints)."""
        hist_keys = sorted(self.history[0]) if self.history else []
        return {
            "gaussians": gaussian_tree(self.gaussians.params()),
            "encoder": dict(self.encoder.state_dict()),
            "decoder": dict(self.decoder.state_dict()),
            "opt_gaussians": self.opt_gaussians.state_dict(),
            "opt_networks": self.opt_networks.state_dict(),
            "noise": dict(self.noise.state_dict()),
            "generator": self.generator.get_state(),
            "lam": float(self.lam),
            "image_mean": float(self.image_mean),
            "image_std": float(self.image_std),
            "plateau": self.plateau.state(),
            "stopped": bool(self.stopped),
            "train_idx": self.train_idx,
            "val_idx": self.val_idx,
            "history": {k: np.asarray([h[k] for h in self.history], dtype=np.float64) for k in hist_keys},
        }

    def load_tree(self, tree: dict[str, Any]) -> None:
        """Restore :meth:`state_tree` output (exactly)."""
        with torch.no_grad():
            for name in ("positions", "log_amplitude", "log_width"):
                getattr(self.gaussians, name).copy_(tree["gaussians"][name].to(self.device))
        self.encoder.load_state_dict(tree["encoder"])
        self.decoder.load_state_dict(tree["decoder"], strict=False)
        self.opt_gaussians.load_state_dict(tree["opt_gaussians"])
        self.opt_networks.load_state_dict(tree["opt_networks"])
        self.noise.load_state_dict(tree["noise"])
        self.generator.set_state(tree["generator"].cpu())
        self.lam = float(tree["lam"])
        self.image_mean, self.image_std = float(tree["image_mean"]), float(tree["image_std"])
        self.plateau = Plateau.from_state(tree["plateau"])
        self.stopped = bool(tree["stopped"])
        self.train_idx = np.asarray(tree["train_idx"], dtype=np.int64)
        self.val_idx = np.asarray(tree["val_idx"], dtype=np.int64)
        hist = tree.get("history") or {}
        n = len(next(iter(hist.values()))) if hist else 0
        self.history = [{k: float(v[i]) for k, v in hist.items()} for i in range(n)]

    # -- pieces ----------------------------------------------------------------------------------
    def set_normalisation(self, data: Any, max_particles: int = 512) -> None:
        """Mean/std of the encoder's input images (:meth:`encoder_input` before normalisation) from (up to
        ``max_particles``) of this half's own training particles."""
        idx = self.train_idx[:max_particles]
        self.image_mean, self.image_std = 0.0, 1.0
        images = self.encoder_input(data.batch(idx).to(self.device))[1].double()
        self.image_mean = float(images.mean())
        self.image_std = float(images.std().clamp_min(1e-12))

    def _graph_now(self) -> tuple[Tensor, Tensor, float]:
        pos = self.gaussians.positions.detach()
        if self.fixed_edges is not None:
            edges = self.fixed_edges.to(pos.device)
            rest = (pos[edges[:, 0]] - pos[edges[:, 1]]).norm(dim=1)
            return edges, rest, float(rest.mean()) if rest.numel() else 1.0
        edges, rest = neighbour_graph(pos)
        return edges, rest, mean_neighbour_distance(pos)

    def encoder_input(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(observed spectra (B, N, N//2+1), normalised centred real images (B, N, N))``.

        The encoder's image is centred (shifted by +origin), phase-flipped with the particle's CTF (so that
        contrast does not depend on the defocus; not for CTF-premultiplied data, whose CTF² is positive)
        and low-pass filtered at ``encoder_lowpass`` Å (conformations are told apart at low resolution,
        where the signal is; above it the image is noise): :func:`encoder_filter`.
        """
        observed = rfft2_centered(batch.images.float())
        spectrum = observed * shift_phase_2d(self.box, batch.shifts.float())
        filt = self._encoder_filter(batch)
        if filt is not None:
            spectrum = spectrum * filt
        centred = irfft2_centered(spectrum, self.box)
        return observed, (centred - self.image_mean) / self.image_std

    def _encoder_filter(self, batch: Any) -> Tensor | None:
        flip = bool(self.config.get("encoder_ctf_flip", False))
        lowpass = self.config.get("encoder_lowpass")
        if not flip and not lowpass:
            return None
        ctf = ctf_2d(batch.ctf, self.box) if flip else None
        return encoder_filter(ctf, batch.ctf_premultiplied if flip else None, self.box,
                              float(self.config["pixel_size"]), float(lowpass) if lowpass else None)

    def predict(self, batch: Any, positions: Tensor) -> Tensor:
        """Spectra of the (deformed) model ``positions`` ``(M, 3)`` or ``(B, M, 3)`` in the batch's poses."""
        ctf = ctf_2d(batch.ctf, self.box)
        ctf = torch.where(batch.ctf_premultiplied[:, None, None], ctf * ctf, ctf)
        g = self.gaussians
        return project_gaussians(positions, g.amplitudes, g.widths, batch.rotations, self.box,
                                 shifts=batch.shifts.float(), ctf=ctf)

    def geometric_loss(self, deformed: Tensor) -> Tensor:
        assert self._graph is not None, "train_epoch builds the neighbour graph first"
        edges, rest, c_mean = self._graph
        loss = edge_length_loss(deformed, edges, rest)
        if self.fixed_edges is None:
            loss = loss + repulsion_loss(deformed, edges, float(self.config["repulsion_fraction"]) * c_mean)
        return loss

    # -- training --------------------------------------------------------------------------------
    def _batches(self) -> list[np.ndarray]:
        order = torch.randperm(len(self.train_idx), generator=self.generator).numpy()
        bs = int(self.config["batch_size"])
        shuffled = self.train_idx[order]
        return [shuffled[i:i + bs] for i in range(0, len(shuffled), bs)]

    def train_epoch(self, epoch: int, schedule: Schedule, data: Any,
                    check_abort: Callable[[], None]) -> EpochStats:
        """One pass over this half's training particles; returns the epoch statistics."""
        import time

        start = time.monotonic()
        phase = schedule.phase(epoch)
        self._graph = self._graph_now()
        sums = {"data": 0.0, "kl": 0.0, "geo": 0.0}
        count = 0
        self.encoder.train(phase == ALL)
        self.decoder.train(phase == ALL)
        ramp = self.ramp(epoch, schedule)
        for k, idx in enumerate(self._batches()):
            check_abort()
            batch = data.batch(idx).to(self.device)
            terms = self._step(batch, phase, recalibrate=(k == 0 or self.lam == 0.0), ramp=ramp)
            for name, value in terms.items():
                sums[name] += value * len(idx)
            count += len(idx)
        val_mse = self.validate(data, check_abort)
        moved = 0.0
        if schedule.update_consensus(epoch):
            moved = self.update_consensus(data, check_abort)
        stats = EpochStats(epoch, self.half, phase, sums["data"] / count, sums["kl"] / count, sums["geo"] / count,
                           self.lam, val_mse, time.monotonic() - start, count, moved)
        self.history.append({"epoch": float(epoch), "data": stats.data, "kl": stats.kl, "geo": stats.geo,
                             "lam": stats.lam, "val_mse": val_mse, "seconds": stats.seconds,
                             "network_phase": float(phase == ALL)})
        if phase == ALL and math.isfinite(val_mse):
            self.stopped = self.plateau.update(val_mse)
        return stats

    def ramp(self, epoch: int, schedule: Schedule) -> float:
        """Weight of the KL and geometric terms in the ``k``-th (0-based) network epoch: 0 for the first
        ``n = ramp_epochs`` network epochs (a plain autoencoder), then ``(k - n) / n`` up to 1, so the latent
        code becomes informative before the prior and the regulariser act (KL annealing: with Adam, even
        a tiny KL gradient collapses the posterior while the decoder still ignores ``z``)."""
        n = int(self.config.get("ramp_epochs", 0))
        if n <= 0:
            return 1.0
        return min(1.0, max(0.0, (epoch - schedule.warmup_epochs - n) / n))

    def _step(self, batch: Any, phase: str, recalibrate: bool, ramp: float = 1.0) -> dict[str, float]:
        weights = self.noise.weights_2d().to(self.device)
        observed, images = self.encoder_input(batch)
        positions = self.gaussians.positions
        terms: dict[str, float] = {}
        if phase == ALL:
            mu, logvar = self.encoder(images)
            z = mu + torch.exp(0.5 * logvar) * rng.randn(tuple(mu.shape), self.generator, mu)
            deformed = positions + self.decoder(positions, z)
            data = data_loss(self.predict(batch, deformed), observed, weights).mean()
            kl = kl_loss(mu, logvar).mean()
            kl_penalty = free_bits_kl(mu, logvar, float(self.config.get("kl_free_bits") or 0.0))
            geo = self.geometric_loss(deformed)
            if recalibrate:
                lam = gradient_ratio_lambda(data, geo, self.decoder.parameters(),
                                            float(self.config["regularization_factor"]), default=self.lam)
                cap = self.config.get("lambda_max")
                self.lam = min(lam, float(cap)) if cap else lam
            loss = data + ramp * (float(self.config["beta"]) * kl_penalty + self.lam * geo)
            terms = {"data": float(data.detach()), "kl": float(kl.detach()), "geo": float(geo.detach())}
            optimisers: tuple[torch.optim.Optimizer, ...] = (self.opt_gaussians, self.opt_networks)
        else:
            data = data_loss(self.predict(batch, positions), observed, weights).mean()
            loss = data
            terms = {"data": float(data.detach())}
            optimisers = (self.opt_gaussians,)
        if not torch.isfinite(loss):
            raise TrainingDiverged(self._what_diverged(terms, loss))
        for opt in optimisers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        bad = self._non_finite_gradient()
        if bad:
            raise TrainingDiverged(f"half {self.half}: the gradient of {bad} became NaN/Inf (loss {float(loss):.4g})")
        for opt in optimisers:
            opt.step()
        return terms

    def _what_diverged(self, terms: dict[str, float], loss: Tensor) -> str:
        """Which loss term (data, KL, geometric) or parameter became non-finite."""
        bad_terms = [f"{name} term = {value}" for name, value in terms.items() if not math.isfinite(value)]
        bad_params = [name for name, value in self._named_parameters() if not torch.isfinite(value).all()]
        parts = bad_terms + ([f"parameters {', '.join(bad_params[:3])} are NaN/Inf"] if bad_params else [])
        return f"half {self.half}: the loss became {float(loss)} ({'; '.join(parts) or 'the sum overflowed'})"

    def _named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return ([(f"gaussians.{n}", p) for n, p in self.gaussians.named_parameters()]
                + [(f"encoder.{n}", p) for n, p in self.encoder.named_parameters()]
                + [(f"decoder.{n}", p) for n, p in self.decoder.named_parameters()])

    def _non_finite_gradient(self) -> str | None:
        grads = [value.grad for _, value in self._named_parameters() if value.grad is not None]
        if not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):   # one device sync
            return None
        for name, value in self._named_parameters():
            if value.grad is not None and not torch.isfinite(value.grad).all():
                return name
        return None

    @torch.no_grad()
    def latents(self, data: Any, indices: np.ndarray, check_abort: Callable[[], None]) -> Tensor:
        """Latent means ``(n, L)`` of particles ``indices`` (this half's encoder)."""
        self.encoder.eval()
        out = []
        bs = int(self.config["batch_size"])
        for i in range(0, len(indices), bs):
            check_abort()
            batch = data.batch(indices[i:i + bs]).to(self.device)
            out.append(self.encoder(self.encoder_input(batch)[1])[0].cpu())
        return torch.cat(out) if out else torch.zeros(0, int(self.config["latent_dim"]))

    @torch.no_grad()
    def validate(self, data: Any, check_abort: Callable[[], None]) -> float:
        """Mean squared residual of the validation particles (at their latent means), and a new noise
        spectrum from those residuals (the training particles' when there is no validation set)."""
        indices = self.val_idx if len(self.val_idx) else self.train_idx[: max(1, int(self.config["batch_size"]))]
        self.encoder.eval()
        self.noise.reset()
        total, count = 0.0, 0
        bs = int(self.config["batch_size"])
        means = []
        for i in range(0, len(indices), bs):
            check_abort()
            batch = data.batch(indices[i:i + bs]).to(self.device)
            observed, images = self.encoder_input(batch)
            mu, _ = self.encoder(images)
            means.append(mu.cpu())
            pos = self.gaussians.positions
            residual = observed - self.predict(batch, pos + self.decoder(pos, mu))
            self.noise.update(residual)
            total += float((residual.abs() ** 2).mean(dim=(-2, -1)).sum())
            count += len(batch)
        self.val_latents = (torch.cat(means).numpy() if means
                            else np.zeros((0, int(self.config["latent_dim"])), dtype=np.float32))
        return total / max(count, 1)

    @torch.no_grad()
    def update_consensus(self, data: Any, check_abort: Callable[[], None]) -> float:
        """Move the consensus positions to the mean deformed model of the particles whose deformed model
        lies closest to the common initial model (keeps both halves in the initial conformation without
        any exchange between them).  Returns the RMS displacement of the consensus in pixels."""
        n_use = min(len(self.train_idx), int(self.config["consensus_particles"]) * 10)
        sample = self.train_idx[:n_use]
        z = self.latents(data, sample, check_abort).to(self.device)
        pos = self.gaussians.positions.detach()
        bs = int(self.config["batch_size"])
        chosen, _ = closest_to_initial(self.decoder, pos, self.initial_positions, z,
                                       int(self.config["consensus_particles"]), batch_size=bs)
        k = len(chosen)
        new = torch.zeros_like(pos)
        for i in range(0, k, bs):
            new += (pos + self.decoder(pos, z[chosen[i:i + bs]])).sum(0)
        new /= max(k, 1)
        moved = float(((new - pos) ** 2).sum(-1).mean().sqrt())
        self.gaussians.positions.copy_(new)
        return moved
