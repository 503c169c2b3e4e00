"""Figures of the latent-space analysis (PNG) and animated movies (GIF), drawn without a display.

Uses matplotlib's object API with the Agg canvas (never ``pyplot``), so no GUI backend is selected and
nothing needs ``DISPLAY``.  Inputs are numpy arrays (this is the file-output boundary).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from relion_dynamight.analysis.figures import save_figure


@dataclass
class Panel:
    """One scatter panel: ``values`` per point; ``kind`` = 'continuous', 'categorical', 'cyclic' or 'rgb'."""

    title: str
    values: np.ndarray
    kind: str = "continuous"


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def scatter_panels(path: Path, coords: np.ndarray, panels: Sequence[Panel], xlabel: str = "PC1",
                   ylabel: str = "PC2", suptitle: str = "", max_points: int = 20000, seed: int = 0) -> Path:
    """Grid of 2D scatter plots of ``coords (n, 2)``, one per panel, coloured by the panel's values."""
    n = coords.shape[0]
    show = np.arange(n) if n <= max_points else np.sort(np.random.default_rng(seed).choice(n, max_points, False))
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = _new_figure(4.2 * cols, 3.6 * rows)
    size = max(1.0, min(12.0, 3000.0 / max(len(show), 1)))
    for k, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        x, y, v = coords[show, 0], coords[show, 1], np.asarray(panel.values)[show]
        if panel.kind == "rgb":
            ax.scatter(x, y, c=np.clip(v, 0, 1), s=size, linewidths=0)
        elif panel.kind == "categorical":
            sc = ax.scatter(x, y, c=v, s=size, cmap="tab10", vmin=0.5, vmax=10.5, linewidths=0)
            for label in np.unique(v):
                members = coords[np.asarray(panel.values) == label]
                ax.annotate(str(int(label)), members.mean(axis=0), fontsize=10, weight="bold",
                            ha="center", va="center")
        else:
            cmap = "twilight" if panel.kind == "cyclic" else "viridis"
            sc = ax.scatter(x, y, c=v, s=size, cmap=cmap, linewidths=0)
            fig.colorbar(sc, ax=ax, shrink=0.8)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    if suptitle:
        fig.suptitle(suptitle)
    return save_figure(fig, path)


def gaussian_projections(path: Path, positions_A: np.ndarray, values: np.ndarray, title: str,
                         unit: str = "Å") -> Path:
    """Gaussian centres ``(M, 3)`` (x, y, z in Å) seen along z, y and x, coloured by ``values (M,)``."""
    fig = _new_figure(13, 4)
    order = np.argsort(values)  # strongest on top
    views = (("x", "y", 0, 1), ("x", "z", 0, 2), ("y", "z", 1, 2))
    vmax = float(np.max(values)) if values.size and np.max(values) > 0 else 1.0
    for k, (xl, yl, i, j) in enumerate(views):
        ax = fig.add_subplot(1, 3, k + 1)
        sc = ax.scatter(positions_A[order, i], positions_A[order, j], c=values[order], s=8, cmap="inferno",
                        vmin=0, vmax=vmax, linewidths=0)
        ax.set_aspect("equal")
        ax.set_xlabel(f"{xl} (Å)")
        ax.set_ylabel(f"{yl} (Å)")
    fig.colorbar(sc, ax=fig.axes, shrink=0.8, label=unit)
    fig.suptitle(title)
    return save_figure(fig, path, tight=False)


def explained_variance(path: Path, explained: np.ndarray) -> Path:
    fig = _new_figure(4.5, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(np.arange(1, len(explained) + 1), explained * 100)
    ax.set_xlabel("principal component")
    ax.set_ylabel("variance explained (%)")
    return save_figure(fig, path)


def error_summary(path: Path, particle_error: np.ndarray, particle_motion: np.ndarray,
                  gaussian_error: np.ndarray, gaussian_motion: np.ndarray) -> Path:
    """Histogram of per-particle errors and per-Gaussian error against motion (both in Å)."""
    fig = _new_figure(12, 3.8)
    ax = fig.add_subplot(1, 3, 1)
    ax.hist(particle_error, bins=40)
    ax.set_xlabel("per-particle error (Å)")
    ax.set_ylabel("particles")
    ax = fig.add_subplot(1, 3, 2)
    ax.scatter(particle_motion, particle_error, s=6, linewidths=0)
    ax.set_xlabel("particle motion (Å)")
    ax.set_ylabel("particle error (Å)")
    ax = fig.add_subplot(1, 3, 3)
    ax.scatter(gaussian_motion, gaussian_error, s=6, linewidths=0)
    top = float(max(gaussian_motion.max(initial=0), gaussian_error.max(initial=0))) or 1.0
    ax.plot([0, top], [0, top], "k--", linewidth=0.8, label="error = motion")
    ax.set_xlabel("Gaussian motion (Å)")
    ax.set_ylabel("Gaussian error (Å)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def movie(path: Path, frames: np.ndarray, fps: float = 8.0, titles: Sequence[str] | None = None) -> list[Path]:
    """Animated GIF of ``frames (F, H, W)`` (greyscale, each scaled to the movie's range), played forth and
    back.  Without Pillow, writes ``<stem>_frames/frame_NNN.png`` instead.  Returns the written files."""
    lo, hi = float(frames.min()), float(frames.max())
    scaled = ((frames - lo) / (hi - lo if hi > lo else 1.0) * 255).astype(np.uint8)
    try:
        from PIL import Image
    except ImportError:
        return _png_frames(path, frames, titles)
    images = [Image.fromarray(f[::-1]).resize((max(128, f.shape[1] * 2),) * 2) for f in scaled]
    images = images + images[-2:0:-1]
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return [path]


def _png_frames(path: Path, frames: np.ndarray, titles: Sequence[str] | None) -> list[Path]:
    folder = path.with_name(path.stem + "_frames")
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k, frame in enumerate(frames):
        fig = _new_figure(3, 3)
        ax = fig.add_axes((0, 0, 1, 1))
        ax.imshow(frame, cmap="gray", origin="lower", vmin=frames.min(), vmax=frames.max())
        ax.set_axis_off()
        if titles:
            ax.set_title(titles[k])
        out.append(save_figure(fig, folder / f"frame_{k:03d}.png", tight=False))
    return out
