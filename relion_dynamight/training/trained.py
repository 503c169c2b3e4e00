"""A trained forward model as the later tasks use it: the latent codes of a chosen checkpoint.

``latent_space.star`` holds the codes of the *final* encoders.  A user who picks an earlier checkpoint with
``--checkpoint-file`` (inverse, backprojection, exploration) must get that checkpoint's networks *and* the codes
of that checkpoint's encoders: :func:`checkpoint_latents` re-encodes every particle with its own half set's
encoder of that checkpoint and caches the result in the job directory
(``forward_deformations/latents/<checkpoint>-<key>.npy``, the key made from the checkpoint's name, size and
modification time), so the next task that picks the same checkpoint reads it back.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

log = logging.getLogger("relion_dynamight")

CACHE_DIR = "forward_deformations/latents"


def cache_path(job_dir: Path, checkpoint: Path) -> Path:
    stat = Path(checkpoint).stat()
    key = hashlib.sha1(f"{Path(checkpoint).resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return Path(job_dir) / CACHE_DIR / f"{Path(checkpoint).stem}-{key}.npy"


def half_models(state: dict[str, Any], device: torch.device) -> dict[int, Any]:
    """Both halves' trained :class:`~relion_dynamight.training.half.HalfModel` of a loaded checkpoint (decoders in
    eval mode)."""
    from relion_dynamight.training.half import HalfModel

    models = {}
    for h in (1, 2):
        tree = state["halves"][h]
        model = HalfModel(h, state["config"], state["initial"], np.asarray(tree["train_idx"]),
                          np.asarray(tree["val_idx"]), device, mask_weights=tree["decoder"].get("mask"))
        model.load_tree(tree)
        model.decoder.eval()
        models[h] = model
    return models


def encode_particles(state: dict[str, Any], data: Any, device: torch.device,
                     check_abort: Callable[[], None] = lambda: None) -> np.ndarray:
    """Latent means ``(n, L)`` of every particle of ``data`` with its own half set's encoder in ``state``."""
    halves = np.asarray(state["split_half"], dtype=np.int64)
    out = np.zeros((len(halves), int(state["config"]["latent_dim"])), dtype=np.float32)
    for h, model in half_models(state, device).items():
        rows = np.flatnonzero(halves == h)
        out[rows] = model.latents(data, rows, check_abort).numpy()
    return out


def checkpoint_latents(state: dict[str, Any], checkpoint: Path, job_dir: Path, device: torch.device | None = None,
                       check_abort: Callable[[], None] = lambda: None) -> torch.Tensor:
    """The latent codes of ``checkpoint``'s encoders, from the job's cache or re-encoded (and cached)."""
    from relion_dynamight.relion.jobdir import atomic_output
    from relion_dynamight.relion.particles import ParticleData

    path = cache_path(job_dir, checkpoint)
    if path.is_file():
        values = np.load(path)
        if values.shape == (len(state["split_half"]), int(state["config"]["latent_dim"])):
            log.info("Latent codes of %s read from %s", checkpoint, path)
            return torch.from_numpy(values)
    log.info("Encoding the particles with the encoders of %s (latent_space.star holds the final epoch's codes)",
             checkpoint)
    data = ParticleData(state["config"]["star_file"])
    values = encode_particles(state, data, device or torch.device("cpu"), check_abort)
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, values)
    log.info("Latent codes cached in %s", path)
    return torch.from_numpy(values)
