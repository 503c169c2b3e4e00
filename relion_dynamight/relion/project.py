"""Standalone runs inside a RELION project: the job directory, job.star, note.txt and the pipeline entry.

When a command runs without ``--output-directory`` in a directory holding ``default_pipeline.star``,
it behaves like a job started from RELION's GUI:

1. :func:`prepare_standalone_job` (under RELION's lock) takes the next job number, creates
   ``DynaMight/jobNNN/``, registers the process as Running with its input nodes and edges, and
   writes ``job.star`` and ``note.txt`` (the command line, as RELION does);
2. the task runs with that directory as its job directory;
3. :func:`finish_standalone_job` (under the lock again) sets Succeeded/Failed/Aborted and, on
   success, adds the output nodes and edges.

RELION 3.1/4.0 projects have no DynaMight job type: the process is registered as an External job
(type 99 / ``relion.external``) in ``DynaMight/jobNNN/``, in the project's own file format.
Standard library only.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Sequence

from relion_dynamight.errors import InputError
from relion_dynamight.relion.pipeline import (
    Pipeline,
    pipeline_path,
    read_pipeline,
    touch_node_files,
    update_pipeline,
)

#: Process type label -> directory RELION uses for it.
JOB_DIRECTORIES = {"dynamight": "DynaMight", "relion.external": "External"}
FINAL_STATUSES = ("Succeeded", "Failed", "Aborted")


def is_relion_project(directory: Path) -> bool:
    return pipeline_path(Path(directory)).is_file()


def _job_name(directory: str, number: int) -> str:
    return f"{directory}/job{number:03d}/" if number < 1000 else f"{directory}/job{number}/"


def _note(command_line: str) -> str:
    stamp = datetime.datetime.now().strftime("%a %b %d %H:%M:%S %Y")
    return (f"\n ++++ Executing new job on {stamp}\n ++++ with the following command(s): \n"
            f"{command_line}\n ++++ \n")


def prepare_standalone_job(cwd: Path, job_type_label: str = "dynamight", command_line: str = "",
                           inputs: Sequence[tuple[str, str]] = (), job_options: dict[str, str] | None = None,
                           lock_retries: int = 20, lock_wait_s: float = 3.0) -> Path:
    """Create and register the next ``DynaMight/jobNNN/`` of the RELION project ``cwd``.

    ``inputs`` are ``(path relative to the project, RELION 5 node type label)``; ``job_options`` are
    written to ``job.star`` (RELION job-option variables, e.g. ``fn_star``).  Returns ``cwd / 'DynaMight/jobNNN'``.
    Raises :class:`InputError` when ``cwd`` is not a RELION project.
    """
    cwd = Path(cwd)
    if not is_relion_project(cwd):
        raise InputError(f"no --output-directory given and {cwd.resolve()} is not a RELION project (no "
                         "default_pipeline.star): give --output-directory DIR, or run inside a RELION project")
    if job_type_label not in JOB_DIRECTORIES:
        raise ValueError(f"unknown job type {job_type_label!r}")
    directory = JOB_DIRECTORIES[job_type_label]

    def register(pipe: Pipeline) -> str:
        number = max(pipe.job_counter, 1)
        while pipe.process(_job_name(directory, number)) or (cwd / _job_name(directory, number)).exists():
            number += 1
        name = _job_name(directory, number)
        (cwd / name).mkdir(parents=True)
        pipe.add_process(name, job_type_label, "Running")
        for node_name, label in inputs:
            pipe.add_input_edge(_project_relative(cwd, node_name), label, name)
        pipe.job_counter = number + 1
        return name

    name = update_pipeline(cwd, register, message=f"relion_dynamight: registering a new {directory} job",
                           retries=lock_retries, wait_s=lock_wait_s)
    job_dir = cwd / name.rstrip("/")
    _write_job_files(job_dir, job_type_label, command_line, job_options or {})
    return job_dir


def _write_job_files(job_dir: Path, job_type_label: str, command_line: str, options: dict[str, str]) -> None:
    from relion_dynamight.relion.schemes import write_job_star

    write_job_star(job_dir / "job.star", job_type_label, options)
    if command_line:
        with open(job_dir / "note.txt", "a") as handle:
            handle.write(_note(command_line))


def _project_relative(project_dir: Path, path: str | Path) -> str:
    """A node name as RELION writes it: relative to the project directory when the file is inside it."""
    p = Path(path)
    if p.is_absolute():
        try:
            return p.resolve().relative_to(Path(project_dir).resolve()).as_posix()
        except ValueError:
            return p.as_posix()
    return p.as_posix()


def process_name(project_dir: Path, job_dir: Path) -> str:
    """``DynaMight/job012/`` for a job directory given relative to the project or to the working directory."""
    job_dir = Path(job_dir)
    if not job_dir.is_absolute() and (Path(project_dir) / job_dir).is_dir():
        return job_dir.as_posix().rstrip("/") + "/"
    return _project_relative(project_dir, job_dir.absolute()).rstrip("/") + "/"


def finish_standalone_job(project_dir: Path, job_dir: Path, status: str,
                          outputs: Sequence[tuple[str, str]] = (), lock_retries: int = 20,
                          lock_wait_s: float = 3.0) -> None:
    """Set the final status of a standalone job; on success also register its output nodes and edges.

    ``outputs`` are ``(path, RELION 5 node type label)`` as the task returned them.
    """
    if status not in FINAL_STATUSES:
        raise ValueError(f"final status must be one of {FINAL_STATUSES}, not {status!r}")
    project_dir = Path(project_dir)
    name = process_name(project_dir, job_dir)
    node_names: list[str] = []

    def finish(pipe: Pipeline) -> Pipeline:
        if pipe.process(name) is None:  # e.g. the pipeline was edited meanwhile: register it again
            pipe.add_process(name, "dynamight", status)
        pipe.set_status(name, status)
        if status == "Succeeded":
            for node_name, label in outputs:
                rel = _project_relative(project_dir, node_name)
                pipe.add_output_edge(name, rel, label)
                node_names.append(rel)
        return pipe

    pipe = update_pipeline(project_dir, finish, message=f"relion_dynamight: {name} {status}",
                           retries=lock_retries, wait_s=lock_wait_s)
    touch_node_files(project_dir, pipe, node_names)


def check_job_type(project_dir: Path, job_dir: Path, expected: str = "dynamight") -> None:
    """Refuse a job directory that the project's pipeline lists under another job type.

    Directories unknown to the pipeline (or outside a RELION project) pass.  In RELION 3.1/4.0
    projects our jobs are External jobs, which also pass.
    """
    project_dir = Path(project_dir)
    if not is_relion_project(project_dir):
        return
    pipe = read_pipeline(project_dir)
    name = process_name(project_dir, job_dir)
    proc = pipe.process(name)
    if proc is None:
        return
    label = pipe.process_type_label(proc)
    allowed = {expected, "relion.external"}
    if label not in allowed:
        raise InputError(f"{name} is a '{label}' job in {pipeline_path(project_dir)}, not a DynaMight job; "
                         "give the directory of the DynaMight job (DynaMight/jobNNN/)")
