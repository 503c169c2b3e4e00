"""Job-directory protocol (relion-facts §2): exit files, abort, output nodes, import failure."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relion_dynamight.errors import InputError
from relion_dynamight.jobs.runner import run_task
from relion_dynamight.relion.jobdir import (ABORT_NOW, EXIT_ABORTED, EXIT_FAILURE, EXIT_SUCCESS, Job,
                                            job_dir_from_argv, read_output_nodes, write_output_nodes)

NODE = "DynaMight/job012/backprojection/map_half1.mrc"
LABEL = "DensityMap.mrc.relion.halfmap.dynamight"


def exit_files(job_dir: Path) -> set[str]:
    return {p.name for p in job_dir.iterdir() if p.name.startswith("RELION_JOB_EXIT")}


def _map(path: Path, values) -> Path:  # noqa: ANN001
    import numpy as np

    from relion_dynamight.relion.mrc import write_map

    path.parent.mkdir(parents=True, exist_ok=True)
    write_map(path, np.asarray(values, dtype=np.float32), 1.0)
    return path


def test_success_writes_nodes_then_one_exit_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    monkeypatch.chdir(tmp_path)
    _map(tmp_path / NODE, np.random.default_rng(0).normal(size=(8, 8, 8)))
    (tmp_path / EXIT_FAILURE).touch()  # stale file from an earlier run
    (tmp_path / ABORT_NOW).touch()
    code = run_task("t", tmp_path, lambda job: [(NODE, LABEL)])
    assert code == 0
    assert exit_files(tmp_path) == {EXIT_SUCCESS}
    assert not (tmp_path / ABORT_NOW).exists()
    assert read_output_nodes(tmp_path) == [(NODE, LABEL)]


def test_input_error_writes_failure_and_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def task(job: Job) -> None:
        raise InputError("particles.star: column rlnDefocusU missing; run CTF estimation first")

    assert run_task("t", tmp_path, task) == 1
    assert exit_files(tmp_path) == {EXIT_FAILURE}
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ERROR: particles.star: column rlnDefocusU missing; run CTF estimation first"]


def test_crash_writes_failure(tmp_path: Path) -> None:
    def task(job: Job) -> None:
        raise RuntimeError("boom")

    assert run_task("t", tmp_path, task) == 1
    assert exit_files(tmp_path) == {EXIT_FAILURE}


def test_abort_file_is_honoured_between_batches(tmp_path: Path) -> None:
    seen = []

    def task(job: Job) -> None:
        for i in range(100):
            if i == 3:
                (tmp_path / ABORT_NOW).touch()
            job.check_abort()
            seen.append(i)

    assert run_task("t", tmp_path, task) == 3
    assert seen == [0, 1, 2]
    assert exit_files(tmp_path) == {EXIT_ABORTED}


def test_output_nodes_legacy_format(tmp_path: Path) -> None:
    write_output_nodes(tmp_path, [(NODE, LABEL)], legacy=True)
    text = (tmp_path / "RELION_OUTPUT_NODES.star").read_text()
    assert "_rlnPipeLineNodeType #2" in text and f"{NODE} 10" in text


@pytest.mark.parametrize("argv,expected", [
    (["optimize-deformations", "--output-directory", "D/job1/", "--pipeline-control", "D/job2/"], "D/job2"),
    (["optimize-deformations", "--output-directory", "D/job1/"], "D/job1"),
    (["deformable-backprojection", "D/job3/", "--batch-size", "10"], "D/job3"),
    (["reconstruct", "--i", "a.star", "--o", "m.mrc"], None),
    (["simulate", "--o", "x", "--pipeline_control", "E/job4/"], "E/job4"),
])
def test_job_dir_from_argv(argv: list[str], expected: str | None) -> None:
    found = job_dir_from_argv(argv)
    assert (str(found) if found else None) == expected


@pytest.mark.parametrize("module", ["click", "numpy", "torch"])
def test_import_failure_still_writes_failure(tmp_path: Path, module: str) -> None:
    """A broken installation (a dependency made unimportable) must leave FAILURE, not a 'Running' job."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / f"{module}.py").write_text("raise ImportError('simulated broken install')\n")
    job = tmp_path / "DynaMight" / "job001"
    env = {**os.environ, "PYTHONPATH": f"{shadow}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "relion_dynamight.launcher", "deformable-backprojection",
                           str(job), "--batch-size", "10", "--pipeline-control", f"{job}/"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "simulated broken install" in proc.stderr
    assert exit_files(job) == {EXIT_FAILURE}


def test_usage_error_writes_failure(tmp_path: Path) -> None:
    job = tmp_path / "job"
    proc = subprocess.run([sys.executable, "-m", "relion_dynamight.launcher", "deformable-backprojection",
                           str(job), "--no-such-option", "--pipeline-control", str(job)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "no-such-option" in proc.stderr
    assert exit_files(job) == {EXIT_FAILURE}


def test_sigterm_becomes_aborted(tmp_path: Path) -> None:
    """SIGTERM (scancel, queue kill) ends the task promptly with ABORTED written."""
    script = tmp_path / "slow.py"
    script.write_text(
        "import sys, time\n"
        "from relion_dynamight.jobs.runner import run_task\n"
        "def task(job):\n"
        "    while True:\n"
        "        time.sleep(0.05); job.check_abort()\n"
        f"sys.exit(run_task('slow', {str(tmp_path)!r}, task))\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while "started" not in (proc.stdout.readline().decode() if proc.stdout else "") and time.monotonic() < deadline:
        pass
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert time.monotonic() - start < 10
    assert exit_files(tmp_path) == {EXIT_ABORTED}


@pytest.mark.parametrize("content,said", [("nan", "NaN or Inf"), ("zero", "all zero"), ("constant", "constant (3)"),
                                          ("missing", "was not written"), ("empty-star", "no rows")])
def test_no_success_with_garbage_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture, content: str, said: str) -> None:
    """Issue 12: every task's declared outputs (and the files it asks to check) are checked before SUCCESS."""
    import numpy as np

    monkeypatch.chdir(tmp_path)
    target = tmp_path / ("out.star" if content == "empty-star" else "out.mrc")
    values = {"nan": np.full((6, 6, 6), np.nan), "zero": np.zeros((6, 6, 6)), "constant": np.full((6, 6, 6), 3.0)}
    if content in values:
        _map(target, values[content])
    elif content == "empty-star":
        target.write_text("data_particles\n\nloop_\n_rlnImageName #1\n")

    def task(job: Job) -> list:
        job.outputs_to_check.append(target)
        return []

    assert run_task("t", tmp_path / "job", task) == 1
    assert exit_files(tmp_path / "job") == {EXIT_FAILURE}
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith("ERROR: output ") and said in err[0], err
