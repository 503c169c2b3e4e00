"""napari viewer of the latent space (optional extra ``pip install 'relion-dynamight[gui]'``).

The only module of the package that imports napari or Qt, and only inside :func:`launch`.  Its actions live in
:class:`LatentExplorer`, which needs no Qt, so they are tested headless and the buttons only call them.

Half set 1 or 2:

* 3D canvas: ``consensus`` (the half's consensus Gaussian model), ``deformed`` (the map of the selected particle)
  and ``gaussians`` (points coloured by their displacement in the selected particle, Å).
* Dock "latent space": the PCA embedding of the half's particles, coloured by any attribute of the headless
  figures (motion amount, direction, density, pose angles, defocus, clusters, particle index).
  - click: the nearest particle; its *full* latent code (not a point of the PCA plane) deforms the model;
  - shift-click: adds the nearest particle as a waypoint of a path;
  - drag with the right button: lasso; selects the particles inside.
  - buttons: "Save map" (the deformed map, MRC), "Save movie" (along the path: MRC frames + GIF, also shown as a
    4D ``movie`` layer), "Save subset" (the lasso, a RELION STAR file with every original column), "Clear path".
  Saved files get the next free number and never overwrite an earlier save.

Half set 0 (validation particles): ``gaussians`` coloured by the deformation error between the half sets (Å).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from relion_dynamight.analysis import latent as lat
from relion_dynamight.analysis import subsets as sub

log = logging.getLogger("relion_dynamight")


def next_free(folder: Path, pattern: str) -> Path:
    """``folder / pattern.format(k)`` for the smallest ``k ≥ 1`` not taken (a save never overwrites)."""
    k = 1
    while (folder / pattern.format(k)).exists():
        k += 1
    return folder / pattern.format(k)


class LatentExplorer:
    """State and actions of the viewer, independent of Qt (so it can be driven programmatically)."""

    def __init__(self, inputs: Any, results: Any) -> None:
        self.inputs, self.results = inputs, results
        self.half = int(inputs.half_set)
        self.model = inputs.models[self.half if self.half in inputs.models else 1]
        self.folder = Path(results.out_dir) / "viewer"
        self.embedding = None if results.embedding is None else results.embedding.detach().cpu().numpy()
        self.path: list[int] = []                 # waypoints: particle numbers (rows of the embedding)
        self.current: int | None = None
        self.selected = np.zeros(0 if self.embedding is None else len(self.embedding), dtype=bool)

    # -- colours --------------------------------------------------------------------------------
    def colour_names(self) -> list[str]:
        return list(self.results.colourings)

    def colours(self, name: str) -> tuple[np.ndarray, str]:
        """Values per particle and kind ('continuous', 'categorical', 'cyclic') of attribute ``name``."""
        return self.results.colourings[name]

    # -- particles ------------------------------------------------------------------------------
    def nearest(self, xy: np.ndarray) -> int:
        """The particle (row of the embedding) nearest to PCA-plane point ``xy`` ``(2,)``."""
        assert self.embedding is not None
        return int(np.argmin(((self.embedding - np.asarray(xy)[None]) ** 2).sum(1)))

    def latent(self, i: int) -> torch.Tensor:
        """Full latent code ``(1, L)`` of particle ``i``."""
        return self.results.z[i: i + 1]

    def select_particle(self, i: int) -> np.ndarray:
        """Make particle ``i`` current; returns its deformed map ``(N, N, N)``."""
        self.current = int(i)
        return self.deformed_map()

    def deformed_map(self) -> np.ndarray:
        """The model deformed by the current particle's latent code (the consensus when none is selected)."""
        if self.current is None:
            return lat.render(self.model.positions, self.model.amplitudes, self.model.widths,
                              self.inputs.box).cpu().numpy()
        return lat.deformed_maps(self.model, self.latent(self.current), self.inputs.box)[0].cpu().numpy()

    def point_values(self) -> np.ndarray:
        """Per Gaussian: displacement in the current particle (Å), or for half set 0 the error between halves."""
        if self.half == 0:
            return np.asarray(self.results.gaussian_errors, dtype=np.float64)
        if self.current is None:
            return np.zeros(self.model.positions.shape[0])
        d = lat.displacements(self.model, self.latent(self.current))[0]
        return (d.norm(dim=-1) * self.inputs.pixel_size).cpu().numpy()

    def point_coordinates(self) -> np.ndarray:
        """Gaussian centres as napari coordinates ``(M, 3)``: voxel indices (z, y, x), deformed by the current
        particle."""
        pos = self.model.positions
        if self.half != 0 and self.current is not None:
            pos = pos + lat.displacements(self.model, self.latent(self.current))[0]
        return (pos.cpu().numpy() + self.inputs.box // 2)[:, ::-1].copy()

    # -- path and movie ---------------------------------------------------------------------------
    def add_waypoint(self, xy: np.ndarray) -> int:
        i = self.nearest(xy)
        self.path.append(i)
        return i

    def movie(self, n_frames: int = 10) -> np.ndarray:
        """Frames ``(F, N, N, N)`` through the waypoints' full latent codes."""
        z = lat.interpolate_path(torch.cat([self.latent(i) for i in self.path]), n_frames)
        return lat.deformed_maps(self.model, z, self.inputs.box).cpu().numpy()

    # -- saving ------------------------------------------------------------------------------------
    def save_map(self) -> Path:
        from relion_dynamight.relion.mrc import write_map

        path = next_free(self.folder, "map_{:03d}.mrc")
        write_map(path, self.deformed_map(), self.inputs.pixel_size)
        log.info("Saved the map of particle %s to %s", "none (consensus)" if self.current is None else
                 self.inputs.latent.names[self.results.rows[self.current]], path)
        return path

    def save_movie(self, n_frames: int = 10) -> list[Path]:
        """Frames as MRC files in ``viewer/movie_NNN/`` and a GIF of their projections; [] without a path."""
        from relion_dynamight.analysis.explore_figures import movie
        from relion_dynamight.relion.mrc import write_map

        if len(self.path) < 2:
            log.info("A movie needs at least two waypoints (shift-click in the latent space)")
            return []
        frames = self.movie(n_frames)
        folder = next_free(self.folder, "movie_{:03d}")
        written = [write_map(folder / f"frame_{f:03d}.mrc", vol, self.inputs.pixel_size) for f, vol in enumerate(frames)]
        written += movie(folder.with_suffix(".gif"), frames.sum(axis=1))
        log.info("Saved a movie of %d frames to %s", n_frames, folder)
        return written

    def select_polygon(self, vertices: np.ndarray) -> int:
        inside = sub.inside_polygon(torch.as_tensor(self.embedding), torch.as_tensor(vertices))
        self.selected = inside.numpy()
        return int(self.selected.sum())

    def save_subset(self) -> Path | None:
        rows = self.results.rows[self.selected]
        if len(rows) == 0:
            log.info("No particles selected: drag with the right mouse button around some first")
            return None
        path = next_free(Path(self.inputs.job_dir) / "subsets", f"half{self.half}_lasso{{}}.star")
        sub.write_subset(self.inputs.table, rows, path)
        self.results.nodes.append((str(path), "ParticleGroupMetadata.star.relion.dynamight"))
        log.info("Saved %d particles to %s", len(rows), path)
        return path


def viewer_problem(timeout: float = 120.0) -> str | None:
    """None when a Qt application can start here (checked in a child process); else the reason."""
    import os
    import subprocess
    import sys

    probe = "import sys\nfrom qtpy.QtWidgets import QApplication\nQApplication(sys.argv[:1])\n"
    try:
        res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"Qt probe failed: {exc}"
    if res.returncode == 0:
        return None
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    hint = next((ln for ln in lines if "could not" in ln.lower() or "cannot" in ln.lower()), lines[-1] if lines
                else f"exit code {res.returncode}")
    return f"Qt cannot open the display {os.environ.get('DISPLAY', '')!r}: {hint.strip()}"


def launch(inputs: Any, results: Any, show: bool = True, block: bool = True) -> Any:
    """Open napari with the latent-space dock; returns the viewer (``block=False`` for tests; the widgets are in
    ``viewer._dynamight``)."""
    import napari

    state = LatentExplorer(inputs, results)
    title = f"DynaMight: {inputs.job_dir} half set {inputs.half_set}"
    viewer = napari.Viewer(ndisplay=3, show=show, title=title)
    consensus = lat.render(state.model.positions, state.model.amplitudes, state.model.widths, inputs.box)
    viewer.add_image(consensus.cpu().numpy(), name="consensus", rendering="iso", opacity=0.4)
    handles: dict[str, Any] = {"state": state}
    points = viewer.add_points(state.point_coordinates(), name="gaussians", size=1.0,
                               features={"value": state.point_values()}, face_color="value",
                               face_colormap="viridis" if state.half == 0 else "magma")
    if state.half == 0:
        points.name = "gaussians (error between half sets, Å)"
    else:
        handles["deformed"] = viewer.add_image(consensus.cpu().numpy(), name="deformed", rendering="iso",
                                               colormap="magenta")
        handles.update(_latent_dock(viewer, state, points, handles["deformed"]))
    viewer._dynamight = handles  # keep references alive; tests drive the widgets through them
    if block:
        napari.run()
    return viewer


def _latent_dock(viewer: Any, state: LatentExplorer, points: Any, deformed: Any) -> dict[str, Any]:
    """The "latent space" dock: scatter, colour selector and buttons (see module docstring)."""
    from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
    from matplotlib.figure import Figure
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QComboBox, QLabel, QPushButton, QVBoxLayout, QWidget

    fig = Figure(figsize=(4, 4))
    canvas = FigureCanvasQTAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    emb = state.embedding
    assert emb is not None, "the latent-space dock needs half set 1 or 2"
    scatter = ax.scatter(emb[:, 0], emb[:, 1], s=4, c="grey")
    marks = ax.scatter([], [], s=40, c="red", marker="x")
    current = ax.scatter([], [], s=80, facecolors="none", edgecolors="black")
    ax.set_xlabel("PC1")
    ax.set_ylabel("PC2")
    status = QLabel("click: a particle's map; shift-click: waypoint; right-drag: lasso")
    combo = QComboBox()
    combo.addItems(state.colour_names())

    def recolour(index: int) -> None:
        values, kind = state.colours(state.colour_names()[index])
        scatter.set_array(np.asarray(values, dtype=np.float64))
        scatter.set_cmap({"categorical": "tab10", "cyclic": "twilight"}.get(kind, "viridis"))
        scatter.autoscale()
        ax.set_title(state.colour_names()[index], fontsize=9)
        canvas.draw_idle()

    def show_particle(i: int) -> None:
        deformed.data = state.select_particle(i)
        points.data = state.point_coordinates()
        points.features = {"value": state.point_values()}
        points.face_color = "value"
        current.set_offsets(emb[i: i + 1])
        status.setText(f"particle {state.inputs.latent.names[state.results.rows[i]]}")
        canvas.draw_idle()

    lasso: list[tuple[float, float]] = []
    (lasso_line,) = ax.plot([], [], color="black", lw=1)

    def on_click(event: Any) -> None:
        if event.inaxes is ax and event.button == 3:        # right button: start a lasso
            lasso[:] = [(event.xdata, event.ydata)]
            return
        if event.inaxes is not ax or event.button != 1:
            return
        xy = np.array([event.xdata, event.ydata])
        gui = getattr(event, "guiEvent", None)   # the Qt event's own modifiers (matplotlib asks the keyboard)
        if (event.key == "shift" or "shift" in (getattr(event, "modifiers", None) or ())
                or (gui is not None and bool(gui.modifiers() & Qt.KeyboardModifier.ShiftModifier))):
            state.add_waypoint(xy)
            marks.set_offsets(emb[state.path])
            canvas.draw_idle()
        else:
            show_particle(state.nearest(xy))

    def on_drag(event: Any) -> None:
        if lasso and event.inaxes is ax and 3 in (event.buttons or ()):
            lasso.append((event.xdata, event.ydata))
            lasso_line.set_data(*zip(*lasso))
            canvas.draw_idle()

    def on_release(event: Any) -> None:
        if event.button != 3 or len(lasso) < 3:
            lasso.clear()
            return
        n = state.select_polygon(np.asarray(lasso))
        lasso_line.set_data(*zip(*(lasso + lasso[:1])))
        lasso.clear()
        status.setText(f"lasso: {n} particles selected")
        canvas.draw_idle()

    def on_movie() -> None:
        written = state.save_movie()
        if written:
            viewer.add_image(state.movie(), name=written[0].parent.name, rendering="iso")
            status.setText(f"movie saved: {written[0].parent}")

    def on_clear() -> None:
        state.path.clear()
        marks.set_offsets(np.zeros((0, 2)))
        canvas.draw_idle()

    canvas.mpl_connect("button_press_event", on_click)
    canvas.mpl_connect("motion_notify_event", on_drag)
    canvas.mpl_connect("button_release_event", on_release)
    combo.currentIndexChanged.connect(recolour)
    recolour(0)
    widget = QWidget()
    layout = QVBoxLayout(widget)
    layout.addWidget(QLabel("colour by"))
    layout.addWidget(combo)
    layout.addWidget(canvas)
    layout.addWidget(status)
    actions: dict[str, Callable[[], Any]] = {
        "Save map": lambda: status.setText(f"map saved: {state.save_map()}"),
        "Save movie": on_movie,
        "Save subset": lambda: status.setText(f"subset saved: {state.save_subset()}"),
        "Clear path": on_clear,
    }
    buttons = {}
    for text, action in actions.items():
        buttons[text] = QPushButton(text)
        buttons[text].clicked.connect(action)
        layout.addWidget(buttons[text])
    viewer.window.add_dock_widget(widget, name="latent space", area="right")
    return {"canvas": canvas, "axes": ax, "combo": combo, "buttons": buttons, "status": status, "scatter": scatter}
