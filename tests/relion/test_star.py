"""Particle STAR files: RELION 3.0 / 3.1 reading, derived arrays, writing, and bad input."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from particle_files import make_project, rewrite_star
from relion_dynamight.errors import InputError
from relion_dynamight.relion.stacks import ImageSource
from relion_dynamight.relion.star import load_particles, read_star, write_particles


# -- read_star ---------------------------------------------------------------------------------------
def test_read_star_missing_empty_garbage(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nope.star: STAR file not found"):
        read_star(tmp_path / "nope.star")
    with pytest.raises(InputError, match="not a file"):
        read_star(tmp_path)
    (tmp_path / "empty.star").write_text("")
    with pytest.raises(InputError, match="empty.star: STAR file is empty"):
        read_star(tmp_path / "empty.star")
    (tmp_path / "junk.star").write_text("this is not\na STAR file\n")
    with pytest.raises(InputError, match="junk.star: no data_ blocks"):
        read_star(tmp_path / "junk.star")
    (tmp_path / "ragged.star").write_text("data_particles\nloop_\n_rlnImageName #1\n_rlnAngleRot #2\n"
                                          "1@a.mrcs 10\n2@a.mrcs 1 2 3\n")
    with pytest.raises(InputError, match="ragged.star: STAR file is unreadable"):
        read_star(tmp_path / "ragged.star")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read files without read permission")
def test_read_star_unreadable_permissions(tmp_path: Path) -> None:
    f = tmp_path / "locked.star"
    f.write_text("data_\nloop_\n_rlnImageName #1\n1@a.mrcs\n")
    f.chmod(0)
    with pytest.raises(InputError, match="locked.star: STAR file is unreadable"):
        read_star(f)


def test_read_star_always_dict_and_key_value_blocks(tmp_path: Path) -> None:
    f = tmp_path / "kv.star"
    f.write_text("data_general\n\n_rlnFoo 3\n_rlnBar abc\n\ndata_\nloop_\n_rlnImageName #1\n1@a.mrcs\n")
    blocks = read_star(f)
    assert set(blocks) == {"general", ""}
    assert all(isinstance(b, pd.DataFrame) for b in blocks.values())
    assert blocks["general"].loc[0, "rlnBar"] == "abc" and blocks[""].loc[0, "rlnImageName"] == "1@a.mrcs"


# -- RELION 3.1 ------------------------------------------------------------------------------------
def test_relion31_two_optics_groups(tmp_path: Path) -> None:
    p = make_project(tmp_path, n=40, pixel_sizes=(1.1, 1.7))
    t = load_particles(p.star)
    assert t.version == "3.1" and len(t) == 40 and t.optics_image_size() == 32
    assert list(t.particles.columns) == list(p.particles.columns)
    assert t.particles["rlnMicrographName"].tolist() == p.particles["rlnMicrographName"].tolist()  # '000' kept
    groups = 1 + np.arange(40) % 2
    pix = np.where(groups == 1, 1.1, 1.7)
    np.testing.assert_allclose(t.pixel_sizes, pix)
    expected = np.stack([p.particles["rlnOriginXAngst"], p.particles["rlnOriginYAngst"]], 1) / pix[:, None]
    np.testing.assert_allclose(t.origins_px, expected, atol=1e-6)
    np.testing.assert_allclose(t.angles_deg, p.particles[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]],
                               atol=1e-6)
    np.testing.assert_array_equal(t.random_subset, 1 + (np.arange(40) // 3) % 2)
    assert t.image_names == p.particles["rlnImageName"].tolist()

    ctf = t.ctf_params()
    np.testing.assert_allclose(ctf.voltage.numpy(), np.where(groups == 1, 300.0, 200.0))
    np.testing.assert_allclose(ctf.cs.numpy(), np.where(groups == 1, 2.7, 2.0), rtol=1e-6)
    np.testing.assert_allclose(ctf.amplitude_contrast.numpy(), np.where(groups == 1, 0.1, 0.07), rtol=1e-6)
    np.testing.assert_allclose(ctf.pixel_size.numpy(), pix, rtol=1e-6)
    for field, col in (("defocus_u", "rlnDefocusU"), ("defocus_v", "rlnDefocusV"), ("defocus_angle",
                       "rlnDefocusAngle"), ("phase_shift", "rlnPhaseShift"), ("bfactor", "rlnCtfBfactor"),
                       ("scale", "rlnCtfScalefactor")):
        np.testing.assert_allclose(getattr(ctf, field).numpy(), p.particles[col], rtol=1e-6, atol=1e-5)
        assert getattr(ctf, field).dtype.is_floating_point and getattr(ctf, field).dtype.itemsize == 4
    sub = t.ctf_params([5, 2])
    np.testing.assert_allclose(sub.voltage.numpy(), [200.0, 300.0])
    np.testing.assert_allclose(sub.defocus_u.numpy(), p.particles["rlnDefocusU"].to_numpy()[[5, 2]], rtol=1e-6)
    assert not t.ctf_premultiplied.any()


def test_ctf_defaults_and_premultiplied_per_group(tmp_path: Path) -> None:
    p = make_project(tmp_path, n=10)
    parts = p.particles.drop(columns=["rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift", "rlnCtfBfactor",
                                      "rlnCtfScalefactor"])
    optics = p.optics.drop(columns=["rlnSphericalAberration", "rlnAmplitudeContrast"])
    optics["rlnCtfDataAreCtfPremultiplied"] = [0, 1]
    rewrite_star(p.star, parts, optics)
    t = load_particles(p.star)
    ctf = t.ctf_params()
    np.testing.assert_allclose(ctf.defocus_v.numpy(), ctf.defocus_u.numpy())
    for field, value in (("cs", 0), ("amplitude_contrast", 0), ("bfactor", 0), ("scale", 1), ("phase_shift", 0),
                         ("defocus_angle", 0)):
        assert (getattr(ctf, field) == value).all(), field
    np.testing.assert_array_equal(t.ctf_premultiplied, np.arange(10) % 2 == 1)


def test_particle_value_overrides_optics_value(tmp_path: Path) -> None:
    p = make_project(tmp_path, n=6)
    parts = p.particles.copy()
    parts["rlnSphericalAberration"] = 0.01 * np.arange(6)
    rewrite_star(p.star, parts, p.optics)
    np.testing.assert_allclose(load_particles(p.star).ctf_params().cs.numpy(), 0.01 * np.arange(6), atol=1e-7)


def test_missing_voltage_is_clear_error_at_ctf(tmp_path: Path) -> None:
    p = make_project(tmp_path, n=6)
    rewrite_star(p.star, p.particles, p.optics.drop(columns=["rlnVoltage"]))
    t = load_particles(p.star)
    with pytest.raises(InputError, match=r"run_data.star: column _rlnVoltage is missing"):
        t.ctf_params()


# -- RELION 3.0 ------------------------------------------------------------------------------------
def test_relion30_file(tmp_path: Path) -> None:
    p = make_project(tmp_path, n=20, version="3.0", pixel_sizes=(1.3,))
    t = load_particles(p.star)
    assert t.version == "3.0" and t.optics is None and len(t) == 20
    np.testing.assert_allclose(t.pixel_sizes, 1.3)  # rlnDetectorPixelSize 1.3 µm × 1e4 / 10000
    np.testing.assert_allclose(t.origins_px, p.particles[["rlnOriginX", "rlnOriginY"]], atol=1e-6)  # pixels
    np.testing.assert_allclose(t.ctf_params().voltage.numpy(), 300.0)
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert ImageSource(t).image_size == 32  # from the first image (no optics table): images are stacks.py's
    finally:
        os.chdir(cwd)


def test_relion30_pixel_size_sources(tmp_path: Path) -> None:
    p = make_project(tmp_path, n=6, version="3.0", pixel_sizes=(1.3,))
    parts = p.particles.drop(columns=["rlnDetectorPixelSize", "rlnMagnification"])
    rewrite_star(p.star, parts, None)
    with pytest.raises(InputError, match=r"run_data.star: no pixel size.*_rlnImagePixelSize"):
        load_particles(p.star)
    np.testing.assert_allclose(load_particles(p.star, pixel_size=0.9).pixel_sizes, 0.9)
    parts["rlnImagePixelSize"] = 2.2
    rewrite_star(p.star, parts, None)
    np.testing.assert_allclose(load_particles(p.star).pixel_sizes, 2.2)


# -- bad input -------------------------------------------------------------------------------------
def test_optics_without_particles_table(tmp_path: Path) -> None:
    p = make_project(tmp_path, n=4)
    starfile.write({"optics": p.optics}, p.star)
    with pytest.raises(InputError, match=r"run_data.star: has data_optics but no data_particles"):
        load_particles(p.star)
    starfile.write({"model_general": pd.DataFrame({"rlnCurrentResolution": [4.0]})}, p.star)
    with pytest.raises(InputError, match=r"run_data.star: no data_particles table"):
        load_particles(p.star)


@pytest.mark.parametrize("column", ["rlnImageName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnDefocusU"])
def test_missing_required_column(tmp_path: Path, column: str) -> None:
    p = make_project(tmp_path, n=4)
    rewrite_star(p.star, p.particles.drop(columns=[column]), p.optics)
    with pytest.raises(InputError, match=rf"run_data.star: required column _{column} is missing"):
        load_particles(p.star)


def test_missing_pixel_size_in_optics(tmp_path: Path) -> None:
    p = make_project(tmp_path, n=4)
    rewrite_star(p.star, p.particles, p.optics.drop(columns=["rlnImagePixelSize"]))
    with pytest.raises(InputError, match=r"run_data.star: no pixel size: the optics table lacks _rlnImagePixel"):
        load_particles(p.star)


def test_non_numeric_angle_and_unknown_group(tmp_path: Path) -> None:
    p = make_project(tmp_path, n=4)
    parts = p.particles.copy()
    parts["rlnAngleTilt"] = parts["rlnAngleTilt"].astype(object)
    parts.loc[2, "rlnAngleTilt"] = "abc"
    rewrite_star(p.star, parts, p.optics)
    with pytest.raises(InputError, match=r"_rlnAngleTilt is .* for particle 3 .*not a finite number"):
        load_particles(p.star)
    parts = p.particles.copy()
    parts.loc[1, "rlnOpticsGroup"] = 7
    rewrite_star(p.star, parts, p.optics)
    with pytest.raises(InputError, match=r"run_data.star: particles use optics group 7 which data_optics does not"):
        load_particles(p.star)


def test_non_numeric_optics_value(tmp_path: Path) -> None:
    p = make_project(tmp_path, n=4)
    optics = p.optics.copy()
    optics["rlnVoltage"] = ["300", "x3"]
    rewrite_star(p.star, p.particles, optics)
    with pytest.raises(InputError, match=r"run_data.star: column _rlnVoltage has the non-numeric value 'x3' in row 2"):
        load_particles(p.star).ctf_params()


def test_different_image_sizes_across_groups(tmp_path: Path) -> None:
    p = make_project(tmp_path, n=4)
    optics = p.optics.copy()
    optics["rlnImageSize"] = [32, 64]
    rewrite_star(p.star, p.particles, optics)
    with pytest.raises(InputError, match=r"optics groups have different image sizes \[32, 64\]"):
        load_particles(p.star)


def test_bad_random_subset(tmp_path: Path) -> None:
    p = make_project(tmp_path, n=6)
    parts = p.particles.copy()
    parts.loc[4, "rlnRandomSubset"] = 3
    rewrite_star(p.star, parts, p.optics)
    with pytest.raises(InputError, match=r"run_data.star: _rlnRandomSubset must be 1 or 2, found 3 for particle 5 "):
        load_particles(p.star)


def test_empty_particle_table(tmp_path: Path) -> None:
    p = make_project(tmp_path, n=4)
    rewrite_star(p.star, p.particles.iloc[:0], p.optics)
    with pytest.raises(InputError, match=r"run_data.star: the particle table is empty"):
        load_particles(p.star)


# -- writing ---------------------------------------------------------------------------------------
def test_write_round_trip_keeps_everything(tmp_path: Path) -> None:
    p = make_project(tmp_path, n=30)
    t = load_particles(p.star)
    out = write_particles(t, tmp_path / "out" / "all.star")
    text = out.read_text()
    assert text.lstrip().startswith("# version 30001")
    back = load_particles(out)
    pd.testing.assert_frame_equal(back.particles, t.particles)
    pd.testing.assert_frame_equal(back.optics, t.optics)

    rows = np.array([7, 2, 29, 3])
    extra = {"rlnClassNumber": np.array([1, 2, 3, 4]), "rlnDynaMightLatent": np.arange(30) * 0.5}
    sub = load_particles(write_particles(t, tmp_path / "sub.star", rows=rows, extra_columns=extra))
    assert list(sub.particles.columns) == list(t.particles.columns) + list(extra)
    pd.testing.assert_frame_equal(sub.particles[t.particles.columns],
                                  t.particles.iloc[rows].reset_index(drop=True))
    np.testing.assert_array_equal(sub.particles["rlnClassNumber"], [1, 2, 3, 4])
    np.testing.assert_allclose(sub.particles["rlnDynaMightLatent"], rows * 0.5)
    pd.testing.assert_frame_equal(sub.optics, t.optics)
    assert not [f for f in tmp_path.rglob("*.tmp")]


def test_write_relion30_keeps_format(tmp_path: Path) -> None:
    p = make_project(tmp_path, n=8, version="3.0")
    t = load_particles(p.star)
    out = write_particles(t, tmp_path / "w.star", rows=[1, 3])
    assert "# version" not in out.read_text()  # RELION 3.1 would misread a 3.0 table with a version line
    back = load_particles(out)
    assert back.version == "3.0" and back.optics is None
    pd.testing.assert_frame_equal(back.particles, t.particles.iloc[[1, 3]].reset_index(drop=True))


def test_write_refuses_to_overwrite_input(tmp_path: Path) -> None:
    p = make_project(tmp_path, n=5)
    t = load_particles(p.star)
    before = p.star.read_bytes()
    for target in (p.star, tmp_path / "Refine3D" / "job002" / ".." / "job002" / "run_data.star"):
        with pytest.raises(InputError, match="would overwrite the input STAR file"):
            write_particles(t, target, rows=[0])
    assert p.star.read_bytes() == before
    with pytest.raises(InputError, match="output is a directory"):
        write_particles(t, tmp_path)


@pytest.mark.parametrize("version", ["3.1", "3.0"])
def test_relion_reconstruct_reads_written_subset(tmp_path: Path, relion: None, version: str) -> None:
    """A half-set subset written by us reconstructs exactly like ``relion_reconstruct --subset 1``."""
    p = make_project(tmp_path, n=60, box=32, version=version, pixel_sizes=(1.5,) if version == "3.0" else (1.5, 1.5))
    t = load_particles(p.star)
    assert t.version == version
    rows = np.flatnonzero(t.random_subset == 1)
    out = write_particles(t, tmp_path / "half1.star", rows=rows,
                          extra_columns={"rlnClassNumber": np.ones(rows.size, dtype=int),
                                         "dmLatent1": np.linspace(-1, 1, rows.size)})  # unknown label: kept

    def reconstruct(star: Path, name: str, *extra: str) -> np.ndarray:
        cmd = ["relion_reconstruct", "--i", str(star.relative_to(tmp_path)), "--o", name, "--ctf", *extra]
        res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        with mrcfile.open(tmp_path / name) as mrc:
            return mrc.data.copy()

    ref = reconstruct(p.star, "ref.mrc", "--subset", "1")
    ours = reconstruct(out, "ours.mrc")
    assert np.abs(ref).max() > 0
    np.testing.assert_array_equal(ours, ref)  # lossless values: bit-identical reconstruction
