"""relion_gui/: DynaMight tab defaults, External-job definitions, the Schemes/dynamight scheme, installation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import starfile

from relion_dynamight.jobs.install_gui import install
from relion_dynamight.relion.schemes import (
    DYNAMIGHT_JOB_OPTIONS,
    EXTERNAL_JOBS,
    KNOWN_JOB_OPTIONS,
    dynamight_scheme,
    gui_files,
    read_job_star,
)
from runs import run_cli

REPO_GUI = Path(__file__).resolve().parents[2] / "relion_gui"


def _first(block, key: str):
    """A value of a key-value STAR block (starfile gives a dict or a one-row DataFrame)."""
    return block[key] if isinstance(block, dict) else block[key].iloc[0]


def _write_all(tmp_path: Path) -> Path:
    for rel, text in gui_files().items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def test_repository_folder_is_up_to_date() -> None:
    files = gui_files()
    on_disk = {p.relative_to(REPO_GUI).as_posix(): p.read_text() for p in REPO_GUI.rglob("*") if p.is_file()}
    assert on_disk == files, "regenerate with: relion_dynamight install-relion-gui --project relion_gui --force"


def test_every_job_star_parses_and_uses_only_known_variables(tmp_path: Path) -> None:
    root = _write_all(tmp_path)
    job_files = [p for p in root.rglob("*.star") if p.name.endswith("job.star")]
    assert len(job_files) == 1 + len(EXTERNAL_JOBS) + 2
    for path in job_files:
        tables = starfile.read(path, always_dict=True)
        label = _first(tables["job"], "rlnJobTypeLabel")
        assert int(_first(tables["job"], "rlnJobIsContinue")) == 0
        values = tables["joboptions_values"]
        variables = set(values["rlnJobOptionVariable"])
        assert variables <= KNOWN_JOB_OPTIONS[label], (path, variables - KNOWN_JOB_OPTIONS[label])
        _, options = read_job_star(path)
        assert set(options) == variables
        for name, value in options.items():
            if name.startswith("do_") and not value.startswith("$$"):
                assert value in ("Yes", "No"), (path, name, value)


def test_dynamight_tab_defaults_point_to_us(tmp_path: Path) -> None:
    header, options = read_job_star(_write_all(tmp_path) / ".gui_dynamightjob.star")
    assert header["JobTypeLabel"] == "dynamight"
    assert options["fn_dynamight_exe"] == "relion_dynamight"
    assert set(options) <= DYNAMIGHT_JOB_OPTIONS
    assert (options["nr_gaussians"], options["reg_factor"], options["gpu_id"], options["nr_epochs"],
            options["backproject_batchsize"], options["halfset"]) == ("10000", "1", "0", "200", "10", "1")
    assert not {"qsub", "qsubscript", "queuename"} & set(options)  # site queue defaults stay in force


def _scheme_tables(root: Path) -> dict:
    return starfile.read(root / "Schemes/dynamight/scheme.star", always_dict=True)


def test_scheme_variables_are_all_defined(tmp_path: Path) -> None:
    root = _write_all(tmp_path)
    tables = _scheme_tables(root)
    assert _first(tables["scheme_general"], "rlnSchemeName") == "Schemes/dynamight/"
    defined = {*tables["scheme_floats"]["rlnSchemeFloatVariableName"],
               *tables["scheme_bools"]["rlnSchemeBooleanVariableName"],
               *tables["scheme_strings"]["rlnSchemeStringVariableName"]}
    assert {"particles", "consensus_map", "mask", "nr_gaussians"} <= defined
    used: set[str] = set()
    for job in tables["scheme_jobs"]["rlnSchemeJobNameOriginal"]:
        _, options = read_job_star(root / "Schemes/dynamight" / job / "job.star")
        for value in options.values():
            used |= set(re.findall(r"\$\$(\S+)", value))
    assert used and used <= defined, used - defined
    bools = set(tables["scheme_bools"]["rlnSchemeBooleanVariableName"])
    ops = tables["scheme_operators"]
    for row in ops.itertuples():
        if row.rlnSchemeOperatorType == "bool=set":
            assert {row.rlnSchemeOperatorOutput, row.rlnSchemeOperatorInput1} <= bools
    nodes = set(ops["rlnSchemeOperatorName"]) | set(tables["scheme_jobs"]["rlnSchemeJobNameOriginal"])
    edges = tables["scheme_edges"]
    for row in edges.itertuples():
        assert row.rlnSchemeEdgeInputNodeName in nodes and row.rlnSchemeEdgeOutputNodeName in nodes
        if int(row.rlnSchemeEdgeIsFork):
            assert row.rlnSchemeEdgeOutputNodeNameIfTrue in nodes and row.rlnSchemeEdgeBooleanVariable in bools


def _walk(tables: dict, root: Path) -> list[str]:
    """Run the scheme like relion_schemer does and return the tasks RELION 5 would start."""
    bools = {r.rlnSchemeBooleanVariableName: bool(int(r.rlnSchemeBooleanVariableValue))
             for r in tables["scheme_bools"].itertuples()}
    ops = {r.rlnSchemeOperatorName: r for r in tables["scheme_operators"].itertuples()}
    modes = {r.rlnSchemeJobNameOriginal: r.rlnSchemeJobMode for r in tables["scheme_jobs"].itertuples()}
    edges = {r.rlnSchemeEdgeInputNodeName: r for r in tables["scheme_edges"].itertuples()}
    started: set[str] = set()
    node = _first(tables["scheme_general"], "rlnSchemeCurrentNodeName")
    tasks: list[str] = []
    for _ in range(50):
        if node in ops:
            op = ops[node]
            if op.rlnSchemeOperatorType == "exit":
                return tasks
            assert op.rlnSchemeOperatorType == "bool=set"
            bools[op.rlnSchemeOperatorOutput] = bools[op.rlnSchemeOperatorInput1]
        else:
            label, options = read_job_star(root / "Schemes/dynamight" / node / "job.star")
            values = {k: ("Yes" if bools[v[2:]] else "No") if v.startswith("$$") and v[2:] in bools else v
                      for k, v in options.items()}
            is_continue = node in started and modes[node] == "continue"
            started.add(node)
            if label["JobTypeLabel"] == "dynamight":
                ticked = [t for t in ("do_visualize", "do_inverse", "do_reconstruct") if values[t] == "Yes"]
                if not is_continue:
                    tasks.append("optimize-deformations")
                else:  # RELION refuses zero or several tasks on continue
                    assert len(ticked) == 1, ticked
                    tasks.append({"do_inverse": "optimize-inverse-deformations",
                                  "do_reconstruct": "deformable-backprojection",
                                  "do_visualize": "explore-latent-space"}[ticked[0]])
            else:
                tasks.append(label["JobTypeLabel"])
                assert values["fn_in"] == "Schemes/dynamight/dynamight/backprojection/map_half1.mrc"
        edge = edges[node]
        node = (edge.rlnSchemeEdgeOutputNodeNameIfTrue if int(edge.rlnSchemeEdgeIsFork) and
                bools[edge.rlnSchemeEdgeBooleanVariable] else edge.rlnSchemeEdgeOutputNodeName)
    raise AssertionError("scheme does not reach EXIT")


def test_scheme_runs_train_inverse_backprojection_postprocess(tmp_path: Path) -> None:
    root = _write_all(tmp_path)
    assert _walk(_scheme_tables(root), root) == [
        "optimize-deformations", "optimize-inverse-deformations", "deformable-backprojection",
        "relion.postprocess"]
    scheme, jobs = dynamight_scheme()
    assert scheme.jobs["dynamight"] == "continue"
    assert jobs["postprocess"][1]["fn_mask"] == "$$mask"


def test_external_definitions_name_real_options(tmp_path: Path) -> None:
    from relion_dynamight.cli import cli
    from relion_dynamight.relion.external import SPECS, _click_option

    root = _write_all(tmp_path)
    for stem, (command, params, _) in EXTERNAL_JOBS.items():
        _, options = read_job_star(root / f"External/dynamight_{stem}/job.star")
        assert options["fn_exe"] == f"relion_dynamight external {command}"
        assert command in SPECS and command in cli.commands
        missing = [label for label, _ in params if label != "dynamight_job"
                   and _click_option(cli.commands[command], label) is None]
        if command == "simulate":
            assert missing == []
        elif missing:
            pytest.skip(f"{command} does not have options {missing} yet (issue 5 work in progress)")


def test_install_is_idempotent_and_touches_nothing_else(tmp_path: Path) -> None:
    (tmp_path / "default_pipeline.star").write_text("data_pipeline_general\n_rlnPipeLineJobCounter 1\n")
    (tmp_path / ".gui_dynamightjob.star").write_text("my own settings\n")
    (tmp_path / "Schemes" / "prep").mkdir(parents=True)
    (tmp_path / "Schemes" / "prep" / "scheme.star").write_text("prep\n")
    result = run_cli("install-relion-gui", "--project", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "kept your own" in result.stdout
    assert (tmp_path / ".gui_dynamightjob.star").read_text() == "my own settings\n"
    assert (tmp_path / "Schemes/prep/scheme.star").read_text() == "prep\n"
    assert (tmp_path / "default_pipeline.star").read_text().startswith("data_pipeline_general")
    for rel, text in gui_files().items():
        if rel != ".gui_dynamightjob.star":
            assert (tmp_path / rel).read_text() == text
    written, kept = install(tmp_path)
    assert written == [] and kept == [tmp_path / ".gui_dynamightjob.star"]
    written, kept = install(tmp_path, force=True)
    assert written == [tmp_path / ".gui_dynamightjob.star"] and kept == []
    assert not (tmp_path / "RELION_JOB_EXIT_SUCCESS").exists()


def test_install_into_missing_directory_fails_clearly(tmp_path: Path) -> None:
    result = run_cli("install-relion-gui", "--project", str(tmp_path / "nope"))
    assert result.returncode != 0 and "no such directory" in result.stderr
