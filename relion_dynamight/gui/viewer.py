"""napari viewer for the latent space (optional extra ``pip install 'relion-dynamight[gui]'``).

The only module of the package that imports napari or Qt, and only inside :func:`launch`.

* Main canvas: the consensus Gaussian model as a 3D image layer (``consensus``) and a ``deformed`` layer.
* Dock "latent space": the PCA embedding of the half set's particles (matplotlib in Qt).
  - click: the deformed map at the clicked point of the PCA plane replaces the ``deformed`` layer;
  - shift-click: adds a waypoint of a path; button "Movie along path": renders the frames into a 4D
    ``movie`` layer (time slider) and writes them like the headless ``--movie-path``;
  - lasso (drag with the right mouse button): selects particles; button "Save subset" writes
    ``DIR/subsets/half{H}_lasso{N}.star`` with every original column and the optics table.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from relion_dynamight.analysis import latent as lat
from relion_dynamight.analysis import subsets as sub

log = logging.getLogger("relion_dynamight")


class LatentExplorer:
    """State and actions of the viewer, independent of Qt (so it can be driven programmatically)."""

    def __init__(self, inputs: Any, results: Any) -> None:
        self.inputs, self.results = inputs, results
        self.model = inputs.models[inputs.half_set]
        self.embedding = results.embedding.detach().cpu().numpy()
        self.path: list[np.ndarray] = []
        self.selected = np.zeros(len(self.embedding), dtype=bool)
        self.n_saved = 0

    def map_at(self, xy: np.ndarray) -> np.ndarray:
        """Deformed map at PCA-plane point ``xy`` (2,)."""
        p = self.results.pca
        z = p.inverse(torch.as_tensor(np.asarray(xy)[None], dtype=p.mean.dtype, device=p.mean.device))
        return lat.deformed_maps(self.model, z, self.inputs.box)[0].cpu().numpy()

    def movie(self, n_frames: int = 10) -> np.ndarray:
        """Frames ``(F, N, N, N)`` along the waypoints clicked so far (PCA plane)."""
        p = self.results.pca
        way = torch.as_tensor(np.stack(self.path), dtype=p.mean.dtype, device=p.mean.device)
        z = lat.interpolate_path(p.inverse(way), n_frames)
        return lat.deformed_maps(self.model, z, self.inputs.box).cpu().numpy()

    def select_polygon(self, vertices: np.ndarray) -> int:
        inside = sub.inside_polygon(torch.as_tensor(self.embedding), torch.as_tensor(vertices))
        self.selected = inside.numpy()
        return int(self.selected.sum())

    def save_subset(self) -> str:
        self.n_saved += 1
        rows = self.results.rows[self.selected]
        path = self.inputs.job_dir / "subsets" / f"half{self.inputs.half_set}_lasso{self.n_saved}.star"
        sub.write_subset(self.inputs.table, rows, path)
        self.results.nodes.append((str(path), "ParticleGroupMetadata.star.relion.dynamight"))
        log.info("Saved %d particles to %s", len(rows), path)
        return str(path)


def launch(inputs: Any, results: Any, show: bool = True, block: bool = True) -> Any:
    """Open napari with the latent-space dock; returns the viewer (``block=False`` for tests)."""
    if results.embedding is None:
        log.info("The viewer needs half set 1 or 2; half set 0 has no latent space to show")
        return None
    import napari
    from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
    from matplotlib.figure import Figure
    from matplotlib.widgets import LassoSelector
    from qtpy.QtWidgets import QPushButton, QVBoxLayout, QWidget

    state = LatentExplorer(inputs, results)
    viewer = napari.Viewer(ndisplay=3, show=show, title=f"DynaMight: {inputs.job_dir} half {inputs.half_set}")
    consensus = lat.render(state.model.positions, state.model.amplitudes, state.model.widths, inputs.box)
    viewer.add_image(consensus.cpu().numpy(), name="consensus", rendering="iso", opacity=0.4)
    deformed = viewer.add_image(consensus.cpu().numpy(), name="deformed", rendering="iso", colormap="magenta")

    fig = Figure(figsize=(4, 4))
    canvas = FigureCanvasQTAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(state.embedding[:, 0], state.embedding[:, 1], s=2, c="grey")
    marks = ax.scatter([], [], s=30, c="red")
    ax.set_xlabel("PC1")
    ax.set_ylabel("PC2")

    def on_click(event: Any) -> None:
        if event.inaxes is not ax or event.button != 1:
            return
        xy = np.array([event.xdata, event.ydata])
        if event.key == "shift":
            state.path.append(xy)
            marks.set_offsets(np.stack(state.path))
            canvas.draw_idle()
        else:
            deformed.data = state.map_at(xy)

    def on_lasso(vertices: list) -> None:
        n = state.select_polygon(np.asarray(vertices))
        log.info("Lasso: %d particles selected", n)

    canvas.mpl_connect("button_press_event", on_click)
    lasso = LassoSelector(ax, on_lasso, button=3)

    def on_movie() -> None:
        if len(state.path) >= 2:
            viewer.add_image(state.movie(), name="movie", rendering="iso")

    widget = QWidget()
    layout = QVBoxLayout(widget)
    layout.addWidget(canvas)
    for text, action in (("Movie along path", on_movie), ("Save subset", state.save_subset),
                         ("Clear path", lambda: state.path.clear())):
        button = QPushButton(text)
        button.clicked.connect(action)
        layout.addWidget(button)
    viewer.window.add_dock_widget(widget, name="latent space", area="right")
    viewer._dynamight = (state, lasso)  # keep references alive
    if block:
        napari.run()
    return viewer
