"""``optimize-inverse-deformations DIR``: train each half's inverse deformation network.

Reads the forward checkpoint (``--checkpoint-file`` or ``DIR/forward_deformations/checkpoints/checkpoint_final.h5``)
and ``DIR/forward_deformations/latent_space.star``; writes ``DIR/inverse_deformations/inverse_half{1,2}.h5``
(HDF5 trees, never pickle), rewritten atomically after every epoch so an interrupted run resumes.
With MPI, half 1 trains on rank 0 and half 2 on rank 1 (a single process trains both in turn).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from relion_dynamight.errors import InputError
from relion_dynamight.training.inverse import InverseConfig, InverseTrainer, decoder_forward_map
from relion_dynamight.training.trained import (ForwardInputs, forward_decoder, inverse_path, load_forward,
                                               load_inverse, same_forward, save_inverse)

log = logging.getLogger("relion_dynamight")

# -- the task ---------------------------------------------------------------------------------------
def run(job: Any, output_directory: Path, n_epochs: int = 200, checkpoint_file: Path | None = None,
        save_deformations: bool = False, preload_images: bool = False, batch_size: int | None = None,
        seed: int = 0, gpu_id: str = "") -> None:
    """Train (or continue) both halves' inverse networks; returns no output nodes."""
    from relion_dynamight.parallel.device import choose_device
    from relion_dynamight.parallel.mpi import world

    if n_epochs < 1:
        raise InputError(f"--n-epochs {n_epochs} must be at least 1")
    if batch_size is not None and batch_size < 1:
        raise InputError(f"--batch-size {batch_size} must be at least 1 (or leave it out for the default)")
    out = Path(output_directory)
    comm = world()
    device = choose_device(gpu_id, comm.local_rank)
    inputs = load_forward(out, checkpoint_file, "optimize-inverse-deformations")
    if preload_images:
        log.info("--preload-images has no effect here: the inverse is fitted to the decoder, not to images")
    cfg = InverseConfig(n_epochs=int(n_epochs), seed=int(seed), **({"batch_size": int(batch_size)} if batch_size is not None else {}))
    for half in (1, 2):
        if (half - 1) % comm.size == comm.rank:
            _train_half(job, out, inputs, half, cfg, device, save_deformations)
    comm.barrier()
    return None


def _train_half(job: Any, out: Path, inputs: ForwardInputs, half: int, cfg: InverseConfig, device: torch.device,
                save_deformations: bool) -> None:
    decoder, centres = forward_decoder(inputs, half, device)
    rows = np.flatnonzero(inputs.half == half)
    trainer = InverseTrainer(half, centres, inputs.latents[rows], decoder_forward_map(decoder), inputs.box, cfg, device)
    path = inverse_path(out, half)
    if path.is_file():
        try:
            info = load_inverse(path, device)
        except InputError as exc:
            log.warning("WARNING: %s; starting half %d from scratch", exc, half)
            info = None
        if info is not None and same_forward(info, inputs) and InverseConfig(**info["config"]).seed == cfg.seed:
            trainer.load_tree(info["state"])
            log.info("Half %d: continuing from %s (%d epochs done)", half, path, trainer.epoch)
        elif info is not None:
            log.info("Half %d: %s was trained from another forward checkpoint or seed; starting again", half, path)
    if trainer.epoch >= cfg.n_epochs or trainer.converged():
        log.info("Half %d: already trained (%d epochs of at most %d%s)", half, trainer.epoch, cfg.n_epochs,
                 "; converged" if trainer.converged() else "")
        save_inverse(path, trainer, inputs)  # records the requested n_epochs
        return
    if save_deformations:
        nbytes = trainer.cache_deformations()
        log.info("Half %d: deformed positions of %d particles x %d Gaussians cached in RAM: %.1f MiB",
                 half, len(rows), centres.shape[0], nbytes / 2**20)
    log.info("Half %d: training the inverse deformation on %d particles, %d Gaussians, epochs %d..%d",
             half, len(rows), centres.shape[0], trainer.epoch + 1, cfg.n_epochs)
    last_save = time.monotonic()
    start = time.monotonic()
    first = trainer.epoch
    while trainer.epoch < cfg.n_epochs:
        t0 = time.monotonic()
        rms = trainer.train_epoch(job.check_abort)
        held = f", held-out {trainer.val_history[-1]:.3f} px" if trainer.val_history else ""
        eta = (time.monotonic() - start) / (trainer.epoch - first) * (cfg.n_epochs - trainer.epoch)
        log.info("Half %d inverse epoch %d/%d: fit RMS %.3f px%s, %.1f s (at most %.0f s to go)", half,
                 trainer.epoch, cfg.n_epochs, rms, held, time.monotonic() - t0, eta)
        reason = trainer.converged()
        if reason:
            log.info("Half %d: inverse training stops at epoch %d of at most %d: %s", half, trainer.epoch,
                     cfg.n_epochs, reason)
        if time.monotonic() - last_save > 20 or trainer.epoch == cfg.n_epochs or reason:
            save_inverse(path, trainer, inputs)
            last_save = time.monotonic()
        if reason:
            break
    err = trainer.evaluate(torch.arange(min(len(rows), 512)))
    log.info("Half %d: inverse error at the Gaussian centres %.3f px RMS; written %s", half, err, path)
