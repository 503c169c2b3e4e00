"""Headless explore-latent-space on a constructed hinge ground truth (see tests/support/explore_data.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from relion_dynamight.errors import InputError
from relion_dynamight.jobs.explore import SUBSET_LABEL, ExploreOptions, explore
from relion_dynamight.relion.star import load_particles

from explore_data import BOX, make_inputs


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_clusters_split_by_true_hinge_angle(project: Path) -> None:
    inputs, angles = make_inputs(project, n=240)
    polygon = project / "poly.txt"
    polygon.write_text("# PC1 PC2\n0 -10\n10 -10\n10 10\n0 10\n")
    res = explore(inputs, ExploreOptions(clusters=2, axis_ranges=("1::0",), polygons=(polygon,), movie_pcs=1,
                                         n_frames=3))
    rows = np.flatnonzero(inputs.latent.half == 1)
    names = {Path(n).name for n, label in res.nodes}
    assert {"half1_cluster01.star", "half1_cluster02.star", "half1_range1.star", "half1_polygon1.star"} <= names
    assert all(label == SUBSET_LABEL for _, label in res.nodes)
    source = inputs.table
    cl = [load_particles(f"DynaMight/job001/subsets/half1_cluster0{k}.star") for k in (1, 2)]
    index = {name: i for i, name in enumerate(source.image_names)}
    a1 = angles[[index[n] for n in cl[0].image_names]]
    a2 = angles[[index[n] for n in cl[1].image_names]]
    assert len(a1) + len(a2) == len(rows)
    # cluster 1 = low PC1 = negative hinge angles (PC signs: largest loading positive)
    assert (a1 < 0).mean() > 0.97 and (a2 > 0).mean() > 0.97, (np.median(a1), np.median(a2))
    # every column and the optics table are kept
    assert list(cl[0].particles.columns) == list(source.particles.columns)
    assert cl[0].optics is not None and cl[0].optics.equals(source.optics)
    # the axis-range subset: latent axis 1 up to 0 = negative angles
    rng = load_particles("DynaMight/job001/subsets/half1_range1.star")
    ar = angles[[index[n] for n in rng.image_names]]
    assert len(ar) > 0.3 * len(rows) and (ar < 0).mean() > 0.97
    poly = load_particles("DynaMight/job001/subsets/half1_polygon1.star")
    assert (angles[[index[n] for n in poly.image_names]] > 0).mean() > 0.97
    # maps per cluster centre and movie frames
    out = project / "DynaMight/job001/explore/half1"
    for name in ("cluster_01.mrc", "cluster_02.mrc", "consensus.mrc", "motion_variability.mrc"):
        with mrcfile.open(out / "maps" / name) as m:
            assert m.data.shape == (BOX, BOX, BOX) and abs(float(m.voxel_size.x) - 3.0) < 1e-4
    assert len(list((out / "movies" / "pc1").glob("frame_*.mrc"))) == 3
    assert (out / "movies" / "pc1.gif").stat().st_size > 0
    report = (project / "DynaMight/job001/report.html").read_text()
    assert "data:image/png;base64," in report and "half1_cluster01.star" in report


def test_nuisances_uncorrelated_and_motion_localised(project: Path) -> None:
    inputs, angles = make_inputs(project, n=240)
    explore(inputs, ExploreOptions(movie_pcs=0))
    out = project / "DynaMight/job001/explore/half1"
    nuisance = pd.read_csv(out / "nuisance.csv")
    assert len(nuisance) == 4
    assert (nuisance["R2_latent"] < 0.1).all(), nuisance
    assert (nuisance["max_abs_corr_PC1_PC2"] < 0.25).all(), nuisance
    motion = pd.read_csv(out / "gaussian_motion.csv")
    moving = motion["x_A"] > 0
    assert motion.loc[~moving, "motion_variability_A"].max() < 1e-4
    assert motion.loc[moving, "motion_variability_A"].mean() > 3.0  # Å: ±15° at 3-27 Å from the hinge
    emb = pd.read_csv(out / "embedding.csv")
    true = angles[emb["star_row"].to_numpy() - 1]
    assert abs(np.corrcoef(emb["PC1"], true)[0, 1]) > 0.95
    assert abs(np.corrcoef(emb["motion_rms_A"], np.abs(true))[0, 1]) > 0.9


def test_half_set_errors_larger_in_moving_domain(project: Path) -> None:
    inputs, _ = make_inputs(project, n=240, half_set=0)
    explore(inputs, ExploreOptions())
    err = project / "DynaMight/job001/explore/half0/errors"
    g = pd.read_csv(err / "errors_per_gaussian.csv")
    moving = g["dmX"] > 0
    fixed_err = g.loc[~moving, "dmDeformationErrorMean"].mean()
    moving_err = g.loc[moving, "dmDeformationErrorMean"].mean()
    assert fixed_err < 1e-4 and moving_err > 0.5, (fixed_err, moving_err)
    p = pd.read_csv(err / "errors_per_particle.csv")
    assert len(p) == int(inputs.latent.validation.sum())
    assert (err / "errors_per_particle.star").read_text().count("data_errors_per_particle") == 1
    assert (project / "DynaMight/job001/explore/half0/maps/error_map.mrc").is_file()


def test_bad_inputs(project: Path) -> None:
    inputs, _ = make_inputs(project, n=60)
    with pytest.raises(InputError, match="more than the 30 particles"):
        explore(inputs, ExploreOptions(clusters=31, movie_pcs=0))
    bad = project / "bad_poly.txt"
    bad.write_text("0 0\n1 one\n2 2\n")
    with pytest.raises(InputError, match="line 2"):
        explore(inputs, ExploreOptions(polygons=(bad,), movie_pcs=0))
    bad.write_text("0 0\n1 1\n")
    with pytest.raises(InputError, match="at least 3"):
        explore(inputs, ExploreOptions(polygons=(bad,), movie_pcs=0))
    with pytest.raises(InputError, match="AXIS:MIN:MAX"):
        explore(inputs, ExploreOptions(axis_ranges=("1-0.5",), movie_pcs=0))
    with pytest.raises(InputError, match="out of range"):
        explore(inputs, ExploreOptions(axis_ranges=("9:0:1",), movie_pcs=0))
    pts = project / "points.txt"
    pts.write_text("1 2 3\n")
    with pytest.raises(InputError, match="give 4 latent"):
        explore(inputs, ExploreOptions(latent_points=pts, movie_pcs=0))


def test_latent_points_in_latent_and_pca_coordinates(project: Path) -> None:
    inputs, _ = make_inputs(project, n=60)
    pts = project / "points.txt"
    pts.write_text("# latent points\n0.75 0 0 0\n-0.75, 0, 0, 0\n")
    path = project / "path.txt"
    path.write_text("-1 0\n0 0\n1 0.5\n")
    explore(inputs, ExploreOptions(latent_points=pts, movie_path=path, movie_pcs=0, n_frames=4))
    out = project / "DynaMight/job001/explore/half1"
    maps = [mrcfile.read(out / "maps" / f"point_00{k}.mrc") for k in (1, 2)]
    # +15° and -15° hinge: the two maps differ, and mirror each other through the y = 0 plane
    assert np.abs(maps[0] - maps[1]).max() > 0.1
    # y -> -y maps index j to BOX - j (the model is symmetric in y)
    assert np.allclose(maps[0][:, 1:, :], maps[1][:, ::-1, :][:, :BOX - 1, :], atol=1e-4 * maps[0].max())
    assert len(list((out / "movies" / "path").glob("frame_*.mrc"))) == 4


@pytest.mark.relion
def test_subset_star_reconstructs_with_relion(project: Path, relion: None) -> None:
    inputs, _ = make_inputs(project, n=240)
    explore(inputs, ExploreOptions(clusters=2, movie_pcs=0))
    star = "DynaMight/job001/subsets/half1_cluster01.star"
    out = subprocess.run(["relion_reconstruct", "--i", star, "--o", "rec.mrc"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    rec = mrcfile.read(project / "rec.mrc")
    truth = mrcfile.read(project / "consensus.mrc")
    cc = np.corrcoef(rec.ravel(), truth.ravel())[0, 1]
    assert rec.shape == truth.shape and cc > 0.9, cc
