"""Files for users and later steps, written from the final checkpoint by rank 0.

``DIR/forward_deformations/``: ``latent_space.star`` (every input column, input order, plus
``rlnRandomSubset`` = half used, ``dmValidation`` and ``dmLatent1..L``), ``consensus_half{1,2}.mrc``
(the halves' consensus Gaussian models rendered as maps), ``loss_curves.png``, ``latent_space.png`` and
``report.html`` (the same files are rewritten every few epochs while training runs: :mod:`.live`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from relion_dynamight.training import checkpoint as ckpt
from relion_dynamight.training.halves import HalfSplit

log = logging.getLogger("relion_dynamight")


def forward_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "forward_deformations"


def latent_columns(latents: np.ndarray) -> dict[str, np.ndarray]:
    return {f"dmLatent{i + 1}": latents[:, i].astype(np.float64) for i in range(latents.shape[1])}


def write_outputs(output_dir: Path, table: Any, split: HalfSplit, latents: np.ndarray, final_checkpoint: Path,
                  config: dict[str, Any]) -> dict[str, Path]:
    """Write the user-facing outputs; returns their paths by name."""
    from relion_dynamight.analysis.figures import latent_scatter, loss_curves
    from relion_dynamight.relion.mrc import write_map
    from relion_dynamight.training.live import consensus_maps, write_report
    from relion_dynamight.relion.star import write_particles

    folder = forward_dir(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    extra = {"rlnRandomSubset": split.half.astype(np.int64), "dmValidation": split.validation.astype(np.int64),
             **latent_columns(latents)}
    paths["latent_space"] = write_particles(table, folder / "latent_space.star", extra_columns=extra)
    state = ckpt.load_checkpoint(final_checkpoint)
    for h, volume in consensus_maps(state["halves"], int(config["box"])).items():
        paths[f"consensus_half{h}"] = write_map(folder / f"consensus_half{h}.mrc", volume,
                                                float(config["pixel_size"]))
    histories = {h: state["halves"][h].get("history") or {} for h in (1, 2)}
    paths["loss_curves"] = loss_curves(histories, folder / "loss_curves.png")
    paths["latent_scatter"] = latent_scatter(latents, split.half, split.validation, folder / "latent_space.png")
    if config.get("rigid_bodies"):
        paths["rigid_transforms"] = write_rigid_transforms(folder / "rigid_transforms.star", table, state, split,
                                                           latents)
    paths["report"] = write_report(folder, None, final=True)
    for name, path in paths.items():
        log.info("Written %s: %s", name.replace("_", " "), path)
    return paths


def rigid_transform_columns(state: dict[str, Any], halves: np.ndarray, latents: np.ndarray) -> dict[str, np.ndarray]:
    """Per particle and body (rigid-body mode), from each particle's own half set's decoder: the columns of
    :func:`relion_dynamight.analysis.rigid_fit.body_columns` (axis-angle and angle in degrees, translation in Å)."""
    import torch

    from relion_dynamight.analysis.rigid_fit import body_columns
    from relion_dynamight.model.decoder import decoder_from_config
    from relion_dynamight.model.rigid import RigidBodyDecoder

    config = state["config"]
    n_bodies, pixel = len(config["rigid_bodies"]), float(config["pixel_size"])
    omega = np.zeros((len(halves), n_bodies, 3))
    shift = np.zeros((len(halves), n_bodies, 3))
    for h in (1, 2):
        rows = np.flatnonzero(halves == h)
        decoder = decoder_from_config(config)
        assert isinstance(decoder, RigidBodyDecoder)
        decoder.load_state_dict(state["halves"][h]["decoder"], strict=False)
        with torch.no_grad():
            w, t = decoder.transforms(torch.from_numpy(latents[rows]).float())
        omega[rows], shift[rows] = w.double().numpy(), t.double().numpy()
    return body_columns(np.degrees(omega), shift * pixel)


def write_rigid_transforms(path: Path, table: Any, state: dict[str, Any], split: HalfSplit,
                           latents: np.ndarray) -> Path:
    """``rigid_transforms.star``: every input column plus :func:`rigid_transform_columns` (input order)."""
    from relion_dynamight.relion.star import write_particles

    extra = {"rlnRandomSubset": split.half.astype(np.int64),
             **rigid_transform_columns(state, split.half, latents)}
    return write_particles(table, path, extra_columns=extra)

