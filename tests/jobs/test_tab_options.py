"""Issue 13 (0b): RELION 5 appends the tab's Additional arguments to every task of a DynaMight job, and runs the
next task within a second of the previous exit file.  Every tab task accepts the other tasks' options (ignored
with a note), the tab's own fields win over a repeated option, and task-specific spellings are never ambiguous."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from relion_dynamight.launcher import normalize_argv
from relion_dynamight.relion import relion5_lines
from relion_dynamight.relion.jobdir import EXIT_FAILURE, EXIT_FILES, EXIT_SUCCESS
from relion_dynamight.tab_options import FLAG, MULTIPLE, VALUE, reconcile
from runs import run_cli, wait_for

OWN = {"--n-epochs": VALUE, "--batch-size": VALUE, "--preload-images": FLAG, "--axis-range": MULTIPLE}
OTHERS = {**OWN, "--n-gaussians": VALUE, "--no-gui": FLAG, "--seed": VALUE}


def test_other_tasks_options_are_dropped_with_their_values() -> None:
    args, notes = reconcile(["JOB", "--n-gaussians", "500", "--no-gui", "--batch-size", "4", "--seed=3"], OWN,
                            OTHERS)
    assert args == ["JOB", "--batch-size", "4"]
    assert len(notes) == 3 and all("another DynaMight task" in n for n in notes)
    assert "--n-gaussians 500" in notes[0] and "--seed=3" in notes[2]


def test_the_first_of_a_repeated_option_wins_and_multiple_options_are_kept() -> None:
    args, notes = reconcile(["J", "--n-epochs", "200", "--preload-images", "--n-epochs", "8", "--preload-images",
                             "--axis-range", "1:0:1", "--axis-range", "2::0", "--batch-size=5", "--batch-size", "9"],
                            OWN, OTHERS)
    assert args == ["J", "--n-epochs", "200", "--preload-images", "--preload-images", "--axis-range", "1:0:1",
                    "--axis-range", "2::0", "--batch-size=5"]
    assert [n.split(":")[0] for n in notes] == ["ignored the repeated --n-epochs 8",
                                                "ignored the repeated --batch-size 9"]


def test_unknown_options_still_fail_and_positionals_pass() -> None:
    args, notes = reconcile(["DynaMight/job012/", "--no-such-thing", "1", "--", "--n-gaussians"], OWN, OTHERS)
    assert args == ["DynaMight/job012/", "--no-such-thing", "1", "--", "--n-gaussians"] and notes == []


def _params(line: str) -> tuple[dict, list[str]]:
    """Parse a RELION 5 line as the executable does (group context, so the other tasks are known)."""
    from relion_dynamight.cli import cli

    argv = normalize_argv(shlex.split(line)[1:])
    group_ctx = cli.make_context("relion_dynamight", list(argv))
    name, command, rest = cli.resolve_command(group_ctx, list(argv))
    ctx = command.make_context(name, rest, parent=group_ctx)
    return ctx.params, ctx.meta.get("relion_dynamight.tab_notes", [])


@pytest.mark.parametrize("other", ["--n-epochs 8", "--n-epochs 8 --batch-size 64 --n-gaussians 3000 --no-gui"])
def test_relion5_lines_with_additional_arguments_parse_for_every_task(other: str) -> None:
    new = relion5_lines.new_job(other=other)
    params, _ = _params(new)
    assert params["n_epochs"] == 8
    inverse, notes = _params(relion5_lines.continue_job("inverse", epochs=200, other=other))
    assert inverse["n_epochs"] == 200 and any("repeated --n-epochs 8" in n for n in notes)
    back, notes = _params(relion5_lines.continue_job("backprojection", batch=10, other=other))
    assert back["batch_size"] == 10 and any("--n-epochs 8" in n for n in notes)
    explore, _ = _params(relion5_lines.continue_job("visualize", other=other))
    assert explore["half_set"] == 1


def test_task_specific_epoch_spellings() -> None:
    params, _ = _params(relion5_lines.new_job(other="--training-epochs 4 --inverse-epochs 30"))
    assert params["training_epochs"] == 4
    params, notes = _params(relion5_lines.continue_job("inverse", epochs=200,
                                                       other="--training-epochs 4 --inverse-epochs 30"))
    assert params["inverse_epochs"] == 30 and any("--training-epochs 4" in n for n in notes)


@pytest.mark.slow
def test_pipeliner_sequence_in_one_job_directory(tmp_path: Path) -> None:
    """New job, Continue → inverse, Continue → reconstruction, each started as soon as the previous exit file
    exists (as relion_schemer does), all with Additional arguments "--n-epochs 2": every task succeeds, the
    inverse runs its own 3 epochs, and no finished task's watchdog writes FAILURE into a later task's run."""
    project = tmp_path / "proj"
    sim = run_cli("simulate", "--o", str(project), "--n-particles", "160", "--box", "24", "--seed", "4", timeout=300)
    assert sim.returncode == 0, sim.stderr
    job = "DynaMight/job003/"
    other = "--n-epochs 2 --seed 1"
    lines = [relion5_lines.new_job(150, gpu="", other=other, job=job, star="Refine3D/job001/run_data.star",
                                   volume="Refine3D/job001/run_class001.mrc"),
             relion5_lines.continue_job("inverse", epochs=3, gpu="", other=other, job=job),
             relion5_lines.continue_job("backprojection", batch=25, gpu="", other=other, job=job)]
    outputs, previous = [], None
    for line in lines:
        proc = subprocess.Popen([sys.executable, "-m", "relion_dynamight.launcher", *shlex.split(line)[1:]],
                                cwd=project, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        if previous is not None:
            # the event that mattered in RELION 5: this task runs, the previous task's watchdog wakes up
            wait_for(lambda: _lock_pid(project / job) == proc.pid or proc.poll() is not None, "the task's lock")
            wait_for(lambda: not _watchdogs_of(previous), "the previous task's watchdog to finish")
            assert not (project / job / EXIT_FAILURE).exists(), "a finished task's watchdog wrote FAILURE"
        out, err = proc.communicate(timeout=900)
        outputs.append(out)
        exits = {n for n in EXIT_FILES if (project / job / n).exists()}
        assert proc.returncode == 0 and exits == {EXIT_SUCCESS}, (line, exits, err[-2000:])
        previous = proc.pid
    assert "epoch 2/2" in outputs[0] and "epoch 3/3" not in outputs[0]
    assert "Note: ignored the repeated --n-epochs 2" in outputs[1]
    assert "Note: ignored --n-epochs 2" in outputs[2]
    assert any("epoch" in x and "/3" in x for x in outputs[1].splitlines()), outputs[1][-2000:]
    wait_for(lambda: not _watchdogs_of(previous), "the last watchdog to finish")
    assert {n for n in EXIT_FILES if (project / job / n).exists()} == {EXIT_SUCCESS}


def _lock_pid(job: Path) -> int | None:
    try:
        return int(json.loads((job / ".relion_dynamight.lock").read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def _watchdogs_of(pid: int) -> list[int]:
    """PIDs of running watchdogs of process ``pid`` (``python -m relion_dynamight.relion.watchdog PID DIR``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"relion_dynamight.relion.watchdog" in cmd and str(pid).encode() in cmd:
                found.append(int(entry.name))
    return found


@pytest.mark.parametrize("task,option,action", [
    ("deformable-backprojection", "--data-loader-threads 4", "ignored"),
    ("deformable-backprojection", "--downsample 2", "refused"),
    ("deformable-backprojection", "--n-warmup-epochs 5", "ignored"),      # the original's training option
    ("visualize", "--n-workers 8", "ignored"),
    ("visualize", "--cluster", "refused"),
    ("new", "--particle-diameter 200", "refused"),
    ("new", "--n-workers 4", "ignored"),
    ("inverse", "--add-noise", "refused"),
])
def test_the_originals_options(task: str, option: str, action: str) -> None:
    """Issue 13 (2): an option of the original DynaMight is ignored with a note where it changes nothing here,
    and refused with one line saying what to use instead where it would change the result."""
    import click

    line = (relion5_lines.new_job(other=option) if task == "new"
            else relion5_lines.continue_job(task if task != "deformable-backprojection" else "backprojection",
                                            other=option))
    if action == "refused":
        with pytest.raises(click.UsageError, match=f"{option.split()[0]}.*original DynaMight.*no equivalent"):
            _params(line)
    else:
        _, notes = _params(line)
        assert any(option.split()[0] in n and "original DynaMight" in n for n in notes), notes


def test_every_original_option_is_in_the_table_or_ours() -> None:
    """The original's Typer options (3dem/DynaMight 358db04) per task: ours under the same name, or in the table."""
    from relion_dynamight.cli import cli
    from relion_dynamight.tab_options import ORIGINAL_OPTIONS, option_kinds

    original = {
        "optimize-deformations": "refinement-star-file output-directory initial-model atomic-model initial-threshold "
        "initial-resolution mask-file checkpoint-file n-gaussians n-gaussian-widths n-latent-dimensions "
        "n-positional-encoding-dimensions n-linear-layers n-neurons-per-layer n-warmup-epochs weight-decay "
        "consensus-update-rate consensus-update-decay consensus-update-pooled-particles regularization-factor "
        "apply-bfactor particle-diameter soft-edge-width batch-size gpu-id n-epochs n-threads preload-images "
        "n-workers combine-resolution use-data-normalization kld-factor",
        "optimize-inverse-deformations": "refinement-star-file checkpoint-file batch-size n-epochs gpu-id "
        "preload-images add-noise particle-diameter mask-soft-edge-width data-loader-threads save-deformations",
        "deformable-backprojection": "mask-file refinement-star-file vae-directory inverse-deformation-directory "
        "gpu-id batch-size backprojection-batch-size preload-images particle-diameter mask-soft-edge-width "
        "data-loader-threads downsample mask-reconstruction do-deformations",
        "explore-latent-space": "refinement-star-file checkpoint-file half-set mask-file particle-diameter "
        "soft-edge-width batch-size gpu-id preload-images n-workers dimensionality-reduction-method "
        "inverse-deformation atomic-model reduce-by-deformation cluster",
    }
    for task, names in original.items():
        ours = option_kinds(cli.commands[task].params)
        missing = [n for n in names.split() if f"--{n}" not in ours and f"--{n}" not in ORIGINAL_OPTIONS[task]]
        assert not missing, (task, missing)
