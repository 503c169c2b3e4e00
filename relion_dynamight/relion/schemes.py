"""RELION ``job.star`` and ``scheme.star`` files: writers, a small reader, and our ready-made definitions.

* :func:`job_star_text` / :func:`write_job_star` — a job's type label and job-option values
  (``data_job`` + ``data_joboptions_values``), the format RELION 4/5 GUIs, ``relion_pipeliner
  --addJobFromStar`` and ``relion_schemer`` read;
* :func:`scheme_star_text` — a scheme (``scheme_general``, ``scheme_floats``, ``scheme_bools``,
  ``scheme_strings``, ``scheme_operators``, ``scheme_jobs``, ``scheme_edges``; relion-facts §4);
* the definitions shipped in ``relion_gui/`` (see :func:`gui_files`): defaults for RELION 5's
  DynaMight tab, External-job definitions, and the ``Schemes/dynamight`` scheme.

Standard library only.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

EXECUTABLE = "relion_dynamight"

#: Job-option variables RELION 5 defines for its ``dynamight`` job type (initialiseDynaMightJob, the
#: thread count, the queue options and "Additional arguments").  No MPI field.
DYNAMIGHT_JOB_OPTIONS = frozenset({
    "fn_star", "fn_map", "gpu_id", "do_preload", "fn_dynamight_exe", "nr_gaussians", "initial_threshold",
    "reg_factor", "fn_checkpoint", "do_visualize", "halfset", "do_inverse", "nr_epochs", "do_store_deform",
    "do_reconstruct", "backproject_batchsize", "nr_threads", "do_queue", "queuename", "qsub", "qsubscript",
    "min_dedicated", "qsub_extra1", "qsub_extra2", "qsub_extra3", "qsub_extra4", "other_args",
})

#: Job-option variables of RELION's External job type (3.1, 4.0 and 5.0).
EXTERNAL_JOB_OPTIONS = frozenset(
    {"fn_exe", "in_mov", "in_mic", "in_part", "in_coords", "in_3dref", "in_mask", "nr_threads", "do_queue",
     "queuename", "qsub", "qsubscript", "min_dedicated", "qsub_extra1", "qsub_extra2", "qsub_extra3",
     "qsub_extra4", "other_args"}
    | {f"param{i}_{kind}" for i in range(1, 11) for kind in ("label", "value")})

#: Job-option variables of RELION 5's PostProcess job type.
POSTPROCESS_JOB_OPTIONS = frozenset({
    "fn_in", "fn_mask", "angpix", "do_auto_bfac", "autob_lowres", "do_adhoc_bfac", "adhoc_bfac", "fn_mtf",
    "mtf_angpix", "do_skip_fsc_weighting", "low_pass", "do_queue", "queuename", "qsub", "qsubscript",
    "min_dedicated", "qsub_extra1", "qsub_extra2", "qsub_extra3", "qsub_extra4", "other_args",
})

KNOWN_JOB_OPTIONS = {
    "dynamight": DYNAMIGHT_JOB_OPTIONS,
    "relion.external": EXTERNAL_JOB_OPTIONS,
    "relion.postprocess": POSTPROCESS_JOB_OPTIONS,
}

#: Defaults of the DynaMight tab (RELION 5's own, except the executable).  Queue options are left out
#: on purpose so that the site's RELION_QSUB_* defaults still apply.
DYNAMIGHT_GUI_DEFAULTS: dict[str, str] = {
    "fn_star": "", "fn_map": "", "fn_dynamight_exe": EXECUTABLE, "gpu_id": "0", "do_preload": "No",
    "nr_gaussians": "10000", "initial_threshold": "", "reg_factor": "1", "fn_checkpoint": "",
    "do_visualize": "No", "halfset": "1", "do_inverse": "No", "nr_epochs": "200", "do_store_deform": "No",
    "do_reconstruct": "No", "backproject_batchsize": "10", "nr_threads": "1", "other_args": "",
}


# -- job.star ----------------------------------------------------------------------------------------
def _quote(value: str) -> str:
    value = str(value)
    if value == "":
        return '""'
    if any(c.isspace() for c in value) or value.startswith(("_", "#", "data_", "loop_")) or '"' in value:
        return '"' + value.replace('"', "'") + '"'
    return value


def job_star_text(type_label: str, options: dict[str, str], is_continue: bool = False,
                  is_tomo: bool = False) -> str:
    """``job.star`` text as RELION 5 writes it (``# version 50001``; booleans as Yes/No)."""
    lines = ["", "# version 50001", "", "data_job", "",
             f"_rlnJobTypeLabel {type_label}",
             f"_rlnJobIsContinue {int(is_continue)}",
             f"_rlnJobIsTomo {int(is_tomo)}", "", "",
             "# version 50001", "", "data_joboptions_values", "", "loop_",
             "_rlnJobOptionVariable #1", "_rlnJobOptionValue #2"]
    lines += [f"{name} {_quote(value)}" for name, value in sorted(options.items())]
    return "\n".join(lines) + "\n\n"


def _atomic_write(path: Path, text: str) -> Path:
    from relion_dynamight.relion.jobdir import atomic_write_text

    return atomic_write_text(path, text)


def write_job_star(path: Path, type_label: str, options: dict[str, str], is_continue: bool = False) -> Path:
    return _atomic_write(path, job_star_text(type_label, options, is_continue))


def read_job_star(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """``(header, options)`` of a ``job.star``: header keys without ``_rln``, option values as text."""
    header: dict[str, str] = {}
    options: dict[str, str] = {}
    block = ""
    for raw in Path(path).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or line == "loop_":
            continue
        if line.startswith("data_"):
            block = line[5:]
        elif line.startswith("_rln"):
            if block == "job":
                key, _, value = line.partition(" ")
                header[key[4:]] = value.strip()
        elif block == "joboptions_values":
            parts = shlex.split(line)
            options[parts[0]] = parts[1] if len(parts) > 1 else ""
    return header, options


# -- scheme.star -------------------------------------------------------------------------------------
@dataclass
class Scheme:
    """A RELION 4/5 scheme.  Operators are ``name -> (type, output, input1, input2)``; edges are
    ``(input node, output node)`` or forks ``(input node, output if false, bool, output if true)``."""

    name: str
    floats: dict[str, float] = field(default_factory=dict)
    bools: dict[str, bool] = field(default_factory=dict)
    strings: dict[str, str] = field(default_factory=dict)
    operators: dict[str, tuple[str, str, str, str]] = field(default_factory=dict)
    jobs: dict[str, str] = field(default_factory=dict)          # job name -> mode ("new" | "continue")
    edges: list[tuple[str, ...]] = field(default_factory=list)

    @property
    def directory(self) -> str:
        return f"Schemes/{self.name}/"


def _loop(block: str, labels: list[str], rows: list[list[str]]) -> list[str]:
    out = ["", "# version 50001", "", f"data_{block}", "", "loop_"]
    out += [f"_{label} #{i}" for i, label in enumerate(labels, start=1)]
    out += [" ".join(_quote(v) for v in row) for row in rows]
    return out + [""]


def scheme_star_text(scheme: Scheme) -> str:
    """``scheme.star`` as RELION 5's schemer writes it (variables' value and reset value equal)."""
    first = scheme.edges[0][0] if scheme.edges else "undefined"
    out = ["", "# version 50001", "", "data_scheme_general", "",
           f"_rlnSchemeName {scheme.directory}", f"_rlnSchemeCurrentNodeName {first}", ""]
    if scheme.floats:
        out += _loop("scheme_floats", ["rlnSchemeFloatVariableName", "rlnSchemeFloatVariableValue",
                                       "rlnSchemeFloatVariableResetValue"],
                     [[k, f"{v:f}", f"{v:f}"] for k, v in scheme.floats.items()])
    if scheme.bools:
        out += _loop("scheme_bools", ["rlnSchemeBooleanVariableName", "rlnSchemeBooleanVariableValue",
                                      "rlnSchemeBooleanVariableResetValue"],
                     [[k, str(int(v)), str(int(v))] for k, v in scheme.bools.items()])
    if scheme.strings:
        out += _loop("scheme_strings", ["rlnSchemeStringVariableName", "rlnSchemeStringVariableValue",
                                        "rlnSchemeStringVariableResetValue"],
                     [[k, v, v] for k, v in scheme.strings.items()])
    if scheme.operators:
        out += _loop("scheme_operators", ["rlnSchemeOperatorName", "rlnSchemeOperatorType",
                                          "rlnSchemeOperatorOutput", "rlnSchemeOperatorInput1",
                                          "rlnSchemeOperatorInput2"],
                     [[k, *v] for k, v in scheme.operators.items()])
    if scheme.jobs:
        out += _loop("scheme_jobs", ["rlnSchemeJobNameOriginal", "rlnSchemeJobName", "rlnSchemeJobMode",
                                     "rlnSchemeJobHasStarted"],
                     [[k, k, mode, "0"] for k, mode in scheme.jobs.items()])
    rows = []
    for edge in scheme.edges:
        if len(edge) == 2:
            rows.append([edge[0], edge[1], "0", "undefined", "undefined"])
        else:
            source, if_false, boolean, if_true = edge
            rows.append([source, if_false, "1", if_true, boolean])
    out += _loop("scheme_edges", ["rlnSchemeEdgeInputNodeName", "rlnSchemeEdgeOutputNodeName",
                                  "rlnSchemeEdgeIsFork", "rlnSchemeEdgeOutputNodeNameIfTrue",
                                  "rlnSchemeEdgeBooleanVariable"], rows)
    return "\n".join(out) + "\n"


# -- our definitions -----------------------------------------------------------------------------------
def dynamight_scheme(name: str = "dynamight") -> tuple[Scheme, dict[str, tuple[str, dict[str, str]]]]:
    """The unattended scheme: optimize-deformations → inverse → backprojection → PostProcess.

    One DynaMight job node (mode ``continue``) is visited three times.  The first visit creates the
    job, which always trains (RELION runs optimize-deformations for a new job).  Between visits
    ``bool=set`` operators flip ``do_inverse`` / ``do_reconstruct`` so that exactly one task is true
    on each later visit::

        dynamight --(do_reconstruct?)--> postprocess --> EXIT
            | no
        SET_reconstruct_after_inverse (do_reconstruct := do_inverse)
            --(do_reconstruct?)--> yes: SET_inverse_off (do_inverse := no)  --> dynamight
                                   no:  SET_inverse_on  (do_inverse := yes) --> dynamight

    Returns the scheme and ``{job name: (job type label, job options)}``.
    """
    scheme = Scheme(name)
    scheme.floats = {"nr_gaussians": 10000.0, "nr_epochs_inverse": 200.0, "backproject_batchsize": 10.0,
                     "nr_threads": 1.0}
    scheme.bools = {"do_inverse": False, "do_reconstruct": False, "yes": True, "no": False}
    scheme.strings = {"particles": "Refine3D/job010/run_data.star", "consensus_map":
                      "Refine3D/job010/run_class001.mrc", "mask": "MaskCreate/job011/mask.mrc",
                      "gpu_id": "0", "dynamight_exe": EXECUTABLE}
    scheme.operators = {
        "SET_reconstruct_after_inverse": ("bool=set", "do_reconstruct", "do_inverse", "undefined"),
        "SET_inverse_on": ("bool=set", "do_inverse", "yes", "undefined"),
        "SET_inverse_off": ("bool=set", "do_inverse", "no", "undefined"),
        "EXIT": ("exit", "undefined", "undefined", "undefined"),
    }
    scheme.jobs = {"dynamight": "continue", "postprocess": "new"}
    scheme.edges = [
        ("dynamight", "SET_reconstruct_after_inverse", "do_reconstruct", "postprocess"),
        ("SET_reconstruct_after_inverse", "SET_inverse_on", "do_reconstruct", "SET_inverse_off"),
        ("SET_inverse_on", "dynamight"),
        ("SET_inverse_off", "dynamight"),
        ("postprocess", "EXIT"),
    ]
    dynamight_options = {
        **DYNAMIGHT_GUI_DEFAULTS,
        "fn_star": "$$particles", "fn_map": "$$consensus_map", "nr_gaussians": "$$nr_gaussians",
        "gpu_id": "$$gpu_id", "fn_dynamight_exe": "$$dynamight_exe", "nr_threads": "$$nr_threads",
        "nr_epochs": "$$nr_epochs_inverse", "backproject_batchsize": "$$backproject_batchsize",
        "do_visualize": "No", "do_inverse": "$$do_inverse", "do_reconstruct": "$$do_reconstruct",
    }
    postprocess_options = {
        "fn_in": f"{scheme.directory}dynamight/backprojection/map_half1.mrc", "fn_mask": "$$mask",
        "angpix": "-1", "do_auto_bfac": "Yes", "autob_lowres": "10", "do_adhoc_bfac": "No",
        "adhoc_bfac": "-1000", "fn_mtf": "", "mtf_angpix": "1", "do_skip_fsc_weighting": "No", "low_pass": "5",
        "other_args": "",
    }
    return scheme, {"dynamight": ("dynamight", dynamight_options),
                    "postprocess": ("relion.postprocess", postprocess_options)}


def external_job_options(command: str, params: list[tuple[str, str]], in_part: str = "", in_3dref: str = "",
                         in_mask: str = "", nr_threads: int | str = 1) -> dict[str, str]:
    """Options of an External job running ``relion_dynamight external COMMAND`` with up to 10 params."""
    if len(params) > 10:
        raise ValueError("RELION's External job has at most 10 parameters")
    options = {"fn_exe": f"{EXECUTABLE} external {command}", "in_mov": "", "in_mic": "", "in_part": in_part,
               "in_coords": "", "in_3dref": in_3dref, "in_mask": in_mask, "nr_threads": str(nr_threads),
               "other_args": ""}
    for i in range(1, 11):
        label, value = params[i - 1] if i <= len(params) else ("", "")
        options[f"param{i}_label"] = label
        options[f"param{i}_value"] = value
    return options


#: External-job definitions shipped in relion_gui/External/: file name -> (command, params, inputs).
EXTERNAL_JOBS: dict[str, tuple[str, list[tuple[str, str]], dict[str, str]]] = {
    "simulate": ("simulate", [("n_particles", "2000"), ("box", "64"), ("pixel_size", "3.0"), ("snr", "0.1"),
                              ("motion", "hinge"), ("seed", "0")], {}),
    "subset_export": ("explore-latent-space", [("dynamight_job", "DynaMight/job001/"), ("half_set", "1"),
                                                ("clusters", "2"), ("no_gui", "Yes")], {}),
    "report": ("explore-latent-space", [("dynamight_job", "DynaMight/job001/"), ("half_set", "0"),
                                         ("no_gui", "Yes")], {}),
}


def gui_files() -> dict[str, str]:
    """Every file of ``relion_gui/``: relative path -> text (what ``install-relion-gui`` copies)."""
    files = {".gui_dynamightjob.star": job_star_text("dynamight", DYNAMIGHT_GUI_DEFAULTS)}
    for stem, (command, params, inputs) in EXTERNAL_JOBS.items():
        files[f"External/dynamight_{stem}/job.star"] = job_star_text(
            "relion.external", external_job_options(command, params, **inputs))
    scheme, jobs = dynamight_scheme()
    files[f"{scheme.directory}scheme.star"] = scheme_star_text(scheme)
    for job_name, (label, options) in jobs.items():
        files[f"{scheme.directory}{job_name}/job.star"] = job_star_text(label, options)
    return files
