"""The napari viewer (optional ``gui`` extra): tested under Xvfb only when napari is installed."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from relion_dynamight.jobs.explore import ExploreOptions, explore

from explore_data import make_inputs


def test_package_never_imports_napari_outside_gui() -> None:
    """Only relion_dynamight/gui/ may import napari or Qt (so training runs on headless nodes)."""
    root = Path(__file__).resolve().parents[1] / "relion_dynamight"
    offenders = []
    for path in root.rglob("*.py"):
        if "gui" in path.relative_to(root).parts[:1]:
            continue
        text = path.read_text()
        for word in ("import napari", "from napari", "import PyQt", "from PyQt", "from qtpy", "import qtpy"):
            if word in text:
                offenders.append(f"{path.relative_to(root)}: {word}")
    assert not offenders


def test_explorer_actions_without_qt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The viewer's actions (map at a click, path movie, lasso subset) work without napari."""
    from relion_dynamight.gui.viewer import LatentExplorer
    from relion_dynamight.relion.star import load_particles

    monkeypatch.chdir(tmp_path)
    inputs, angles = make_inputs(tmp_path, n=60)
    res = explore(inputs, ExploreOptions(movie_pcs=0))
    state = LatentExplorer(inputs, res)
    vol = state.map_at(np.array([1.0, 0.0]))
    assert vol.shape == (inputs.box,) * 3
    state.path = [np.array([-1.0, 0.0]), np.array([1.0, 0.0])]
    assert state.movie(3).shape == (3, inputs.box, inputs.box, inputs.box)
    n = state.select_polygon(np.array([[0, -10], [10, -10], [10, 10], [0, 10]]))
    assert 0 < n < len(res.rows)
    table = load_particles(state.save_subset())
    index = {name: i for i, name in enumerate(inputs.table.image_names)}
    assert len(table) == n and (angles[[index[x] for x in table.image_names]] > 0).all()
    assert "napari" not in sys.modules


@pytest.mark.skipif(shutil.which("xvfb-run") is None, reason="xvfb-run not found (Debian package xvfb)")
@pytest.mark.skipif(importlib.util.find_spec("napari") is None,
                    reason="napari is not installed (optional extra: pip install 'relion-dynamight[gui]')")
def test_napari_viewer_opens_under_xvfb(tmp_path: Path) -> None:
    script = tmp_path / "open_viewer.py"
    script.write_text(
        "import sys; sys.path.insert(0, %r)\n"
        "from pathlib import Path\n"
        "import os; os.chdir(%r)\n"
        "from explore_data import make_inputs\n"
        "from relion_dynamight.jobs.explore import ExploreOptions, explore\n"
        "from relion_dynamight.gui.viewer import launch\n"
        "inputs, _ = make_inputs(Path('.'), n=60)\n"
        "res = explore(inputs, ExploreOptions(movie_pcs=0))\n"
        "viewer = launch(inputs, res, show=True, block=False)\n"
        "assert [l.name for l in viewer.layers] == ['consensus', 'deformed']\n"
        "viewer.close()\nprint('VIEWER OK')\n" % (str(Path(__file__).parent), str(tmp_path)))
    out = subprocess.run(["xvfb-run", "-a", sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "QT_QPA_PLATFORM": "xcb"})
    assert out.returncode == 0 and "VIEWER OK" in out.stdout, out.stderr[-3000:]
