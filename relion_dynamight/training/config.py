"""Training configuration: defaults, automatic batch size, and what a resumed run may change.

The configuration is a plain JSON-able dict stored in every checkpoint, so a resumed run uses exactly
the settings of the run it continues.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from relion_dynamight.training.schedule import Schedule

log = logging.getLogger("relion_dynamight")

#: Keys a new command line may change when continuing a checkpoint (others come from the checkpoint).
RESUMABLE_CHANGES = ("n_epochs", "live_every")


def default_config(**overrides: Any) -> dict[str, Any]:
    """Training settings (paper/original defaults, adapted where noted)."""
    config: dict[str, Any] = {
        "box": None,
        "pixel_size": None,
        "n_gaussians": 10000,
        "latent_dim": 6,
        "regularization_factor": 1.0,
        # β of the KL term, relative to the data term (a mean over Fourier coefficients, ~1 for pure noise);
        # None: 0.01 / box² as the original.  (1 / box² let the KL collapse the posterior on the hinge
        # simulation: posterior σ 0.8 of the prior's, |Spearman| 0.84, moving domain 0.59 of 1.23 px.)
        "beta": None,
        "batch_size": None,
        "seed": 0,
        "validation_fraction": 0.1,
        "lr_gaussians": 1e-3,
        # Adam learning rate of the encoder and decoder: 3e-3, three times the original's.  At low SNR learning is
        # limited by the number of optimisation steps: with 1e-3 a half set sat at the identity deformation until
        # the KL and geometric terms ramped in and collapsed it.  Latent |ρ| per half: AdK SNR 0.05, 6,000
        # particles, 16 epochs (Bayes oracle 0.905): 1e-3 0.23 / 0.49, 3e-3 0.79 / 0.75, 1e-2 diverged; AdK SNR
        # 0.02, 20,000 particles, 25 epochs (oracle 0.79 / 0.80): 1e-3 0.66 / 0.13, 3e-3 0.66 / 0.67.  The price,
        # SNR-1 hinge (500 particles per half, 20 epochs, seeds 0-2): mean 0.78 instead of 0.84
        "lr_networks": 3e-3,
        "encoder_hidden": [256, 128],
        "encoder_downsample": 2,
        # the encoder sees CTF-phase-flipped images low-passed at this resolution (Å; None = off): conformations
        # are told apart at low resolution, and above it a particle image at realistic SNR is noise.  Measured
        # (README, "Learning at realistic SNR"): AdK at SNR 0.05, latent |ρ| per half 0.09 / 0.11 (raw images)
        # → 0.28 / 0.58 (10 Å) and 0.46 / 0.63 (15 Å); the SNR-1 hinge at 3 Å/px 0.87 / 0.87 → 0.82 / 0.86 (10 Å)
        # but 0.73 (15 Å)
        "encoder_ctf_flip": True,
        "encoder_lowpass": 10.0,
        # upper bound of the recalibrated geometric weight λ: near the identity deformation the regulariser's
        # gradient vanishes while the (noise-dominated) data gradient does not, so the plain ratio grows
        # without bound (measured up to 2,459, pinning the decoder at zero displacement).  A cap of 1 helped at
        # SNR 0.05 (AdK |ρ| 0.28 / 0.58 vs 0.23 / 0.49 with 10 or 100) but let spurious motion through at SNR 1
        # (hinge: error / no-deformation 0.93 vs 0.70 with 10); healthy training there uses λ between 1 and 73
        "lambda_max": 10.0,
        # "free bits" of the KL term per latent dimension (nats; 0 = off): AdK at SNR 0.05, |ρ| 0.35 / 0.59 per
        # half with 1 nat vs 0.28 / 0.58 without, within the seed-to-seed spread, so off by default
        "kl_free_bits": 0.0,
        # initial log σ² of the posterior: small noise so z carries the encoder's signal from the start
        "encoder_logvar_init": -4.0,
        "decoder_freqs": 10,
        "decoder_hidden": 32,
        "decoder_layers": 8,
        "repulsion_fraction": 0.5,
        # KL and geometric terms: off for this many network epochs, then ramped in over as many (KL annealing)
        "ramp_epochs": 5,
        "consensus_particles": 100,
        # checkpoints kept: the 3 newest, every 10th epoch, the best validation epoch and the final one
        "keep_checkpoints": 3,
        "keep_every": 10,
        # every this many epochs the current consensus maps, figures and report.html are rewritten (0 = never)
        "live_every": 5,
        # rigid-body mode: the body mask files (model.rigid); None = the flexible decoder
        "rigid_bodies": None,
        "schedule": Schedule().as_dict(),
    }
    schedule = overrides.pop("schedule", None)
    config.update(overrides)
    if schedule:
        config["schedule"] = {**config["schedule"], **schedule}
    if config["beta"] is None and config["box"]:
        config["beta"] = 0.01 / float(config["box"]) ** 2
    return config


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def estimate_bytes_per_particle(box: int, n_gaussians: int, decoder_hidden: int, decoder_layers: int,
                                oversample: int = 2) -> int:
    """Rough peak memory per particle of one training step (forward + backward), bytes.

    Splat grid and its FFT (``(oversample·N)²`` complex, several autograd copies), image-sized spectra
    (observed, CTF, predicted, residual), and the decoder's activations (``M × hidden × layers``).
    """
    fine = (oversample * box) ** 2 * 8 * 6
    images = box * box * 4 * 24
    decoder = n_gaussians * decoder_hidden * decoder_layers * 4 * 4 + n_gaussians * 3 * 4 * 20
    return fine + images + decoder


def auto_batch_size(config: dict[str, Any], device: torch.device, smallest_half: int) -> int:
    """Largest batch that fits a fraction of the free memory (GPU: 40 %; CPU: 25 %, at most 4 GiB),
    clamped to [4, 256] (CPU: at most 64, more steps per epoch learn faster there) and to the smallest
    half's training set."""
    per = estimate_bytes_per_particle(int(config["box"]), int(config["n_gaussians"]),
                                      int(config["decoder_hidden"]), int(config["decoder_layers"]))
    avail = _available_bytes(device)
    budget = 0.4 * avail if device.type == "cuda" else min(0.25 * avail, 4 << 30)
    cap = 256 if device.type == "cuda" else 64
    size = int(max(4, min(cap, budget // per)))
    return max(1, min(size, smallest_half))


def merge_resumed(stored: dict[str, Any], requested: dict[str, Any]) -> dict[str, Any]:
    """Configuration for continuing a checkpoint: the stored one, with ``n_epochs`` from the new command.

    Other differences are logged and ignored (they would change the models being continued).
    """
    merged = {**stored, "schedule": dict(stored["schedule"])}
    new_epochs = int(requested["schedule"]["n_epochs"])
    if new_epochs != int(stored["schedule"]["n_epochs"]):
        log.info("Continuing with --n-epochs %d (the checkpoint was made for %d)", new_epochs,
                 stored["schedule"]["n_epochs"])
        merged["schedule"]["n_epochs"] = new_epochs
    if requested.get("live_every") is not None:
        merged["live_every"] = int(requested["live_every"])   # how often files are rewritten: not the model
    for key in ("n_gaussians", "latent_dim", "regularization_factor", "seed", "validation_fraction", "rigid_bodies"):
        if requested.get(key) is not None and requested[key] != stored.get(key):
            log.warning("WARNING: --%s %s differs from the checkpoint's %s; continuing with the checkpoint's "
                        "value (use a new output directory to start afresh)", key.replace("_", "-"),
                        requested[key], stored.get(key))
    return merged
