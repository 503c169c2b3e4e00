"""The catalogue of bad inputs (issue 7, item 1) used by ``test_bad_inputs.py``.

Every :class:`Case` edits a private copy of a tiny simulated RELION project (``base='project'``) or of
that project with a trained DynaMight job (``base='trained'``, forward training only) and returns the
command line to run there.  A bad case must fail with a one-line ``ERROR:`` naming the problem (every
string of ``expect`` appears in that line, case-insensitively); a valid variant (``ok=True``) must
succeed.  The test adds ``--pipeline-control JOB`` where the command accepts it.

Layout of the copies (paths relative to the project directory, which is the working directory)::

    Refine3D/job001/run_data.star, run_class001.mrc     refinement: 120 particles, box 24, 3 Å/px
    Extract/job001/Movies/mic00{1..4}.mrcs             stacks: optics group 1 float32, group 2 float16
    DynaMight/job002/                                   (trained) forward_deformations/ of 1 epoch
"""

from __future__ import annotations

import os
import pickle
import re
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import mrcfile
import numpy as np
import pandas as pd
import starfile

STAR = "Refine3D/job001/run_data.star"
MAP = "Refine3D/job001/run_class001.mrc"
STACK_F32 = "Extract/job001/Movies/mic001.mrcs"   # optics group 1: float32 (mode 2)
STACK_F16 = "Extract/job001/Movies/mic002.mrcs"   # optics group 2: float16 (mode 12)
JOB = "Bad/job099"                                 # job directory of cases that make a new job
TRAINED = "DynaMight/job002"
FORWARD_CKPT = f"{TRAINED}/forward_deformations/checkpoints/checkpoint_final.h5"
LATENTS = f"{TRAINED}/forward_deformations/latent_space.star"
PWNED = "PWNED_BY_PICKLE"                          # created only if a pickle were ever unpickled
BOX = 24


@dataclass(frozen=True)
class Case:
    id: str
    prepare: Callable[[Path], list[str]]   # edits the copy in place, returns relion_dynamight's arguments
    expect: tuple[str, ...] = ()            # substrings of the ERROR line (case-insensitive)
    base: str = "project"                   # "project" or "trained"
    ok: bool = False                        # a valid variant that must succeed
    job: str | None = JOB                   # job directory for exit files (None: the command has none)
    control: bool = True                    # append --pipeline-control JOB
    preexec: Callable[[], None] | None = None   # run in the child before exec (resource limits)


# -- command lines --------------------------------------------------------------------------------------
def reconstruct(star: str = STAR, out: str = f"{JOB}/map.mrc", *extra: str) -> list[str]:
    return ["reconstruct", "--i", star, "--o", out, *extra]


def _with_defaults(defaults: dict[str, str], extra: tuple[str, ...]) -> list[str]:
    """``extra`` plus the ``defaults`` it does not set (a repeated option keeps its first value, as RELION's tab
    fields do, so a case's own value must not follow a default)."""
    return [*(x for k, v in defaults.items() if k not in extra for x in (k, v)), *extra]


def train(star: str = STAR, model: str = MAP, out: str = JOB, *extra: str) -> list[str]:
    return ["optimize-deformations", "--refinement-star-file", star, "--initial-model", model,
            "--output-directory", out, *_with_defaults({"--n-gaussians": "100", "--n-epochs": "1"}, extra)]


def inverse(*extra: str) -> list[str]:
    return ["optimize-inverse-deformations", TRAINED, *_with_defaults({"--n-epochs": "1"}, extra)]


def backproject(*extra: str) -> list[str]:
    return ["deformable-backprojection", TRAINED, *extra]


def explore(*extra: str) -> list[str]:
    return ["explore-latent-space", TRAINED, "--no-gui", "--movie-pcs", "0", *extra]


# -- file edits -----------------------------------------------------------------------------------------
def text(root: Path, rel: str = STAR) -> str:
    return (root / rel).read_text()


def put(root: Path, text_: str | bytes, rel: str = STAR) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text_.encode() if isinstance(text_, str) else text_)


def edit_tables(root: Path, change: Callable[[pd.DataFrame, pd.DataFrame], None], rel: str = STAR,
                version: str = "# version 30001") -> None:
    """Load the particle STAR file (names as strings), let ``change(optics, particles)`` edit it, write it."""
    blocks = starfile.read(root / STAR, always_dict=True, parse_as_string=["rlnImageName", "rlnMicrographName"])
    optics, particles = blocks["optics"], blocks["particles"]
    change(optics, particles)
    write_tables(root / rel, {"optics": optics, "particles": particles}, version)


def write_tables(path: Path, blocks: dict[str, pd.DataFrame], version: str | None) -> None:
    tmp = path.with_name(".tmp_" + path.name)
    starfile.write(blocks, tmp, overwrite=True)
    body = "\n".join(line for line in tmp.read_text().splitlines() if not line.startswith("# Created by"))
    tmp.unlink()
    path.write_text((f"\n{version}\n\n" if version else "\n") + body.strip() + "\n\n")


def set_cell(root: Path, column: str, row: int, value: object, block: str = "particles") -> None:
    def change(optics: pd.DataFrame, particles: pd.DataFrame) -> None:
        frame = optics if block == "optics" else particles
        frame[column] = frame[column].astype(object)
        frame.loc[row, column] = value
    edit_tables(root, change)


def drop_column(root: Path, column: str, block: str = "particles") -> None:
    edit_tables(root, lambda o, p: (o if block == "optics" else p).drop(columns=[column], inplace=True))


def set_column(root: Path, column: str, values: object, block: str = "particles") -> None:
    def change(optics: pd.DataFrame, particles: pd.DataFrame) -> None:
        (optics if block == "optics" else particles)[column] = values
    edit_tables(root, change)


def patch_bytes(root: Path, rel: str, offset: int, data: bytes) -> None:
    with open(root / rel, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def set_pixel(root: Path, rel: str, image: int, value: float) -> None:
    """Set pixel (12, 12) of image ``image`` (0-based) of a stack, keeping its mode."""
    with mrcfile.open(root / rel, mode="r+") as mrc:
        data = np.array(mrc.data)
        data[image, 12, 12] = value
        mrc.set_data(data)


def truncate(root: Path, rel: str, keep: int) -> None:
    with open(root / rel, "r+b") as fh:
        fh.truncate(keep)


def relion30(root: Path, rel: str = STAR) -> None:
    """Rewrite the particle file as RELION 3.0 does: one table, per-row optics, origins in pixels."""
    blocks = starfile.read(root / STAR, always_dict=True, parse_as_string=["rlnImageName", "rlnMicrographName"])
    optics = blocks["optics"].set_index("rlnOpticsGroup")
    p = blocks["particles"].copy()
    group = p["rlnOpticsGroup"].to_numpy()
    for col in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"):
        p[col] = optics.loc[group, col].to_numpy()
    pixel = optics.loc[group, "rlnImagePixelSize"].to_numpy()
    p["rlnDetectorPixelSize"] = pixel
    p["rlnMagnification"] = 10000.0
    p["rlnOriginX"] = p.pop("rlnOriginXAngst") / pixel
    p["rlnOriginY"] = p.pop("rlnOriginYAngst") / pixel
    p = p.drop(columns=["rlnOpticsGroup"])
    write_tables(root / rel, {"": p}, None)


def small_map(root: Path, rel: str, box: int, pixel: float = 3.0, value: float | None = None,
              shape: tuple[int, ...] | None = None) -> None:
    data = np.zeros(shape or (box, box, box), dtype=np.float32)
    data[tuple(s // 2 for s in data.shape)] = 1.0
    if value is not None:
        data.flat[7] = value
    with mrcfile.new(root / rel, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = pixel


def foreign_hdf5(path: Path) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset("weights", data=np.arange(10.0))
        f.attrs["format"] = "somebody.else.v3"


class _Pwn:
    """Unpickling this object would create the file PWNED in the working directory."""

    def __reduce__(self):  # noqa: ANN204
        return (open, (PWNED, "w"))


def pickle_file(path: Path) -> None:
    path.write_bytes(pickle.dumps({"state_dict": _Pwn()}))


def other_particle_set(root: Path, rel: str = "Other/sub.star") -> str:
    """The same project's particles without the last 10: another particle set with valid images."""
    blocks = starfile.read(root / STAR, always_dict=True, parse_as_string=["rlnImageName", "rlnMicrographName"])
    blocks["particles"] = blocks["particles"].iloc[:-10]
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    write_tables(root / rel, blocks, "# version 30001")
    return rel


def limit_file_size() -> None:
    """preexec_fn: files may not grow beyond 4 kB (a full disk for every output larger than that)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def _all(root: Path, prepare: Callable[[Path], object], argv: list[str]) -> list[str]:
    prepare(root)
    return argv


def case(id_: str, prepare: Callable[[Path], object], argv: list[str], *expect: str, **kw: object) -> Case:
    return Case(id_, lambda root, p=prepare, a=argv: _all(root, p, list(a)), tuple(expect), **kw)  # type: ignore[arg-type]


def nothing(root: Path) -> None:
    return None


# -- the catalogue --------------------------------------------------------------------------------------
def _lines_with_comment_in_header(root: Path) -> None:
    lines = text(root).splitlines()
    i = lines.index("data_particles")
    rows = max(k for k, line in enumerate(lines) if line.startswith("_rln")) + 10
    put(root, "\n".join(["# written by hand", *lines[:i + 3], "# the columns:", *lines[i + 3:rows], "# between rows",
                         *lines[rows:], "# the end"]) + "\n")


def _duplicate_label(root: Path) -> None:
    put(root, text(root).replace("_rlnDefocusAngle #13", "_rlnAngleRot #13"))


def _quoted(root: Path) -> None:
    t = text(root).replace("MotionCorr/job001/Movies/mic001.mrc", '"MotionCorr/job001/Movies/mic 001.mrc"')
    put(root, t.replace("opticsGroup1", "'optics group 1'"))


def _relion4(root: Path) -> None:
    def change(optics: pd.DataFrame, particles: pd.DataFrame) -> None:
        optics["rlnCtfDataAreCtfPremultiplied"] = 0
        optics["rlnBeamTiltX"] = 0.0
        optics["rlnBeamTiltY"] = 0.0
        # unpadded image numbers occur in files written by other programs
        particles["rlnImageName"] = [f"{int(n.split('@')[0])}@{n.split('@')[1]}" for n in particles["rlnImageName"]]
    edit_tables(root, change)


def _relion5(root: Path) -> None:
    def change(optics: pd.DataFrame, particles: pd.DataFrame) -> None:
        optics["rlnCtfDataAreCtfPremultiplied"] = 0
        particles["rlnLogLikeliContribution"] = 1.0e5
        particles["rlnMaxValueProbDistribution"] = 0.9
        particles["rlnNrOfSignificantSamples"] = 3
    edit_tables(root, change, version="# version 50001")


def _spaces(root: Path) -> None:
    """Project path with spaces is the copy's own name (see the test); stacks and STAR with spaces too."""
    movies = root / "Extract/job001/Movies"
    (root / "Extract/job001/My Movies").mkdir()
    for stack in movies.iterdir():
        stack.rename(root / "Extract/job001/My Movies" / stack.name)
    movies.rmdir()
    t = re.sub(r"(\d+@)Extract/job001/Movies/(\S+\.mrcs)", r'"\1Extract/job001/My Movies/\2"', text(root))
    put(root, t, "Refine3D/job001/run data.star")
    (root / STAR).unlink()


def _halves_all_one(root: Path) -> None:
    set_column(root, "rlnRandomSubset", 1)


def _one_in_half2(root: Path) -> None:
    def change(optics: pd.DataFrame, particles: pd.DataFrame) -> None:
        particles["rlnRandomSubset"] = 1
        particles.loc[5, "rlnRandomSubset"] = 2
    edit_tables(root, change)


def _image_size_in_optics(root: Path) -> None:
    set_column(root, "rlnImageSize", 32, block="optics")


def _optics_sizes_differ(root: Path) -> None:
    def change(optics: pd.DataFrame, particles: pd.DataFrame) -> None:
        optics.loc[1, "rlnImageSize"] = 32
    edit_tables(root, change)


def _index_out_of_range(root: Path) -> None:
    def change(optics: pd.DataFrame, particles: pd.DataFrame) -> None:
        stack = particles.loc[7, "rlnImageName"].split("@")[1]
        particles.loc[7, "rlnImageName"] = f"000999@{stack}"
    edit_tables(root, change)


def _stack_mode(root: Path, mode: int) -> None:
    patch_bytes(root, STACK_F32, 12, int(mode).to_bytes(4, "little"))


def _output_dir_is_a_file(root: Path) -> None:
    (root / "Blocker").write_text("I am a file where a directory must go\n")


def _truncated_checkpoint(root: Path) -> None:
    size = (root / FORWARD_CKPT).stat().st_size
    truncate(root, FORWARD_CKPT, size // 2)


def _inverse_corrupt(root: Path) -> None:
    put(root, b"\x89HDF\r\n\x1a\n" + os.urandom(2000), f"{TRAINED}/inverse_deformations/inverse_half1.h5")
    put(root, b"\x89HDF\r\n\x1a\n" + os.urandom(2000), f"{TRAINED}/inverse_deformations/inverse_half2.h5")


def _latents_missing_column(root: Path) -> None:
    lines = text(root, LATENTS).splitlines()
    put(root, "\n".join(line.replace("_dmLatent1 ", "_dmLatentOne ") for line in lines) + "\n", LATENTS)


def _latents_nan(root: Path) -> None:
    blocks = starfile.read(root / LATENTS, always_dict=True, parse_as_string=["rlnImageName", "rlnMicrographName"])
    name = next(k for k, v in blocks.items() if "dmLatent1" in v)
    blocks[name]["dmLatent1"] = blocks[name]["dmLatent1"].astype(object)
    blocks[name].loc[3, "dmLatent1"] = "nan"
    write_tables(root / LATENTS, blocks, "# version 30001")


# -- issue 12: numbers, consistency, job directories ----------------------------------------------------
def _duplicate_across_halves(root: Path) -> None:
    def change(optics: pd.DataFrame, particles: pd.DataFrame) -> None:
        row = particles.iloc[[3]].copy()
        row["rlnRandomSubset"] = 3 - int(row["rlnRandomSubset"].iloc[0])
        particles.loc[len(particles)] = row.iloc[0]
    edit_tables(root, change)


def _pixel_sizes_differ(root: Path) -> None:
    def change(optics: pd.DataFrame, particles: pd.DataFrame) -> None:
        optics["rlnImagePixelSize"] = optics["rlnImagePixelSize"].astype(float)
        optics.loc[1, "rlnImagePixelSize"] = 3.3
    edit_tables(root, change)


def _origin_columns(root: Path, agree: bool) -> None:
    def change(optics: pd.DataFrame, particles: pd.DataFrame) -> None:
        particles["rlnOriginX"] = particles["rlnOriginXAngst"] / 3.0 + (0.0 if agree else 1.5)
        particles["rlnOriginY"] = particles["rlnOriginYAngst"] / 3.0
    edit_tables(root, change)


def _latin1(root: Path) -> None:
    raw = (root / STAR).read_bytes().replace(b"opticsGroup1", "opticsGroupé".encode("latin-1"))
    put(root, raw)


def _zero_map(root: Path, value: float = 0.0) -> None:
    with mrcfile.new(root / MAP, overwrite=True) as mrc:
        mrc.set_data(np.full((BOX, BOX, BOX), value, dtype=np.float32))
        mrc.voxel_size = 3.0


def _lock_of(root: Path, pid: int, job: str = JOB) -> None:
    """A lock file of ``pid`` (this test process: alive; a finished child: stale) in ``job``."""
    import json
    import socket
    import time

    try:
        ticks = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        ticks = "0"
    (root / job).mkdir(parents=True, exist_ok=True)
    (root / job / ".relion_dynamight.lock").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": pid, "ticks": ticks, "started": time.time(),
         "command": "optimize-deformations --output-directory " + job}))


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _all_checkpoints_unreadable(root: Path) -> None:
    for path in (root / TRAINED / "forward_deformations" / "checkpoints").glob("*.h5"):
        truncate(root, str(path.relative_to(root)), 200)


def catalogue() -> list[Case]:
    c: list[Case] = [
        # ---- valid variants: must WORK ----------------------------------------------------------------
        case("ok-relion30-no-optics", relion30, reconstruct(), ok=True),
        case("ok-relion4-premultiplied-flag-unpadded-names", _relion4, reconstruct(), ok=True),
        case("ok-relion5-version-50001-extra-columns", _relion5, reconstruct(), ok=True),
        case("ok-windows-line-ends", lambda r: put(r, text(r).replace("\n", "\r\n")), reconstruct(), ok=True),
        case("ok-comments-everywhere", _lines_with_comment_in_header, reconstruct(), ok=True),
        case("ok-quoted-strings", _quoted, reconstruct(), ok=True),
        case("ok-paths-with-spaces", _spaces,
             reconstruct("Refine3D/job001/run data.star", "Rec Job/job007/my map.mrc", "--halves"), ok=True,
             job="Rec Job/job007"),
        case("ok-batch-larger-than-data", nothing, reconstruct(STAR, f"{JOB}/map.mrc", "--batch-size", "100000"),
             ok=True),
        # ---- malformed STAR -------------------------------------------------------------------------
        case("star-missing-file", nothing, reconstruct("Refine3D/job001/nope.star"), "nope.star", "not found"),
        case("star-empty-file", lambda r: put(r, ""), reconstruct(), "run_data.star", "empty"),
        case("star-binary-garbage", lambda r: put(r, bytes(range(256)) * 8), reconstruct(), "run_data.star"),
        case("star-optics-only", lambda r: put(r, text(r).split("data_particles")[0]), reconstruct(),
             "run_data.star", "data_particles"),
        case("star-missing-column-angle", lambda r: drop_column(r, "rlnAngleTilt"), reconstruct(),
             "run_data.star", "rlnAngleTilt"),
        case("star-missing-pixel-size", lambda r: drop_column(r, "rlnImagePixelSize", "optics"), reconstruct(),
             "run_data.star", "pixel size"),
        case("star-text-in-angle-column", lambda r: set_cell(r, "rlnAngleTilt", 4, "ninety"), reconstruct(),
             "run_data.star", "rlnAngleTilt", "5"),
        case("star-duplicate-label", _duplicate_label, reconstruct(), "run_data.star", "rlnAngleRot", "duplicate"),
        case("star-ragged-row", lambda r: put(r, text(r).rstrip() + "\t17\t18\n"), reconstruct(), "run_data.star"),
        case("star-unknown-optics-group", lambda r: set_cell(r, "rlnOpticsGroup", 3, 7), reconstruct(),
             "run_data.star", "optics group 7"),
        case("star-random-subset-3", lambda r: set_cell(r, "rlnRandomSubset", 2, 3), reconstruct(),
             "run_data.star", "rlnRandomSubset", "3"),
        case("star-empty-particle-table",
             lambda r: edit_tables(r, lambda o, p: p.drop(index=p.index, inplace=True)), reconstruct(),
             "run_data.star", "empty"),
        # ---- images and maps ------------------------------------------------------------------------
        case("stack-missing", lambda r: (r / STACK_F16).unlink(), reconstruct(), "mic002.mrcs", "not found"),
        case("stack-truncated", lambda r: truncate(r, STACK_F32, 1024 + 3 * BOX * BOX * 4 + 17), reconstruct(),
             "mic001.mrcs", "truncated"),
        case("stack-header-only-garbage", lambda r: put(r, b"not an mrc file" * 10, STACK_F32), reconstruct(),
             "mic001.mrcs"),
        case("stack-mode-4-complex", lambda r: _stack_mode(r, 4), reconstruct(), "mic001.mrcs", "mode 4"),
        case("stack-nan-pixel", lambda r: set_pixel(r, STACK_F32, 2, float("nan")), reconstruct(),
             "mic001.mrcs", "NaN"),
        case("stack-inf-pixel-float16", lambda r: set_pixel(r, STACK_F16, 0, float("inf")), reconstruct(),
             "mic002.mrcs", "Inf"),
        case("stack-index-out-of-range", _index_out_of_range, reconstruct(), "000999@", "mic00"),
        case("optics-image-size-differs-from-stacks", _image_size_in_optics, reconstruct(), "24", "32"),
        case("map-box-differs-from-particles", lambda r: small_map(r, MAP, 32), train(), "run_class001.mrc", "32"),
        case("map-pixel-size-differs", lambda r: small_map(r, MAP, BOX, pixel=4.2), train(), "run_class001.mrc",
             "pixel size"),
        case("map-truncated", lambda r: truncate(r, MAP, 1500), train(), "run_class001.mrc"),
        case("map-nan-voxel", lambda r: small_map(r, MAP, BOX, value=float("nan")), train(), "run_class001.mrc",
             "NaN"),
        # ---- half sets --------------------------------------------------------------------------------
        case("halves-zero-particles-in-half-2", _halves_all_one, reconstruct(STAR, f"{JOB}/map.mrc", "--halves"),
             "rlnRandomSubset", "2"),
        case("halves-zero-particles-training", _halves_all_one, train(), "half set 2"),
        case("halves-one-particle-training", _one_in_half2, train(), "half"),
        # ---- absurd options ---------------------------------------------------------------------------
        case("opt-negative-epochs", nothing, train(STAR, MAP, JOB, "--n-epochs", "-3"), "--n-epochs", "-3"),
        case("opt-zero-gaussians", nothing, train(STAR, MAP, JOB, "--n-gaussians", "0"), "--n-gaussians", "0"),
        case("opt-zero-batch", nothing, train(STAR, MAP, JOB, "--batch-size", "0"), "--batch-size", "0"),
        case("opt-validation-fraction-above-one", nothing, train(STAR, MAP, JOB, "--validation-fraction", "1.5"),
             "--validation-fraction"),
        case("opt-epochs-not-a-number", nothing, train(STAR, MAP, JOB, "--n-epochs", "many"), "--n-epochs"),
        case("opt-simulate-too-few-particles", nothing, ["simulate", "--o", f"{JOB}/sim", "--n-particles", "2"],
             "--n-particles"),
        case("opt-inverse-negative-epochs", nothing, inverse("--n-epochs", "-1"), "--n-epochs", base="trained",
             job=TRAINED),
        case("opt-inverse-negative-batch", nothing, inverse("--batch-size", "-5"), "--batch-size", base="trained",
             job=TRAINED),
        case("opt-backprojection-zero-batch", nothing, backproject("--batch-size", "0"), "--batch-size",
             base="trained", job=TRAINED),
        case("opt-backprojection-negative-group-resolution", nothing, backproject("--group-resolution", "-1"),
             "--group-resolution", base="trained", job=TRAINED),
        case("opt-backprojection-negative-max-groups", nothing, backproject("--max-groups", "-3"),
             "--max-groups", base="trained", job=TRAINED),
        case("opt-explore-half-set-5", nothing, explore("--half-set", "5"), "--half-set", base="trained",
             job=TRAINED),
        case("opt-explore-clusters-more-than-particles", nothing, explore("--clusters", "5000"), "--clusters",
             base="trained", job=TRAINED),
        case("opt-explore-latent-points-garbage", lambda r: put(r, "1 2 three\n", "points.txt"),
             explore("--latent-points", "points.txt"), "points.txt", base="trained", job=TRAINED),
        # ---- checkpoints and job directories ------------------------------------------------------------
        case("ckpt-inverse-before-training", nothing, ["optimize-inverse-deformations", JOB, "--n-epochs", "1"],
             "optimize-deformations"),
        case("ckpt-backprojection-before-inverse", nothing, backproject(), "inverse", base="trained", job=TRAINED),
        case("ckpt-truncated-final", _truncated_checkpoint, inverse(), "checkpoint_final.h5", base="trained",
             job=TRAINED),
        case("ckpt-random-bytes", lambda r: put(r, os.urandom(5000), "junk.h5"), inverse("--checkpoint-file", "junk.h5"),
             "junk.h5", base="trained", job=TRAINED),
        case("ckpt-foreign-hdf5", lambda r: foreign_hdf5(r / "foreign.h5"), inverse("--checkpoint-file", "foreign.h5"),
             "foreign.h5", base="trained", job=TRAINED),
        case("ckpt-pickle-never-loaded", lambda r: pickle_file(r / "model.pt"), inverse("--checkpoint-file", "model.pt"),
             "model.pt", base="trained", job=TRAINED),
        case("ckpt-other-particle-set-resume", other_particle_set,
             train("Other/sub.star", MAP, TRAINED), "another particle set", base="trained", job=TRAINED),
        case("ckpt-inverse-files-corrupt", _inverse_corrupt, backproject(), "inverse_half", base="trained",
             job=TRAINED),
        case("ckpt-latents-missing", lambda r: (r / LATENTS).unlink(), inverse(), "latent_space.star",
             base="trained", job=TRAINED),
        case("ckpt-latents-wrong-columns", _latents_missing_column, explore(), "latent_space.star", base="trained",
             job=TRAINED),
        case("ckpt-latents-nan", _latents_nan, inverse(), "latent_space.star", base="trained", job=TRAINED),
        # ---- output locations ---------------------------------------------------------------------------
        case("out-overwrites-input-stack", nothing, reconstruct(STAR, STACK_F32), "mic001.mrcs", "overwrite"),
        case("out-directory-is-a-file-reconstruct", _output_dir_is_a_file, reconstruct(STAR, "Blocker/map.mrc"),
             "Blocker"),
        case("out-disk-full-reconstruct", nothing, reconstruct(), "map.mrc", "too large", preexec=limit_file_size),
        case("out-simulate-into-existing-project", nothing, ["simulate", "--o", "."], "already exists"),
        case("gui-install-missing-project", nothing, ["install-relion-gui", "--project", "no/such/dir"],
             "no/such/dir", job=None, control=False),
        case("external-unknown-command", nothing, ["external", "frobnicate", "--o", JOB + "/"], "frobnicate",
             control=False),
        # ---- issue 12: numbers that feed the physics, checked before any work -------------------------
        case("num-nan-origin", lambda r: set_cell(r, "rlnOriginXAngst", 3, "nan"), reconstruct(),
             "run_data.star", "rlnOriginXAngst", "nan", "particle 4"),
        case("num-nan-defocus-training", lambda r: set_cell(r, "rlnDefocusU", 7, "nan"), train(), "rlnDefocusU",
             "particle 8"),
        case("num-overflowing-defocus", lambda r: set_cell(r, "rlnDefocusV", 2, "1e30"), reconstruct(),
             "rlnDefocusV", "1e+30"),
        case("num-voltage-zero", lambda r: set_cell(r, "rlnVoltage", 0, 0.0, block="optics"), reconstruct(),
             "rlnVoltage", "optics group"),
        case("num-ctf-scale-zero", lambda r: set_cell(r, "rlnCtfScalefactor", 5, 0.0), reconstruct(),
             "rlnCtfScalefactor", "particle 6"),
        case("num-amplitude-contrast-above-one", lambda r: set_cell(r, "rlnAmplitudeContrast", 1, 7.0, block="optics"),
             reconstruct(), "rlnAmplitudeContrast"),
        case("num-inf-angle", lambda r: set_cell(r, "rlnAngleTilt", 9, "inf"), train(), "rlnAngleTilt", "inf"),
        case("opt-maxres-inf", nothing, reconstruct(STAR, f"{JOB}/map.mrc", "--maxres", "inf"), "--maxres",
             "finite"),
        case("opt-regularization-nan", nothing, train(STAR, MAP, JOB, "--regularization-factor", "nan"),
             "--regularization-factor", "finite"),
        case("opt-thousands-of-latent-dimensions", nothing, train(STAR, MAP, JOB, "--n-latent-dimensions", "5000"),
             "--n-latent-dimensions", "5000"),
        case("opt-zero-threads", nothing, reconstruct(STAR, f"{JOB}/map.mrc", "--j", "0"), "--j"),
        case("ok-more-threads-than-cores", nothing, reconstruct(STAR, f"{JOB}/map.mrc", "--j", "4096"), ok=True),
        case("map-all-zero", _zero_map, train(), "run_class001.mrc", "all zero"),
        case("map-constant", lambda r: _zero_map(r, 2.5), train(), "run_class001.mrc", "constant"),
        # ---- issue 12: data consistency that silently changes science ----------------------------------
        case("halves-same-image-in-both", _duplicate_across_halves, reconstruct(STAR, f"{JOB}/map.mrc", "--halves"),
             "appears 2 times", "both half sets"),
        case("halves-subset-one-and-a-half", lambda r: set_cell(r, "rlnRandomSubset", 4, 1.5), train(),
             "rlnRandomSubset", "1.5"),
        case("optics-pixel-sizes-differ", _pixel_sizes_differ, reconstruct(), "pixel sizes", "3.3"),
        case("origins-pixels-and-angstrom-disagree", lambda r: _origin_columns(r, False), reconstruct(),
             "rlnOriginX", "disagree"),
        case("ok-origins-pixels-and-angstrom-agree", lambda r: _origin_columns(r, True), reconstruct(), ok=True),
        case("ok-latin1-star-file", _latin1, reconstruct(), ok=True),
        # ---- issue 12: one job per directory, only our directories -------------------------------------
        case("dir-locked-by-a-running-task", lambda r: _lock_of(r, os.getpid()), train(), "in use",
             ".relion_dynamight.lock", job=None, control=False),
        case("ok-stale-lock-taken-over", lambda r: _lock_of(r, _dead_pid()), reconstruct(), ok=True),
        case("dir-refinement-job-as-output", nothing, train(STAR, MAP, "Refine3D/job001"), "Refine3D",
             "not a DynaMight job", job=None, control=False),
        case("dir-output-directory-is-a-file", _output_dir_is_a_file, train(STAR, MAP, "Blocker"), "Blocker",
             job=None, control=False),
        case("out-o-is-a-directory", lambda r: (r / JOB / "map.mrc").mkdir(parents=True), reconstruct(),
             "map.mrc", "directory"),
        case("out-job-directory-name-too-long", nothing, train(STAR, MAP, "Long/" + "x" * 300), "too long",
             job=None, control=False),
        case("out-job-directory-in-a-symlink-loop", lambda r: os.symlink("Loop", r / "Loop"), train(STAR, MAP, "Loop/job1"),
             "Loop", job=None, control=False),
        case("ckpt-every-checkpoint-unreadable", _all_checkpoints_unreadable, train(STAR, MAP, TRAINED),
             "can be read", "new output directory", base="trained", job=TRAINED),
        case("external-bad-in-parts", lambda r: put(r, "", "empty.star"),
             ["external", "reconstruct", "--o", JOB + "/", "--in_parts", "empty.star", "--j", "1"], "empty.star",
             control=False),
    ]
    ids = [k.id for k in c]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return c
