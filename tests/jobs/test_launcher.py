"""Command lines as RELION 5 builds them: whitespace, empty GPU field, both pipeline-control spellings."""

from __future__ import annotations

import shlex

import pytest

from relion_dynamight.launcher import normalize_argv

NEW_JOB = ("optimize-deformations  --refinement-star-file Refine3D/job034/run_data.star --output-directory "
           "DynaMight/job067/ --initial-model Refine3D/job034/run_class001.mrc --n-gaussians 8000 "
           "--regularization-factor 1 --n-threads 4 --gpu-id   --pipeline-control DynaMight/job067/")


def test_empty_gpu_field_gets_empty_value() -> None:
    args = normalize_argv(shlex.split(NEW_JOB))
    i = args.index("--gpu-id")
    assert args[i + 1] == "" and args[i + 2] == "--pipeline-control"


def test_trailing_gpu_flag_gets_empty_value() -> None:
    assert normalize_argv(["explore-latent-space", "D/", "--gpu-id"])[-1] == ""


def test_surplus_whitespace_is_ignored() -> None:
    assert normalize_argv(["optimize-inverse-deformations", " D/job1/ ", "--save-deformations ", "  "]) == [
        "optimize-inverse-deformations", "D/job1/", "--save-deformations"]


@pytest.mark.parametrize("flag", ["--pipeline-control", "--pipeline_control"])
def test_both_pipeline_control_spellings_are_options(flag: str) -> None:
    from click.testing import CliRunner

    from relion_dynamight.cli import cli

    result = CliRunner().invoke(cli, ["reconstruct", "--help"])
    assert result.exit_code == 0 and "--pipeline-control" in result.output
    parsed = cli.commands["reconstruct"].make_context("reconstruct", ["--i", "a", "--o", "b", flag, "J/"])
    assert str(parsed.params["pipeline_control"]) == "J"
