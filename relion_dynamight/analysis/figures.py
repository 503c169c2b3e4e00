"""Training figures as PNG files (matplotlib, Agg backend: works without a display)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def save_figure(fig: Figure, path: Path, tight: bool = True, dpi: float | str = "figure") -> Path:
    """Write ``fig`` as PNG to ``path``, creating its folder, atomically (a figure rewritten while a job runs is never
    seen half written); ``tight``: lay it out first."""
    from relion_dynamight.relion.jobdir import atomic_output

    if tight:
        fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def _save(plt: Any, fig: Figure, path: Path) -> Path:
    """:func:`save_figure` at 100 dpi, then release the pyplot figure."""
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return Path(path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def pca(latents: np.ndarray, n_components: int = 2) -> np.ndarray:
    """Projections of ``(n, L)`` latents on their first principal components → ``(n, n_components)``."""
    x = np.asarray(latents, dtype=np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    if x.shape[1] == 0 or x.shape[0] == 0:
        return np.zeros((x.shape[0], n_components))
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    comps = x @ vt[:n_components].T
    if comps.shape[1] < n_components:
        comps = np.pad(comps, ((0, 0), (0, n_components - comps.shape[1])))
    return comps


def loss_curves(histories: Mapping[int, Mapping[str, np.ndarray]], path: Path) -> Path:
    """Data loss, validation MSE, geometric loss and λ per epoch for each half → PNG."""
    plt = _pyplot()
    keys = [("data", "data loss (noise-weighted)"), ("val_mse", "validation MSE"), ("geo", "geometric loss"),
            ("lam", "lambda")]
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5))
    for ax, (key, title) in zip(axes.flat, keys):
        for half, hist in sorted(histories.items()):
            if key in hist and len(hist[key]):
                epochs = np.asarray(hist.get("epoch", np.arange(len(hist[key])))) + 1
                ax.plot(epochs, hist[key], marker=".", label=f"half {half}")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    return _save(plt, fig, path)


def latent_scatter(latents: np.ndarray, halves: np.ndarray, validation: np.ndarray, path: Path) -> Path:
    """Scatter of the first two principal components of the latents, coloured by half → PNG."""
    plt = _pyplot()
    comps = pca(latents, 2)
    fig, ax = plt.subplots(figsize=(6, 5.5))
    for half, colour in ((1, "tab:blue"), (2, "tab:orange")):
        sel = (halves == half) & ~validation
        ax.scatter(comps[sel, 0], comps[sel, 1], s=4, alpha=0.5, c=colour, label=f"half {half}")
        val = (halves == half) & validation
        if val.any():
            ax.scatter(comps[val, 0], comps[val, 1], s=10, marker="x", c=colour, label=f"half {half} validation")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title("Latent space (PCA)")
    ax.legend(fontsize=8, markerscale=2)
    return _save(plt, fig, path)
