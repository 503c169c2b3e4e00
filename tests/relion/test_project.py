"""Standalone runs inside a RELION project: next job directory, job.star, note.txt, registration, status."""

from __future__ import annotations

from pathlib import Path

import pytest

from relion_dynamight.errors import InputError
from relion_dynamight.relion.pipeline import read_pipeline
from relion_dynamight.relion.project import (
    check_job_type,
    finish_standalone_job,
    prepare_standalone_job,
    process_name,
)
from relion_dynamight.relion.schemes import read_job_star
from pipelines import RELION4, RELION5, RELION31

INPUTS = [("Refine3D/job010/run_data.star", "ParticleGroupMetadata.star.relion.refine3d"),
          ("Refine3D/job010/run_class001.mrc", "DensityMap.mrc.relion.refine3d")]
OUTPUTS = ["backprojection/map_half1.mrc", "backprojection/map_half2.mrc"]
HALF = "DensityMap.mrc.relion.halfmap.dynamight"
CMD = ("relion_dynamight optimize-deformations --refinement-star-file Refine3D/job010/run_data.star "
       "--initial-model Refine3D/job010/run_class001.mrc")


def _project(tmp_path: Path, text: str = RELION5) -> Path:
    (tmp_path / "default_pipeline.star").write_text(text)
    return tmp_path


def test_prepare_registers_a_running_job_with_its_inputs(tmp_path: Path) -> None:
    project = _project(tmp_path)
    job = prepare_standalone_job(project, "dynamight", CMD, INPUTS, job_options={"fn_star": INPUTS[0][0]})
    assert job == project / "DynaMight" / "job013" and job.is_dir()
    pipe = read_pipeline(project)
    assert pipe.job_counter == 14
    proc = pipe.process("DynaMight/job013/")
    assert (proc.type, proc.status, proc.alias) == ("dynamight", "Running", "None")
    for name, _ in INPUTS:
        assert (name, "DynaMight/job013/") in pipe.input_edges
    assert pipe.node(INPUTS[0][0]).type == "ParticleGroupMetadata.star.relion.refine3d"  # existing node kept
    header, options = read_job_star(job / "job.star")
    assert header["JobTypeLabel"] == "dynamight" and header["JobIsContinue"] == "0"
    assert options == {"fn_star": INPUTS[0][0]}
    note = (job / "note.txt").read_text()
    assert "++++ with the following command(s):" in note and CMD in note


@pytest.mark.parametrize("status", ["Succeeded", "Failed", "Aborted"])
def test_finish_sets_status_and_outputs_only_on_success(status: str, tmp_path: Path) -> None:
    project = _project(tmp_path)
    job = prepare_standalone_job(project, "dynamight", CMD, INPUTS)
    (job / "backprojection").mkdir()
    for name in OUTPUTS:
        (job / name).write_text("map")
    finish_standalone_job(project, job, status, [(str(job / n), HALF) for n in OUTPUTS])
    pipe = read_pipeline(project)
    assert pipe.process("DynaMight/job013/").status == status
    registered = [e for e in pipe.output_edges if e[0] == "DynaMight/job013/"]
    if status == "Succeeded":
        assert registered == [("DynaMight/job013/", f"DynaMight/job013/{n}") for n in OUTPUTS]
        assert pipe.node("DynaMight/job013/backprojection/map_half2.mrc").type == HALF
        assert (project / ".Nodes/DensityMap/DynaMight/job013/backprojection/map_half1.mrc").exists()
    else:
        assert registered == []


@pytest.mark.parametrize("text, ptype, running, done, parts", [
    (RELION4, "relion.external", "Running", "Succeeded", "ParticlesData.star.relion.refine3d"),
    (RELION31, "99", "0", "2", "3"),
])
def test_older_projects_get_their_own_format(text: str, ptype: str, running: str, done: str, parts: str,
                                             tmp_path: Path) -> None:
    project = _project(tmp_path, text)
    before = read_pipeline(project)
    job = prepare_standalone_job(project, "dynamight", CMD, INPUTS)
    name = f"DynaMight/job{before.job_counter:03d}/"
    pipe = read_pipeline(project)
    assert pipe.version == before.version
    assert (pipe.process(name).type, pipe.process(name).status) == (ptype, running)
    assert pipe.node(INPUTS[0][0]).type == parts
    finish_standalone_job(project, job, "Succeeded", [(f"{name}{OUTPUTS[0]}", HALF)])
    pipe = read_pipeline(project)
    assert pipe.process(name).status == done
    assert pipe.processes[: len(before.processes)] == before.processes  # other jobs untouched


def test_existing_directory_is_skipped(tmp_path: Path) -> None:
    project = _project(tmp_path)
    (project / "DynaMight" / "job013").mkdir(parents=True)
    job = prepare_standalone_job(project, "dynamight", CMD, INPUTS)
    assert job.name == "job014"
    assert read_pipeline(project).job_counter == 15


def test_not_a_project_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a RELION project.*--output-directory"):
        prepare_standalone_job(tmp_path, "dynamight", CMD, INPUTS)
    assert list(tmp_path.iterdir()) == []


def test_job_directory_of_another_type_is_refused(tmp_path: Path) -> None:
    project = _project(tmp_path)
    with pytest.raises(InputError, match="relion.refine3d.*not a DynaMight job"):
        check_job_type(project, project / "Refine3D" / "job010")
    check_job_type(project, project / "DynaMight" / "job012")   # a DynaMight job passes
    check_job_type(project, project / "DynaMight" / "job099")   # unknown directories pass


def test_process_name_accepts_relative_and_absolute_paths(tmp_path: Path, monkeypatch) -> None:
    project = _project(tmp_path)
    (project / "DynaMight" / "job012").mkdir(parents=True)
    assert process_name(project, project / "DynaMight" / "job012") == "DynaMight/job012/"
    assert process_name(project, Path("DynaMight/job012/")) == "DynaMight/job012/"
    monkeypatch.chdir(project)
    assert process_name(Path("."), Path("DynaMight/job012")) == "DynaMight/job012/"
