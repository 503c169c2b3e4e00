"""RELION 5's DynaMight tab: the exact command lines it generates (relion-facts §1), parsed and replayed.

RELION builds one string (doubled spaces, trailing spaces, 'Additional arguments' verbatim) and runs it
through the shell, which splits it on whitespace; ``--pipeline-control DIR/`` is always appended.
"""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path

import pytest

from relion_dynamight.launcher import normalize_argv
from relion_dynamight.relion.jobdir import job_dir_from_argv, read_output_nodes
from runs import run_cli

from tab_lines import CKPT, EXE, JOB, MAP, STAR, continue_job, new_job  # noqa: F401

REAL_NOTE = ("relion_python_dynamight optimize-deformations  --refinement-star-file Refine3D/job034/run_data.star "
             "--output-directory DynaMight/job067/ --initial-model Refine3D/job034/run_class001.mrc --n-gaussians 8000 "
             "--regularization-factor 1 --n-threads 4 --gpu-id 0  --pipeline-control DynaMight/job067/")

CASES = {
    "new-plain": new_job(),
    "new-all": new_job(8000, threshold="0.012", preload=True, gpu="1", other="--n-epochs 3 --seed 7", threads=4),
    "new-empty-gpu": new_job(gpu=""),
    "new-blank-gpu-field": new_job(gpu=" "),
    "real-note": REAL_NOTE,
    "visualize": continue_job("visualize", half_set=0),
    "visualize-ckpt": continue_job("visualize", checkpoint=CKPT, gpu="", other="--no-gui"),
    "inverse": continue_job("inverse"),
    "inverse-all": continue_job("inverse", checkpoint=CKPT, preload=True, store=True, other="--batch-size 16"),
    "backprojection": continue_job("backprojection"),
    "backprojection-all": continue_job("backprojection", checkpoint=CKPT, preload=True, gpu="0,1", batch=25),
}

EXPECTED = {
    "new-plain": {"refinement_star_file": STAR, "initial_model": MAP, "n_gaussians": 10000, "gpu_id": "0",
                  "regularization_factor": 1.0, "n_threads": 1, "preload_images": False, "initial_threshold": None},
    "new-all": {"n_gaussians": 8000, "initial_threshold": 0.012, "preload_images": True, "gpu_id": "1",
                "n_epochs": 3, "seed": 7, "n_threads": 4},
    "new-empty-gpu": {"gpu_id": ""},
    "new-blank-gpu-field": {"gpu_id": ""},
    "real-note": {"n_gaussians": 8000, "n_threads": 4, "output_directory": "DynaMight/job067"},
    "visualize": {"half_set": 0, "checkpoint_file": None, "gpu_id": "0"},
    "visualize-ckpt": {"checkpoint_file": CKPT, "gpu_id": "", "no_gui": True},
    "inverse": {"n_epochs": 200, "save_deformations": False, "preload_images": False},
    "inverse-all": {"checkpoint_file": CKPT, "save_deformations": True, "preload_images": True, "batch_size": 16},
    "backprojection": {"batch_size": 10, "preload_images": False},
    "backprojection-all": {"batch_size": 25, "checkpoint_file": CKPT, "preload_images": True, "gpu_id": "0,1"},
}


def _parse(line: str):
    from relion_dynamight.cli import cli

    argv = normalize_argv(shlex.split(line)[1:])
    return argv, cli.commands[argv[0]].make_context(argv[0], argv[1:])


@pytest.mark.parametrize("case", sorted(CASES))
def test_relion5_command_line_parses(case: str) -> None:
    line = CASES[case]
    argv, ctx = _parse(line)
    job = "DynaMight/job067" if case == "real-note" else JOB.rstrip("/")
    assert job_dir_from_argv(argv) == Path(job)
    assert ctx.params["pipeline_control"] == Path(job)
    for key, value in EXPECTED[case].items():
        got = ctx.params[key]
        got = str(got) if isinstance(got, Path) else got
        assert got == value, (key, got, value)
    if argv[0] != "optimize-deformations":
        assert ctx.params["output_directory"] == Path(job)


def test_doubled_and_trailing_spaces_occur_in_the_lines() -> None:
    assert "optimize-deformations  --refinement-star-file" in CASES["new-plain"]
    assert "--preload-images  --gpu-id" in CASES["new-all"]
    assert "--save-deformations  --preload-images" in CASES["inverse-all"]
    assert "--gpu-id" not in CASES["new-empty-gpu"]


# -- end to end: replay on a project made by `simulate` -------------------------------------------
TASK_MODULES = ("simulate", "optimize_deformations", "optimize_inverse", "backprojection", "explore")


def _missing_modules() -> list[str]:
    return [m for m in TASK_MODULES if importlib.util.find_spec(f"relion_dynamight.jobs.{m}") is None]


def _simulated_project(tmp_path: Path) -> tuple[Path, str, str]:
    from relion_dynamight.jobs.simulate import CONSENSUS, RUN_DATA

    project = tmp_path / "proj"
    result = run_cli("simulate", "--o", str(project), "--n-particles", "200", "--box", "32", "--seed", "3",
                     timeout=300)
    assert result.returncode == 0, result.stderr
    assert (project / RUN_DATA).is_file() and (project / CONSENSUS).is_file()
    return project, RUN_DATA, CONSENSUS


@pytest.mark.slow
def test_replay_relion5_lines_end_to_end(tmp_path: Path) -> None:
    missing = _missing_modules()
    if missing:
        pytest.skip(f"tasks not implemented yet: relion_dynamight.jobs.{', '.join(missing)} (no run())")
    project, star, volume = _simulated_project(tmp_path)
    job = "DynaMight/job001/"
    quick = "--n-epochs 2 --seed 1"
    lines = [
        new_job(n_gaussians=200, gpu="", other=quick, job=job, star=star, volume=volume),
        continue_job("visualize", half_set=1, gpu="", other="--no-gui", job=job),
        continue_job("inverse", epochs=2, store=True, gpu="", job=job),
        continue_job("backprojection", batch=25, preload=True, gpu=" ", job=job),
    ]
    for line in lines:
        result = run_cli(*shlex.split(line)[1:], cwd=project, timeout=600)
        exits = sorted(p.name for p in (project / job).glob("RELION_JOB_EXIT_*"))
        assert result.returncode == 0 and exits == ["RELION_JOB_EXIT_SUCCESS"], (line, result.stderr[-3000:])
    nodes = read_output_nodes(project / job)
    assert sorted(nodes) == [(f"{job}backprojection/map_half1.mrc", "DensityMap.mrc.relion.halfmap.dynamight"),
                             (f"{job}backprojection/map_half2.mrc", "DensityMap.mrc.relion.halfmap.dynamight")]
    for name, _ in nodes:
        assert (project / name).stat().st_size > 1024
