"""What a running training shows: progress with elapsed time and ETA, and files rewritten every few epochs.

Every ``live_every`` epochs (configuration key, option ``--live-every``, default 5 like the original; 0 = off)
rank 0 rewrites, atomically (a reader never sees half a file), in ``DIR/forward_deformations/``:

* ``consensus_half{1,2}.mrc``: each half's current consensus Gaussian model rendered as a map;
* ``loss_curves.png``: the loss history of both halves so far;
* ``latent_space.png``: the validation particles' latent means (PCA), from the last validation pass (no extra
  pass over the data);
* ``report.html``: status (epoch, elapsed, remaining at most, the time it was written), the figures and links to
  the maps; a browser reloads it every minute, so it can be left open on a cluster's shared file system.

At the end :func:`relion_dynamight.training.outputs.write_outputs` replaces them with the final ones (the latent
figure then holds every particle) and writes the report once more, without the reload.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

log = logging.getLogger("relion_dynamight")

#: Seconds between reloads of the live report in a browser.
REFRESH_SECONDS = 60


@dataclass(frozen=True)
class Progress:
    """Where a training run stands: epochs done of at most ``n_epochs``, wall seconds since this process started
    training from epoch ``first``."""

    epoch: int
    n_epochs: int
    first: int
    elapsed: float

    @property
    def remaining(self) -> float:
        """Seconds still needed at most (all remaining epochs at this run's mean epoch time)."""
        done = self.epoch - self.first
        return self.elapsed / done * (self.n_epochs - self.epoch) if done > 0 else float("nan")

    def line(self) -> str:
        """``epoch 10/50 done: 7 min 30 s elapsed, at most 30 min 0 s to go (ETA 14:32)``."""
        eta = time.strftime("%H:%M", time.localtime(time.time() + self.remaining)) if self.epoch > self.first else "?"
        return (f"epoch {self.epoch}/{self.n_epochs} done: {duration(self.elapsed)} elapsed, at most "
                f"{duration(self.remaining)} to go (ETA {eta})")


def duration(seconds: float) -> str:
    """``3725`` → ``1 h 02 min``; ``95`` → ``1 min 35 s``; ``nan`` → ``?``."""
    if not np.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 60} min {s % 60} s" if s >= 60 else f"{s} s"


def consensus_maps(trees: Mapping[int, Mapping[str, Any]], box: int) -> dict[int, np.ndarray]:
    """Each half's consensus Gaussian model (state tree ``trees[h]["gaussians"]``) rendered as a ``(box,)*3``
    map (z, y, x)."""
    from relion_dynamight.imaging.gaussians import render_volume

    maps = {}
    for h, tree in sorted(trees.items()):
        g = tree["gaussians"]
        rel = g.get("relative_amplitudes")
        amplitudes = torch.exp(g["log_amplitude"]) * (rel if rel is not None else 1.0)
        with torch.no_grad():
            maps[h] = render_volume(g["positions"], amplitudes, torch.exp(g["log_width"]), box).detach().cpu().numpy()
    return maps


def write_report(folder: Path, progress: Progress | None, final: bool) -> Path:
    """``folder/report.html`` (``folder`` = ``DIR/forward_deformations``) with the figures and maps in it."""
    from relion_dynamight.analysis.report import Section, write_report as write_html

    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    if final:
        status = f"Training finished (written {stamp})."
    elif progress is not None:
        status = f"Training is running: {progress.line()}. Written {stamp}; this page reloads every minute."
    else:
        status = f"Written {stamp}."
    figures = [(folder / "loss_curves.png", "losses per epoch"), (folder / "latent_space.png",
               "latent space (PCA)" + ("" if final else ", validation particles"))]
    maps = [(folder / f"consensus_half{h}.mrc", f"half {h}'s consensus model") for h in (1, 2)
            if (folder / f"consensus_half{h}.mrc").is_file()]
    return write_html(folder / "report.html", "DynaMight training: " + str(folder.parent),
                      [], [Section("Status", status, figures=figures, files=maps)],
                      refresh_seconds=None if final else REFRESH_SECONDS)


def write_live(folder: Path, trees: Mapping[int, Mapping[str, Any]], config: Mapping[str, Any],
               val_latents: Mapping[int, np.ndarray], progress: Progress) -> list[Path]:
    """Rewrite the live files of a running training (see module docstring); returns their paths."""
    from relion_dynamight.analysis.figures import latent_scatter, loss_curves
    from relion_dynamight.relion.mrc import write_map

    folder.mkdir(parents=True, exist_ok=True)
    written = [write_map(folder / f"consensus_half{h}.mrc", volume, float(config["pixel_size"]))
               for h, volume in consensus_maps(trees, int(config["box"])).items()]
    histories = {h: tree.get("history") or {} for h, tree in trees.items()}
    written.append(loss_curves(histories, folder / "loss_curves.png"))
    halves = sorted(h for h, z in val_latents.items() if len(z))
    if halves:
        z = np.concatenate([val_latents[h] for h in halves])
        half = np.concatenate([np.full(len(val_latents[h]), h) for h in halves])
        written.append(latent_scatter(z, half, np.zeros(len(z), dtype=bool), folder / "latent_space.png"))
    written.append(write_report(folder, progress, final=False))
    return written
