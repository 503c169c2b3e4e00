"""The epoch loop over both half sets, on one rank (halves alternate) or two (one half per rank).

Each half's random streams are its own (:mod:`.rng`), so the models do not depend on how halves are
scheduled over ranks.  Checkpoints are written at epoch boundaries by rank 0 after gathering the other
rank's half (only model state crosses ranks, never images, and only to be written to the file).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from relion_dynamight.errors import InputError
from relion_dynamight.training import checkpoint as ckpt
from relion_dynamight.training.half import HalfModel, TrainingDiverged
from relion_dynamight.training.halves import HalfSplit
from relion_dynamight.training.live import Progress
from relion_dynamight.training.schedule import Schedule

log = logging.getLogger("relion_dynamight")


def halves_of_rank(rank: int, size: int) -> list[int]:
    """Halves trained by ``rank``: both with one rank, half ``rank + 1`` with two, none for extra ranks."""
    if size == 1:
        return [1, 2]
    return [rank + 1] if rank < 2 else []


class Trainer:
    """Orchestrates the half models of this rank, checkpoints and progress lines.

    ``comm`` is :class:`relion_dynamight.parallel.mpi.Comm`; ``check_abort`` raises ``JobAborted``.
    """

    def __init__(self, config: dict[str, Any], data: Any, split: HalfSplit, initial: dict[str, Any],
                 device: torch.device, comm: Any, output_dir: Path, fingerprint: tuple[int, str],
                 check_abort: Callable[[], None], mask_weights: torch.Tensor | None = None,
                 fixed_edges: torch.Tensor | None = None) -> None:
        self.config = config
        self.schedule = Schedule(**config["schedule"])
        self.data = data
        self.split = split
        self.initial = initial
        self.device = device
        self.comm = comm
        self.output_dir = Path(output_dir)
        self.fingerprint = fingerprint
        self.check_abort = check_abort
        self.start_epoch = 0
        self.models: dict[int, HalfModel] = {}
        for h in halves_of_rank(comm.rank, comm.size):
            self.models[h] = HalfModel(h, config, initial, split.indices(h, False), split.indices(h, True), device,
                                       mask_weights=mask_weights, fixed_edges=fixed_edges)

    # -- state -----------------------------------------------------------------------------------
    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a loaded checkpoint (see :func:`.checkpoint.load_checkpoint`)."""
        for h, model in self.models.items():
            model.load_tree(state["halves"][h])
        self.start_epoch = int(state["epoch"])

    def prepare(self) -> None:
        """Fresh start: per-half image normalisation and a first noise spectrum (from the residuals of the
        initial model), both from each half's own particles, so epoch 1 already uses noise weights."""
        for model in self.models.values():
            model.set_normalisation(self.data)
            model.validate(self.data, self.check_abort)

    def gather_trees(self) -> dict[int, dict[str, Any]] | None:
        """Both halves' state trees on rank 0 (None elsewhere)."""
        local = {h: m.state_tree() for h, m in self.models.items()}
        if self.comm.size == 1:
            return local
        gathered = self.comm.gather(local, root=0)
        if self.comm.rank != 0:
            return None
        merged: dict[int, dict[str, Any]] = {}
        for part in gathered:
            merged.update(part)
        return merged

    def write_checkpoint(self, epochs_done: int, final: bool = False) -> Path | None:
        trees = self.gather_trees()
        if trees is None:
            return None
        state = {
            "epoch": epochs_done,
            "config": self.config,
            "fingerprint": self.fingerprint,
            "split_half": self.split.half,
            "split_validation": self.split.validation,
            "initial": self.initial,
            "halves": trees,
            "extra": {"split_source": self.split.source},
        }
        path = ckpt.final_path(self.output_dir) if final else ckpt.epoch_path(self.output_dir, epochs_done)
        ckpt.save_checkpoint(path, state)
        if not final:
            ckpt.prune(self.output_dir, keep=int(self.config.get("keep_checkpoints", 3)),
                       every=int(self.config.get("keep_every", 10)), best_epoch=self._best_epoch())
        return path

    def _best_epoch(self) -> int | None:
        """Epochs done at the lowest summed validation loss of the halves (network epochs only)."""
        totals: dict[int, float] = {}
        for model in self.models.values():
            for h in model.history:
                if h.get("network_phase") and np.isfinite(h.get("val_mse", np.nan)):
                    totals[int(h["epoch"]) + 1] = totals.get(int(h["epoch"]) + 1, 0.0) + float(h["val_mse"])
        return min(totals, key=totals.__getitem__) if totals else None

    # -- loop ------------------------------------------------------------------------------------
    def _all_stopped(self) -> bool:
        local = np.array([sum(not m.stopped for m in self.models.values())], dtype=np.int64)
        return int(self.comm.allreduce_sum(local)[0]) == 0

    def _train_half_epoch(self, model: HalfModel, epoch: int) -> Any:
        while True:
            try:
                return model.train_epoch(epoch, self.schedule, self.data, self.check_abort)
            except torch.OutOfMemoryError:
                bs = int(self.config["batch_size"])
                if bs <= 1:
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.config["batch_size"] = bs // 2
                log.warning("WARNING: out of memory with batch size %d; repeating epoch %d of half %d with "
                            "batch size %d", bs, epoch + 1, model.half, bs // 2)

    def run(self) -> int:
        """Train from ``start_epoch`` to the end of the schedule; returns the number of epochs done."""
        n_epochs = self.schedule.n_epochs
        epoch = self.start_epoch
        if epoch >= n_epochs or self._all_stopped():
            log.info("Training already complete (%d epochs in the checkpoint)", epoch)
            return epoch
        started, first = time.monotonic(), epoch
        while epoch < n_epochs:
            lines = []
            for h in sorted(self.models):
                model = self.models[h]
                if model.stopped:
                    continue
                try:
                    stats = self._train_half_epoch(model, epoch)
                except TrainingDiverged as exc:
                    last = ckpt.list_checkpoints(self.output_dir)
                    raise InputError(
                        f"training diverged at epoch {epoch + 1}: {exc}; the last good checkpoint is "
                        f"{last[0] if last else 'none'} (the inputs' numbers were checked before training; "
                        "continue from that checkpoint or start afresh with a smaller --regularization-factor)"
                    ) from None
                lines.append(stats.line(n_epochs))
                if model.stopped:
                    lines.append(f"half {h}: training stops at epoch {epoch + 1} of at most {n_epochs}: its validation "
                                 f"loss has increased {model.plateau.increases} times (the paper's rule)")
            self._log_lines(lines)
            epoch += 1
            all_stopped = self._all_stopped()
            progress = Progress(epoch, n_epochs, first, time.monotonic() - started)
            if self.comm.rank == 0:
                log.info(progress.line())
            if self.schedule.write_checkpoint(epoch - 1) or epoch == n_epochs or all_stopped:
                path = self.write_checkpoint(epoch)
                if path is not None:
                    log.info("Checkpoint written: %s", path)
            if all_stopped:
                break
            live = int(self.config.get("live_every", 5))
            if live > 0 and epoch % live == 0 and epoch < n_epochs:
                self.write_live(progress)
        self._log_lines([f"half {h}: training stops at epoch {epoch}: the maximum (--n-epochs); its validation loss "
                         f"increased {m.plateau.increases} of the {m.plateau.patience} times that stop it earlier"
                         for h, m in sorted(self.models.items()) if not m.stopped])
        return epoch

    def write_live(self, progress: Progress) -> None:
        """Rewrite the live maps, figures and report (:mod:`.live`) on rank 0."""
        from relion_dynamight.training.live import write_live
        from relion_dynamight.training.outputs import forward_dir

        trees = self.gather_trees()
        local = {h: m.val_latents for h, m in self.models.items()}
        parts = self.comm.gather(local, root=0) if self.comm.size > 1 else [local]
        if trees is None or parts is None:
            return
        val_latents = {h: z for part in parts for h, z in part.items()}
        write_live(forward_dir(self.output_dir), trees, self.config, val_latents, progress)
        log.info("Live maps and figures rewritten (every %d epochs): %s", int(self.config.get("live_every", 5)),
                 forward_dir(self.output_dir) / "report.html")

    def _log_lines(self, lines: list[str]) -> None:
        gathered = self.comm.gather(lines, root=0) if self.comm.size > 1 else [lines]
        if gathered is not None:
            for part in gathered:
                for line in part:
                    log.info(line)

    # -- results ---------------------------------------------------------------------------------
    def latents(self) -> np.ndarray | None:
        """Latent means of every particle (its own half's encoder), input order, on rank 0."""
        n = len(self.split)
        local: dict[int, np.ndarray] = {}
        for h, model in self.models.items():
            idx = self.split.indices(h, None)
            local[h] = model.latents(self.data, idx, self.check_abort).numpy()
        parts = self.comm.gather(local, root=0) if self.comm.size > 1 else [local]
        if parts is None:
            return None
        out = np.zeros((n, int(self.config["latent_dim"])), dtype=np.float32)
        for part in parts:
            for h, values in part.items():
                out[self.split.indices(h, None)] = values
        return out
