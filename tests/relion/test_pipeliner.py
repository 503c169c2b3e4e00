"""Our commands as RELION External jobs: argument translation, and Debian's relion_pipeliner 3.1.3 running them."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relion_dynamight.errors import InputError
from relion_dynamight.relion.external import declare_nodes_for_project, parse_external_args, translate
from relion_dynamight.relion.jobdir import read_output_nodes
from relion_dynamight.relion.pipeline import read_pipeline


def _cmd(name: str):
    from relion_dynamight.cli import cli

    return cli.commands[name]


# -- translation (no RELION needed) -----------------------------------------------------------------
def test_external_arguments_are_split() -> None:
    ext = parse_external_args(["--o", "External/job004/", "--in_parts", "p.star", "--n_particles", "50",
                               "--no_gui", "--j", "2", "--pipeline_control", "External/job004/"])
    assert ext.job_dir == Path("External/job004")
    assert ext.inputs == {"--in_parts": "p.star"} and ext.threads == "2"
    assert ext.params == [("n_particles", "50"), ("no_gui", None)]


def test_translation_for_simulate_and_training() -> None:
    ext = parse_external_args(["--o", "External/job004/", "--n_particles", "50", "--snr", "-1", "--j", "3"])
    with pytest.raises(InputError, match="yes/no|no option"):
        translate("simulate", _cmd("simulate"), parse_external_args(["--o", "E/", "--bogus", "1"]))
    argv = translate("simulate", _cmd("simulate"), parse_external_args(["--o", "E/j/", "--n_particles", "50",
                                                                        "--box", "32", "--j", "3"]))
    assert argv == ["--o", "E/j/project", "--n-particles", "50", "--box", "32"]  # no thread option
    argv = translate("optimize-deformations", _cmd("optimize-deformations"),
                     parse_external_args(["--o", "External/job005/", "--in_parts", "R/run_data.star",
                                          "--in_3dref", "R/map.mrc", "--preload_images", "Yes",
                                          "--n_gaussians", "3000", "--j", "4"]))
    assert argv == ["--output-directory", "External/job005", "--refinement-star-file", "R/run_data.star",
                    "--initial-model", "R/map.mrc", "--n-threads", "4", "--preload-images", "--n-gaussians", "3000"]
    assert ext.threads == "3"


def test_translation_for_continue_tasks_needs_the_dynamight_job() -> None:
    cmd = _cmd("deformable-backprojection")
    with pytest.raises(InputError, match="dynamight_job"):
        translate("deformable-backprojection", cmd, parse_external_args(["--o", "External/job006/"]))
    argv = translate("deformable-backprojection", cmd, parse_external_args(
        ["--o", "External/job006/", "--dynamight_job", "DynaMight/job002/", "--batch_size", "20",
         "--preload_images", "No"]))
    assert argv == ["DynaMight/job002/", "--batch-size", "20"]
    with pytest.raises(InputError, match="takes no --in_mask"):
        translate("deformable-backprojection", cmd, parse_external_args(
            ["--o", "E/", "--dynamight_job", "D/", "--in_mask", "m.mrc"]))


@pytest.mark.parametrize("version, column, value", [
    ("3.1", "_rlnPipeLineNodeType", "10"), ("4", "_rlnPipeLineNodeTypeLabel", "DensityMap.mrc.halfmap"),
    ("5", "_rlnPipeLineNodeTypeLabel", "DensityMap.mrc.relion.halfmap.dynamight")])
def test_output_nodes_follow_the_project_version(version: str, column: str, value: str, tmp_path: Path) -> None:
    declare_nodes_for_project(tmp_path, [("E/job1/map_half1.mrc", "DensityMap.mrc.relion.halfmap.dynamight")],
                              version)
    text = (tmp_path / "RELION_OUTPUT_NODES.star").read_text()
    assert column + " #2" in text and read_output_nodes(tmp_path) == [("E/job1/map_half1.mrc", value)]


# -- relion_pipeliner 3.1.3 ---------------------------------------------------------------------------
STATUS = {"0": "Running", "1": "Scheduled", "2": "Succeeded", "3": "Failed", "4": "Aborted"}


def _exe() -> str:
    exe = Path(sys.executable).parent / "relion_dynamight"
    return str(exe) if exe.exists() else (shutil.which("relion_dynamight") or "relion_dynamight")


def _project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    (project / "default_pipeline.star").write_text("data_pipeline_general\n_rlnPipeLineJobCounter 1\n")
    return project


#: relion_pipeliner waits ``--sec_wait_after`` (default 10) seconds after each job "for slow IO": 1 s here.
NO_IO_WAIT = ("--sec_wait_after", "1")


def _add_and_run(project: Path, options: str, timeout: float = 120) -> subprocess.CompletedProcess:
    add = subprocess.run(["relion_pipeliner", "--addJob", "External", "--addJobOptions", options],
                         cwd=project, capture_output=True, text=True, timeout=60)
    assert add.returncode == 0, add.stderr
    return subprocess.run(["relion_pipeliner", "--RunJobs", "External/job001/", *NO_IO_WAIT], cwd=project,
                          capture_output=True, text=True, timeout=timeout)


def _status(project: Path) -> str:
    pipe = read_pipeline(project)
    return STATUS[pipe.process("External/job001/").status]


def test_failing_command_is_marked_failed(relion: None, tmp_path: Path) -> None:
    project = _project(tmp_path)
    (project / "broken.star").write_text("this is not a STAR file\n")  # (a missing input makes the pipeliner wait)
    run = _add_and_run(project, f"fn_exe == {_exe()} external reconstruct;in_part == broken.star;nr_threads == 1")
    assert run.returncode == 0
    job = project / "External/job001"
    assert (job / "RELION_JOB_EXIT_FAILURE").exists() and _status(project) == "Failed"
    err = (job / "run.err").read_text()
    assert "ERROR" in err
    if importlib.util.find_spec("relion_dynamight.jobs.reconstruct") is not None:
        assert "broken.star" in err


def test_unknown_parameter_is_marked_failed_with_a_clear_message(relion: None, tmp_path: Path) -> None:
    project = _project(tmp_path)
    run = _add_and_run(project, f"fn_exe == {_exe()} external simulate;param1_label == bogus_option;"
                                "param1_value == 3")
    assert run.returncode == 0 and _status(project) == "Failed"
    assert "no option --bogus-option" in (project / "External/job001/run.err").read_text()


def _needs_simulate() -> None:
    if importlib.util.find_spec("relion_dynamight.jobs.simulate") is None:
        pytest.skip("relion_dynamight.jobs.simulate not implemented yet (issue 2 work in progress)")


def test_simulate_runs_as_external_job_and_declares_nodes(relion: None, tmp_path: Path) -> None:
    _needs_simulate()
    project = _project(tmp_path)
    run = _add_and_run(project, f"fn_exe == {_exe()} external simulate;param1_label == n_particles;"
                                "param1_value == 100;param2_label == box;param2_value == 32;nr_threads == 2")
    assert run.returncode == 0, run.stderr
    job = project / "External/job001"
    assert _status(project) == "Succeeded", (job / "run.err").read_text()[-2000:]
    assert "--o External/job001/" in (job / "note.txt").read_text()
    pipe = read_pipeline(project)
    outputs = [node for proc, node in pipe.output_edges if proc == "External/job001/"]
    assert outputs, "simulate declared no output nodes"
    for name in outputs:
        assert (project / name).exists()
        assert pipe.node(name).type in {"3", "6", "7", "10", "13"}  # RELION 3.1 integer types, not 0
    assert not (project / ".relion_lock").exists()
    star = project / "External/job001/particles.star"
    assert "External/job001/particles.star" in outputs
    # the copied particles point at images that exist, seen from the enclosing project
    first = next(line for line in star.read_text().splitlines() if "@External/job001/project/" in line)
    image = next(tok for tok in first.split() if "@" in tok).split("@", 1)[1]
    assert (project / image).is_file()


def test_abort_is_honoured(relion: None, tmp_path: Path) -> None:
    _needs_simulate()
    project = _project(tmp_path)
    add = subprocess.run(["relion_pipeliner", "--addJob", "External", "--addJobOptions",
                          f"fn_exe == {_exe()} external simulate;param1_label == n_particles;param1_value == 20000;"
                          "param2_label == box;param2_value == 64"],
                         cwd=project, capture_output=True, text=True, timeout=60)
    assert add.returncode == 0, add.stderr
    runner = subprocess.Popen(["relion_pipeliner", "--RunJobs", "External/job001/", *NO_IO_WAIT], cwd=project,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job = project / "External/job001"
    deadline = time.time() + 60
    while time.time() < deadline and "started" not in (job / "run.out").read_text() if (job / "run.out").exists() \
            else time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    (job / "RELION_JOB_ABORT_NOW").touch()
    runner.communicate(timeout=180)
    assert (job / "RELION_JOB_EXIT_ABORTED").exists() and _status(project) == "Aborted"
