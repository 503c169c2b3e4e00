"""Run our commands as RELION External jobs: ``relion_dynamight external COMMAND <RELION's arguments>``.

RELION's External job (3.1, 4.0, 5.0) runs ``fn_exe --o External/jobNNN/ [--in_parts STAR]
[--in_3dref MAP] [--in_mask MASK] [--LABEL VALUE ...] --j N`` and, because the executable's name
contains ``relion_``, appends ``--pipeline_control External/jobNNN/`` (relion-facts §4).  With
``fn_exe`` set to ``relion_dynamight external COMMAND`` this module translates that into COMMAND's
own options (table :data:`SPECS`):

* ``--o DIR`` is the job directory (exit files); commands that write into an output directory get it;
* ``--in_parts`` / ``--in_3dref`` / ``--in_mask`` map to the command's particle / map / mask options;
* ``--j N`` maps to the command's thread option (dropped when it has none);
* each ``--LABEL VALUE`` parameter becomes ``--LABEL VALUE`` (``_`` → ``-``); Yes/No values of flags
  switch them on/off; the parameter ``dynamight_job`` names the DynaMight job directory that the
  "continue" tasks (inverse, backprojection, explore) work on.

Output nodes are declared in the project's pipeline format (RELION 3.1 integers, 4.0 or 5.0 labels),
so ``relion_pipeliner`` of that version registers them with the right types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from relion_dynamight.errors import InputError

RELION_INPUTS = ("--in_parts", "--in_3dref", "--in_mask", "--in_mics", "--in_movies", "--in_coords")
TRUE_WORDS = ("yes", "true", "1", "on")
FALSE_WORDS = ("no", "false", "0", "off", "")


@dataclass(frozen=True)
class Spec:
    """How RELION's External arguments map onto one of our commands."""

    module: str                                   # relion_dynamight.jobs.<module>
    output: str | None = None                     # option receiving the External job directory
    output_file: str | None = None                # ... as DIR/<output_file> instead of DIR
    threads: str | None = None                    # option receiving --j
    inputs: dict[str, str] = field(default_factory=dict)   # --in_parts etc. -> our option
    positional_job: bool = False                  # takes the DynaMight job directory as argument
    declare: str | None = None                    # name of a function in jobs/external.py declaring outputs


SPECS: dict[str, Spec] = {
    "simulate": Spec("simulate", output="--o", output_file="project", declare="simulate_outputs"),
    "reconstruct": Spec("reconstruct", output="--o", output_file="reconstruction.mrc", threads="--j",
                        inputs={"--in_parts": "--i"}),
    "optimize-deformations": Spec("optimize_deformations", output="--output-directory", threads="--n-threads",
                                  inputs={"--in_parts": "--refinement-star-file", "--in_3dref": "--initial-model",
                                          "--in_mask": "--mask-file"}),
    "optimize-inverse-deformations": Spec("optimize_inverse", positional_job=True),
    "deformable-backprojection": Spec("backprojection", positional_job=True),
    "explore-latent-space": Spec("explore", positional_job=True),
}


@dataclass
class ExternalArgs:
    job_dir: Path
    inputs: dict[str, str]
    threads: str | None
    params: list[tuple[str, str | None]]          # (label without dashes, value or None for a bare flag)


def parse_external_args(args: Sequence[str]) -> ExternalArgs:
    """Split RELION's External-job arguments into the job directory, inputs, threads and parameters."""
    job_dir: str | None = None
    control: str | None = None
    inputs: dict[str, str] = {}
    threads: str | None = None
    params: list[tuple[str, str | None]] = []
    i = 0
    args = [a for a in (s.strip() for s in args) if a]
    while i < len(args):
        flag = args[i]
        if not flag.startswith("--"):
            raise InputError(f"unexpected argument {flag!r}: RELION's External job passes --LABEL VALUE pairs")
        value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else None
        i += 1 if value is None else 2
        if flag == "--o":
            job_dir = value
        elif flag in ("--pipeline_control", "--pipeline-control"):
            control = value
        elif flag == "--j":
            threads = value
        elif flag in RELION_INPUTS:
            if value is not None:
                inputs[flag] = value
        else:
            params.append((flag[2:], value))
    directory = job_dir or control
    if not directory:
        raise InputError("no --o DIR: run this through RELION's External job (it passes --o External/jobNNN/)")
    return ExternalArgs(Path(directory), inputs, threads, params)


def _click_option(command: Any, label: str) -> Any | None:
    names = {f"--{label}", f"--{label.replace('_', '-')}"}
    return next((p for p in command.params if set(getattr(p, "opts", [])) & names), None)


def translate(command_name: str, command: Any, ext: ExternalArgs) -> list[str]:
    """Our command's argument list for RELION's External arguments ``ext``."""
    spec = SPECS[command_name]
    argv: list[str] = []
    params = list(ext.params)
    if spec.positional_job:
        job = [v for k, v in params if k.replace("-", "_") == "dynamight_job"]
        directory = job[0] if job else None
        if not directory:
            raise InputError(f"{command_name} as an External job needs the parameter 'dynamight_job' "
                             "(the DynaMight/jobNNN/ directory of the training run)")
        argv.append(directory)
        params = [(k, v) for k, v in params if k.replace("-", "_") != "dynamight_job"]
    if spec.output:
        argv += [spec.output, str(ext.job_dir / spec.output_file) if spec.output_file else str(ext.job_dir)]
    for relion_flag, path in ext.inputs.items():
        if relion_flag not in spec.inputs:
            raise InputError(f"{command_name} takes no {relion_flag} input; leave that field of the External "
                             "job empty")
        argv += [spec.inputs[relion_flag], path]
    if spec.threads and ext.threads:
        argv += [spec.threads, ext.threads]
    for label, value in params:
        option = _click_option(command, label)
        if option is None:
            raise InputError(f"{command_name} has no option --{label.replace('_', '-')} (External job parameter "
                             f"'{label}'); see relion_dynamight {command_name} --help")
        opt = max(option.opts, key=len)
        if getattr(option, "is_flag", False):
            word = (value or "yes").strip().lower()
            if word in TRUE_WORDS:
                argv.append(opt)
            elif word not in FALSE_WORDS:
                raise InputError(f"External job parameter '{label}' is a yes/no switch, not {value!r}")
        elif value is not None:
            argv += [opt, value]
        else:
            raise InputError(f"External job parameter '{label}' needs a value")
    return argv


def project_pipeline_version(project_dir: Path = Path(".")) -> str:
    """The pipeline format of the project in ``project_dir`` ("5" when there is none)."""
    from relion_dynamight.relion.pipeline import pipeline_path, read_pipeline

    if not pipeline_path(project_dir).is_file():
        return "5"
    return read_pipeline(project_dir).version


def declare_nodes_for_project(job_dir: Path, nodes: list[tuple[str, str]], version: str) -> None:
    """Write ``RELION_OUTPUT_NODES.star`` the way RELION ``version`` reads it."""
    from relion_dynamight.relion.jobdir import write_output_nodes
    from relion_dynamight.relion.pipeline import node_type_value

    if version == "3.1":
        write_output_nodes(job_dir, nodes, legacy=True)
    else:
        write_output_nodes(job_dir, [(name, node_type_value(label, version)) for name, label in nodes])
