"""The trained models as the later tasks use them: one home for loading them.

* The forward model (:func:`load_forward`: checkpoint + ``latent_space.star``, checked against each other;
  :func:`forward_decoder`: one half's decoder), used by the inverse task, the backprojection, the exploration
  and the scoring against ground truth.
* The inverse models (:func:`save_inverse` / :func:`load_inverse`, ``inverse_deformations/inverse_half{1,2}.h5``).
* The latent codes of a chosen checkpoint.

``latent_space.star`` holds the codes of the *final* encoders.  A user who picks an earlier checkpoint with
``--checkpoint-file`` (inverse, backprojection, exploration) must get that checkpoint's networks *and* the codes
of that checkpoint's encoders: :func:`checkpoint_latents` re-encodes every particle with its own half set's
encoder of that checkpoint and caches the result in the job directory
(``forward_deformations/latents/<checkpoint>-<key>.npy``, the key made from the checkpoint's name, size and
modification time), so the next task that picks the same checkpoint reads it back.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import torch

from relion_dynamight.errors import InputError
from relion_dynamight.relion.jobdir import atomic_output
from relion_dynamight.training.inverse import InverseConfig, InverseTrainer, make_inverse_net

log = logging.getLogger("relion_dynamight")

CACHE_DIR = "forward_deformations/latents"
LATENT_STAR = Path("forward_deformations") / "latent_space.star"


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


INVERSE_FORMAT = "relion_dynamight.inverse_checkpoint.v1"


def inverse_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "inverse_deformations"


def inverse_path(output_dir: Path, half: int) -> Path:
    return inverse_dir(output_dir) / f"inverse_half{half}.h5"


# -- the forward model ------------------------------------------------------------------------------
@dataclass
class ForwardInputs:
    """The trained forward model of a job: checkpoint state, latent codes and half assignment per particle."""

    state: dict[str, Any]
    checkpoint: Path
    latents: torch.Tensor        # (n, L) float32, input order
    half: np.ndarray             # (n,) 1/2
    image_names: list[str]

    @property
    def config(self) -> dict[str, Any]:
        return self.state["config"]

    @property
    def box(self) -> int:
        return int(self.config["box"])


def load_forward(output_dir: Path, checkpoint_file: Path | None, next_command: str) -> ForwardInputs:
    """Forward checkpoint + ``latent_space.star`` of ``output_dir``, checked against each other."""
    from relion_dynamight.training import checkpoint as ckpt

    out = Path(output_dir)
    path = Path(checkpoint_file) if checkpoint_file else ckpt.final_path(out)
    latent_path = out / LATENT_STAR
    if not path.is_file() or not latent_path.is_file():
        missing = path if not path.is_file() else latent_path
        raise InputError(f"{missing} not found: run 'relion_dynamight optimize-deformations --output-directory "
                         f"{out} ...' to completion before {next_command}")
    state = ckpt.load_checkpoint(path, device="cpu")
    names, half, latents = read_latents(latent_path)
    count, _ = state["fingerprint"]
    if count != len(names) or len(state["split_half"]) != len(names) or not np.array_equal(
            np.asarray(state["split_half"], dtype=np.int64), half):
        raise InputError(f"{path} belongs to another particle set than {latent_path} ({count} vs {len(names)} "
                         "particles or different half sets); give the checkpoint of this job with --checkpoint-file")
    from relion_dynamight.training.halves import fingerprint

    if tuple(fingerprint(names)) != tuple(state["fingerprint"]):
        raise InputError(f"{path} belongs to another particle set than {latent_path} (image names differ); "
                         "give the checkpoint of this job with --checkpoint-file")
    if checkpoint_file and path.resolve() != ckpt.final_path(out).resolve():
        latents = checkpoint_latents(state, path, out)   # that checkpoint's encoders, not the final epoch's
    return ForwardInputs(state=state, checkpoint=path, latents=latents, half=half, image_names=names)


def read_latents(path: Path) -> tuple[list[str], np.ndarray, torch.Tensor]:
    """``(image names, half (n,), latents (n, L))`` from ``latent_space.star``."""
    from relion_dynamight.relion.star import read_star

    try:
        blocks = read_star(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable STAR file ({exc}); rerun optimize-deformations") from None
    frame = next((b for b in blocks.values() if hasattr(b, "columns") and any(
        str(c).startswith("dmLatent") for c in b.columns)), None)
    if frame is None:
        raise InputError(f"{path}: no dmLatent1.. columns; it was not written by optimize-deformations")
    for col in ("rlnImageName", "rlnRandomSubset"):
        if col not in frame:
            raise InputError(f"{path}: column _{col} is missing; rerun optimize-deformations")
    dims = sorted(int(c[8:]) for c in frame.columns if str(c).startswith("dmLatent") and str(c)[8:].isdigit())
    try:
        values = frame[[f"dmLatent{d}" for d in dims]].to_numpy(dtype=np.float32)
    except ValueError:
        raise InputError(f"{path}: dmLatent columns hold non-numbers; rerun optimize-deformations") from None
    if not np.isfinite(values).all():
        row = int(np.flatnonzero(~np.isfinite(values).all(axis=1))[0]) + 1
        raise InputError(f"{path}: latent values of particle {row} are NaN or Inf; rerun optimize-deformations")
    z = torch.as_tensor(values)
    return [str(v) for v in frame["rlnImageName"]], frame["rlnRandomSubset"].to_numpy(np.int64), z


def forward_decoder(inputs: ForwardInputs, half: int, device: torch.device) -> tuple[Any, torch.Tensor]:
    """``(decoder, consensus centres (M, 3))`` of one half, evaluation mode, on ``device``."""
    from relion_dynamight.model.decoder import decoder_from_config

    tree = inputs.state["halves"][half]
    dec = decoder_from_config(inputs.config, tree["decoder"].get("mask"))
    dec.load_state_dict(tree["decoder"], strict=False)
    dec.to(device).eval()
    for p in dec.parameters():
        p.requires_grad_(False)
    return dec, tree["gaussians"]["positions"].detach().to(device=device, dtype=torch.float32)


# -- inverse checkpoint files -----------------------------------------------------------------------
def save_inverse(path: Path, trainer: InverseTrainer, inputs: ForwardInputs) -> Path:
    """Write one half's inverse state atomically (HDF5)."""
    from relion_dynamight.training.checkpoint import save_tree

    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"] = INVERSE_FORMAT
        f.attrs["half"] = trainer.half
        f.attrs["epoch"] = trainer.epoch
        f.attrs["n_epochs"] = trainer.config.n_epochs
        f.attrs["converged"] = bool(trainer.converged())   # stopped early by the convergence rule: finished
        f.attrs["config"] = json.dumps(trainer.config.to_dict(), sort_keys=True)
        f.attrs["box"] = trainer.box
        f.attrs["latent_dim"] = int(trainer.latents.shape[1])
        f.attrs["forward_checkpoint"] = str(inputs.checkpoint)
        f.attrs["forward_epoch"] = int(inputs.state["epoch"])
        f.attrs["fingerprint_count"] = int(inputs.state["fingerprint"][0])
        f.attrs["fingerprint_sha256"] = str(inputs.state["fingerprint"][1])
        f.create_dataset("centres", data=trainer.centres.cpu().numpy())
        save_tree(f.create_group("state"), trainer.state_tree())
        f.attrs["complete"] = True
    return path


def load_inverse(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read an inverse file → dict(attrs..., centres, state); clear errors for missing/corrupt files."""
    from relion_dynamight.training.checkpoint import load_tree

    if not Path(path).is_file():
        raise InputError(f"{path} not found")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != INVERSE_FORMAT or not f.attrs.get("complete", False):
                raise InputError(f"{path} is not a complete relion_dynamight inverse-deformation file")
            out = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
            out["config"] = json.loads(out["config"])
            out["centres"] = torch.from_numpy(np.array(f["centres"][()])).to(device)
            out["state"] = load_tree(f["state"], device)
    except InputError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise InputError(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc}); delete it and run "
                         "optimize-inverse-deformations again") from None
    return out


def inverse_net_from_file(info: dict[str, Any], device: torch.device) -> Any:
    cfg = InverseConfig(**info["config"])
    net = make_inverse_net(int(info["latent_dim"]), int(info["box"]), cfg, cfg.seed, int(info["half"]))
    net.load_state_dict(info["state"]["net"])
    return net.to(device).eval()


def same_forward(info: dict[str, Any], inputs: ForwardInputs) -> bool:
    return (int(info["fingerprint_count"]) == int(inputs.state["fingerprint"][0])
            and str(info["fingerprint_sha256"]) == str(inputs.state["fingerprint"][1])
            and int(info["forward_epoch"]) == int(inputs.state["epoch"])
            and Path(str(info["forward_checkpoint"])).name == inputs.checkpoint.name)
