"""``relion_dynamight external COMMAND``: run one of our commands as a RELION External job.

The translation of RELION's External-job arguments into the command's options is
:mod:`relion_dynamight.relion.external` (a pure translator); this module runs the translated command under the job
protocol and declares its outputs in the project's pipeline format.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Mapping, Sequence

from relion_dynamight.errors import InputError
from relion_dynamight.relion.external import (SPECS, declare_nodes_for_project, parse_external_args,
                                              project_pipeline_version, translate)


def simulate_outputs(job_dir: Path) -> list[tuple[str, str]]:
    """Outputs of ``simulate`` run as an External job, usable from the enclosing RELION project.

    ``simulate`` writes a small project of its own in ``JOB/project/`` (image paths relative to it).
    Its particles are copied to ``JOB/particles.star`` with image and micrograph names prefixed by
    ``JOB/project/`` so that RELION jobs of the enclosing project can read them.
    """
    import starfile

    from relion_dynamight.jobs.simulate import CONSENSUS, HALF_MAPS, RUN_DATA

    sub = job_dir / "project"
    tables = starfile.read(sub / RUN_DATA, always_dict=True)
    particles = tables["particles"].copy()
    prefix = sub.as_posix().rstrip("/") + "/"
    if "rlnImageName" in particles:
        particles["rlnImageName"] = [f"{n.split('@', 1)[0]}@{prefix}{n.split('@', 1)[1]}" if "@" in n
                                     else prefix + n for n in particles["rlnImageName"].astype(str)]
    if "rlnMicrographName" in particles:
        particles["rlnMicrographName"] = [prefix + str(n) for n in particles["rlnMicrographName"]]
    star = job_dir / "particles.star"
    starfile.write({**tables, "particles": particles}, star, overwrite=True)
    return [(star.as_posix(), "ParticleGroupMetadata.star.relion.simulate"),
            ((sub / CONSENSUS).as_posix(), "DensityMap.mrc.relion.simulate"),
            *(((sub / h).as_posix(), "DensityMap.mrc.relion.halfmap.simulate") for h in HALF_MAPS)]


def run_external(command_name: str, args: Sequence[str], commands: Mapping[str, Any]) -> int:
    """Run ``command_name`` (one of the Click ``commands``) under RELION's External-job conventions; returns the
    exit code."""
    import click

    from relion_dynamight.jobs.runner import run_task

    try:
        ext = parse_external_args(args)
    except InputError as exc:
        print(f"ERROR: {exc}")
        return 1

    def task(job: Any) -> list[tuple[str, str]] | None:
        if command_name not in SPECS or command_name not in commands:
            raise InputError(f"'{command_name}' cannot run as an External job; use one of {', '.join(SPECS)}")
        command = commands[command_name]
        argv = translate(command_name, command, ext)
        try:
            ctx = command.make_context(command_name, argv)
        except click.ClickException as exc:
            raise InputError(f"{command_name} {' '.join(argv)}: {exc.format_message()}") from exc
        options = dict(ctx.params)
        options.pop("pipeline_control", None)
        module = importlib.import_module(f"relion_dynamight.jobs.{SPECS[command_name].module}")
        nodes = list(module.run(job, **options) or [])
        spec = SPECS[command_name]
        if spec.declare:
            nodes += DECLARE[spec.declare](ext.job_dir)
        version = project_pipeline_version(Path("."))
        if nodes and version != "5" and job.writer:
            declare_nodes_for_project(ext.job_dir, nodes, version)
            return None
        return nodes

    return run_task(f"external {command_name}", ext.job_dir, task)


DECLARE = {"simulate_outputs": simulate_outputs}
