"""Images from MRC stacks: names, modes, path resolution, preload, LRU, and bad input."""

from __future__ import annotations

import pickle
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from particle_files import make_project, rewrite_star, write_mode_stack
from relion_dynamight.errors import InputError
from relion_dynamight.relion import stacks
from relion_dynamight.relion.mrc import write_stack
from relion_dynamight.relion.stacks import ImageSource, parse_image_name
from relion_dynamight.relion.star import load_particles


def source(p, **kw) -> ImageSource:
    return ImageSource(load_particles(p.star), **kw)


def test_parse_image_name() -> None:
    assert parse_image_name("000012@Extract/job007/a.mrcs") == (11, "Extract/job007/a.mrcs")
    assert parse_image_name("12@a.mrcs") == (11, "a.mrcs")
    assert parse_image_name("1@/abs/x.mrcs") == (0, "/abs/x.mrcs")
    assert parse_image_name("Particles/p1.mrc") == (0, "Particles/p1.mrc")
    for bad in ("0@a.mrcs", "x@a.mrcs", "-1@a.mrcs", "3@", ""):
        with pytest.raises(InputError):
            parse_image_name(bad)


@pytest.mark.parametrize("kind", ["float32", "float16", "int16", "int8", "uint16", "unpadded", "plain"])
def test_read_matches_written(tmp_path: Path, kind: str) -> None:
    dtype = {"int16": np.int16, "int8": np.int8, "uint16": np.uint16}.get(kind)
    p = make_project(tmp_path, n=24, n_stacks=3, float16=kind == "float16", dtype=dtype,
                     padded=kind != "unpadded", plain=kind == "plain")
    src = source(p, project_dir=tmp_path)
    assert len(src) == 24 and src.image_size == 32
    idx = [5, 0, 23, 5, 17, 8]
    out = src.read(idx)
    assert out.dtype == np.float32 and out.shape == (6, 32, 32)
    np.testing.assert_array_equal(out, p.images[idx])
    assert src.read([]).shape == (0, 32, 32)


def test_path_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Project dir (default cwd) first, then the STAR file's directory, then its parents."""
    p = make_project(tmp_path / "proj", n=8, star_rel="Import/job001/sub/particles.star")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    np.testing.assert_array_equal(source(p).read(range(8)), p.images)  # found via the STAR file's parents
    src = source(p)
    assert src._paths[0] == tmp_path / "proj" / "Extract/job001/Movies/mic000.mrcs"

    # a copy with other pixels relative to the STAR directory wins over the parents ...
    star_dir = p.star.parent
    shadow = -p.images[:4]
    write_stack(star_dir / "Extract/job001/Movies/mic000.mrcs", shadow, 1.0)
    np.testing.assert_array_equal(source(p).read(range(4)), shadow)
    # ... and the project directory (explicit, or the working directory) wins over both
    np.testing.assert_array_equal(source(p, project_dir=tmp_path / "proj").read(range(4)), p.images[:4])
    monkeypatch.chdir(tmp_path / "proj")
    np.testing.assert_array_equal(source(p).read(range(4)), p.images[:4])


def test_preload_equals_lazy_and_float16_stays_float16(tmp_path: Path) -> None:
    p = make_project(tmp_path, n=30, float16=True)
    lazy = source(p, project_dir=tmp_path)
    pre = source(p, project_dir=tmp_path, preload=True)
    assert pre.preloaded and not lazy.preloaded
    assert pre._cache.dtype == np.float16 and pre.estimate_bytes() == 30 * 32 * 32 * 2
    idx = np.array([3, 29, 0, 3])
    a, b = lazy.read(idx), pre.read(idx)
    assert b.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    p32 = make_project(tmp_path / "f32", n=10)
    src = source(p32, project_dir=tmp_path / "f32", preload=True)
    assert src._cache.dtype == np.float32 and src.estimate_bytes() == 10 * 32 * 32 * 4
    np.testing.assert_array_equal(src.read(range(10)), p32.images)


def test_preload_refused_when_memory_is_short(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = make_project(tmp_path, n=10)
    assert stacks.available_memory_bytes() > 0  # /proc/meminfo is read on Linux
    monkeypatch.setattr(stacks, "available_memory_bytes", lambda: 20_000)
    with pytest.raises(InputError, match=r"preloading 10 images .* needs 0.0 GiB .*run without preloading"):
        source(p, project_dir=tmp_path, preload=True)
    source(p, project_dir=tmp_path, preload=False)  # lazy reading needs no such memory


def test_lru_bounds_open_files_and_pickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stacks, "MAX_OPEN_STACKS", 2)
    p = make_project(tmp_path, n=25, n_stacks=5)
    src = source(p, project_dir=tmp_path)
    for i in [0, 24, 6, 12, 18, 1, 24]:
        np.testing.assert_array_equal(src.read([i])[0], p.images[i])
        assert len(src._open) <= 2
    np.testing.assert_array_equal(src.read(np.arange(25)[::-1]), p.images[::-1])
    clone = pickle.loads(pickle.dumps(src))
    assert len(clone._open) == 0
    np.testing.assert_array_equal(clone.read([7, 3]), p.images[[7, 3]])
    src.close()
    assert len(src._open) == 0


# -- bad input -------------------------------------------------------------------------------------
def test_missing_stack_names_image_and_tried_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = make_project(tmp_path, n=10)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Extract/job001/Movies/mic001.mrcs").unlink()
    with pytest.raises(InputError) as err:
        source(p)
    msg = str(err.value)
    assert "run_data.star" in msg and "000001@Extract/job001/Movies/mic001.mrcs not found" in msg
    assert f"tried {tmp_path}/Extract/job001/Movies/mic001.mrcs, {tmp_path}/Refine3D/job002/Extract" in msg
    assert "\n" not in msg


def test_index_beyond_stack(tmp_path: Path) -> None:
    p = make_project(tmp_path, n=10)
    parts = p.particles.copy()
    parts.loc[7, "rlnImageName"] = "000009@Extract/job001/Movies/mic001.mrcs"  # the stack holds 5
    rewrite_star(p.star, parts, p.optics)
    with pytest.raises(InputError, match=r"run_data.star: particle 000009@Extract/job001/Movies/mic001.mrcs asks "
                                         r"for image 9 but .*mic001.mrcs holds 5 images"):
        source(p, project_dir=tmp_path)


def test_size_differs_from_optics_table(tmp_path: Path) -> None:
    p = make_project(tmp_path, n=10)
    optics = p.optics.copy()
    optics["rlnImageSize"] = 64
    rewrite_star(p.star, p.particles, optics)
    with pytest.raises(InputError, match=r"mic000.mrcs: images are 32x32 pixels but .*run_data.star says 64"):
        source(p, project_dir=tmp_path)


def test_size_differs_between_stacks_relion30(tmp_path: Path) -> None:
    p = make_project(tmp_path, n=10, version="3.0")
    write_stack(tmp_path / "Extract/job001/Movies/mic001.mrcs", np.zeros((5, 40, 40), np.float32), 1.0)
    with pytest.raises(InputError, match=r"mic001.mrcs: images are 40x40 pixels but .* says 32"):
        source(p, project_dir=tmp_path)


def test_size_set_by_first_particle_relion30(tmp_path: Path) -> None:
    p = make_project(tmp_path, n=10, version="3.0")
    write_stack(tmp_path / "Extract/job001/Movies/mic000.mrcs", np.zeros((5, 40, 40), np.float32), 1.0)
    with pytest.raises(InputError, match=r"mic001.mrcs: images are 32x32 pixels but .* says 40"):
        source(p, project_dir=tmp_path)


def test_non_square_images(tmp_path: Path) -> None:
    p = make_project(tmp_path, n=10)
    write_stack(tmp_path / "Extract/job001/Movies/mic001.mrcs", np.zeros((5, 32, 30), np.float32), 1.0)
    with pytest.raises(InputError, match=r"mic001.mrcs: images are 30x32 pixels, not square"):
        source(p, project_dir=tmp_path)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # mrcfile's header statistics of the bad stack
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_pixels_name_the_image(tmp_path: Path, bad: float) -> None:
    p = make_project(tmp_path, n=10)
    imgs = p.images[5:].copy()
    imgs[2, 10, 11] = bad
    write_stack(tmp_path / "Extract/job001/Movies/mic001.mrcs", imgs, 1.0)
    src = source(p, project_dir=tmp_path)
    src.read([0, 1, 5, 6])  # clean images still read
    with pytest.raises(InputError, match=r"run_data.star: image 000003@Extract/job001/Movies/mic001.mrcs "
                                         r"contains NaN or Inf"):
        src.read([0, 7, 9])
    with pytest.raises(InputError, match="000003@Extract/job001/Movies/mic001.mrcs contains NaN"):
        source(p, project_dir=tmp_path, preload=True)


def test_plain_name_on_multi_image_stack_and_bad_files(tmp_path: Path) -> None:
    p = make_project(tmp_path, n=10)
    parts = p.particles.copy()
    parts.loc[0, "rlnImageName"] = "Extract/job001/Movies/mic000.mrcs"
    rewrite_star(p.star, parts, p.optics)
    with pytest.raises(InputError, match=r"has no N@ index but .*mic000.mrcs holds 5 images"):
        source(p, project_dir=tmp_path)
    rewrite_star(p.star, p.particles, p.optics)
    stack = tmp_path / "Extract/job001/Movies/mic001.mrcs"
    stack.write_bytes(stack.read_bytes()[:3000])  # truncated
    with pytest.raises(InputError, match=r"mic001.mrcs: MRC file is truncated .*000001@Extract/job001/Movies/mic001"):
        source(p, project_dir=tmp_path)
    stack.write_bytes(b"not an mrc file at all" * 10)
    with pytest.raises(InputError, match=r"mic001.mrcs: not a readable MRC file"):
        source(p, project_dir=tmp_path)


def test_bad_image_name_names_star_row(tmp_path: Path) -> None:
    p = make_project(tmp_path, n=10)
    parts = p.particles.copy()
    parts.loc[3, "rlnImageName"] = "0@Extract/job001/Movies/mic000.mrcs"
    rewrite_star(p.star, parts, p.optics)
    with pytest.raises(InputError, match=r"run_data.star: particle row 4: _rlnImageName '0@Extract/job001/Movies/"
                                         r"mic000.mrcs': expected N@stack.mrcs with N >= 1"):
        source(p, project_dir=tmp_path)


def test_unsupported_mode(tmp_path: Path) -> None:
    p = make_project(tmp_path, n=10)
    write_mode_stack(tmp_path / "Extract/job001/Movies/mic001.mrcs", np.zeros((5, 32, 32), np.complex64),
                     np.complex64)
    with pytest.raises(InputError, match=r"MRC mode 4 is not supported"):
        source(p, project_dir=tmp_path)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_header_only_scan_is_cheap(tmp_path: Path) -> None:
    """Construction reads headers, not pixels: a stack whose pixels are garbage still opens."""
    p = make_project(tmp_path, n=10)
    with mrcfile.open(tmp_path / "Extract/job001/Movies/mic001.mrcs", mode="r+") as mrc:
        mrc.data[:] = np.nan
    src = source(p, project_dir=tmp_path)
    np.testing.assert_array_equal(src.read([0, 4]), p.images[[0, 4]])
