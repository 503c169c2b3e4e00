"""``optimize-inverse-deformations DIR``: train each half's inverse deformation network.

Reads the forward checkpoint (``--checkpoint-file`` or ``DIR/forward_deformations/checkpoints/checkpoint_final.h5``)
and ``DIR/forward_deformations/latent_space.star``; writes ``DIR/inverse_deformations/inverse_half{1,2}.h5``
(HDF5 trees, never pickle), rewritten atomically after every epoch so an interrupted run resumes.
With MPI, half 1 trains on rank 0 and half 2 on rank 1 (a single process trains both in turn).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from relion_dynamight.errors import InputError
from relion_dynamight.relion.jobdir import atomic_output
from relion_dynamight.training.inverse import InverseConfig, InverseTrainer, decoder_forward_map, make_inverse_net

log = logging.getLogger("relion_dynamight")

FORMAT = "relion_dynamight.inverse_checkpoint.v1"
LATENT_STAR = Path("forward_deformations") / "latent_space.star"


def inverse_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "inverse_deformations"


def inverse_path(output_dir: Path, half: int) -> Path:
    return inverse_dir(output_dir) / f"inverse_half{half}.h5"


# -- inputs shared with deformable-backprojection ---------------------------------------------------
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
        from relion_dynamight.training.trained import checkpoint_latents

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
    from relion_dynamight.model.decoder import DeformationDecoder

    cfg, tree = inputs.config, inputs.state["halves"][half]
    mask = tree["decoder"].get("mask")
    dec = DeformationDecoder(int(cfg["latent_dim"]), int(cfg["box"]), n_freqs=int(cfg["decoder_freqs"]),
                             hidden=int(cfg["decoder_hidden"]), n_layers=int(cfg["decoder_layers"]), mask=mask)
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
        f.attrs["format"] = FORMAT
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
            if f.attrs.get("format") != FORMAT or not f.attrs.get("complete", False):
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
