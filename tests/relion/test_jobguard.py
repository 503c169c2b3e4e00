"""Issue 12 (items 3–5): one task per job directory, only DynaMight directories, signals as clusters send them,
and a closed stdout — through real processes, process groups and wrappers; tests wait for events (a lock file,
a line in the log), never for durations."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relion_dynamight.relion import jobguard
from relion_dynamight.relion.jobdir import EXIT_ABORTED, EXIT_FAILURE, EXIT_FILES, EXIT_SUCCESS
from relion_dynamight.relion.watchdog import watch
from runs import wait_for

LAUNCHER = [sys.executable, "-m", "relion_dynamight.launcher"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def exit_files(job: Path) -> set[str]:
    return {n for n in EXIT_FILES if (job / n).exists()}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from relion_dynamight.jobs.simulate import simulate_project

    root = tmp_path_factory.mktemp("guard") / "project"
    simulate_project(root, n_particles=200, box=24, pixel_size=3.0, snr=1.0, seed=2)
    return root


def slow_task_script(tmp_path: Path, job: Path) -> Path:
    """A task under the real launcher protocol that runs until aborted (the launcher takes the lock)."""
    script = tmp_path / "slow_launch.py"
    script.write_text(
        "import sys, time\n"
        "from relion_dynamight import launcher\n"
        "from relion_dynamight.jobs.runner import run_task\n"
        "def task(job):\n"
        "    print('task running', flush=True)\n"
        "    while True:\n"
        "        time.sleep(0.05); job.check_abort()\n"
        "launcher._main = lambda args, real: run_task('slow', sys.argv[2], task)\n"
        "sys.exit(launcher.main())\n")
    return script


def start_slow(tmp_path: Path, job: Path, wrapper: list[str] | None = None) -> subprocess.Popen:
    script = slow_task_script(tmp_path, job)
    cmd = [*(wrapper or []), sys.executable, str(script), "--pipeline-control", str(job)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    wait_for(lambda: (job / jobguard.LOCK_NAME).exists(), "the task's lock", timeout=240)
    line = proc.stdout.readline()
    while line and "task running" not in line:
        line = proc.stdout.readline()
    return proc


# -- the lock ---------------------------------------------------------------------------------------------------
def test_second_run_in_the_same_directory_is_refused(project: Path, tmp_path: Path) -> None:
    """Two real runs: the second is refused with one line and writes nothing into the first one's directory."""
    job = project / "Guard" / "job001"
    first = start_slow(tmp_path, job)
    try:
        held = json.loads((job / jobguard.LOCK_NAME).read_text())
        assert held["pid"] == first.pid
        second = subprocess.run([*LAUNCHER, "reconstruct", "--i", "Refine3D/job001/run_data.star", "--o",
                                 str(job / "map.mrc"), "--pipeline-control", str(job)], cwd=project, env=ENV,
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 1
        lines = [x for x in second.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("ERROR:") and "in use" in lines[0], second.stderr
        assert str(first.pid) in lines[0] and jobguard.LOCK_NAME in lines[0]
        assert exit_files(job) == set() and not (job / "map.mrc").exists()
        assert json.loads((job / jobguard.LOCK_NAME).read_text())["pid"] == first.pid
    finally:
        os.killpg(first.pid, signal.SIGTERM)
        first.wait(timeout=60)
    assert exit_files(job) == {EXIT_ABORTED}
    assert not (job / jobguard.LOCK_NAME).exists()          # released after the exit file


def test_stale_lock_is_explained_and_taken_over(project: Path, tmp_path: Path) -> None:
    job = project / "Guard" / "job002"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    job.mkdir(parents=True)
    (job / jobguard.LOCK_NAME).write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "ticks": "1",
                                                      "started": 0.0, "command": "reconstruct"}))
    res = subprocess.run([*LAUNCHER, "reconstruct", "--i", "Refine3D/job001/run_data.star", "--o",
                          str(job / "map.mrc"), "--pipeline-control", str(job)], cwd=project, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "stale lock" in res.stderr and str(dead.pid) in res.stderr and "no longer running" in res.stderr
    assert exit_files(job) == {EXIT_SUCCESS} and not (job / jobguard.LOCK_NAME).exists()


def test_watchdog_never_writes_into_a_later_tasks_run(tmp_path: Path) -> None:
    """Issue 13 (a): the training's watchdog wakes after the next task (inverse) has started in the same
    directory and removed the stale exit files: it must leave that task's run alone."""
    job = tmp_path / "job"
    job.mkdir()
    earlier = subprocess.Popen([sys.executable, "-c", "pass"])
    earlier.wait()
    later = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ticks = Path(f"/proc/{later.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        (job / jobguard.LOCK_NAME).write_text(json.dumps({"host": os.uname().nodename, "pid": later.pid,
                                                          "ticks": ticks, "started": time.time(), "command": "x"}))
        assert watch(earlier.pid, job, poll=0.01) is False
        assert exit_files(job) == set()
        # without a later task, a silent death still ends with FAILURE (and its own lock is cleared)
        (job / jobguard.LOCK_NAME).write_text(json.dumps({"host": os.uname().nodename, "pid": earlier.pid,
                                                          "ticks": "1", "started": 0.0, "command": "x"}))
        assert watch(earlier.pid, job, poll=0.01) is True
        assert exit_files(job) == {EXIT_FAILURE} and not (job / jobguard.LOCK_NAME).exists()
    finally:
        later.kill()
        later.wait()


# -- foreign directories ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["optimize-deformations", "optimize-inverse-deformations", "reconstruct"])
def test_another_jobs_directory_is_refused_untouched(project: Path, tmp_path: Path, command: str) -> None:
    root = tmp_path / "p"
    shutil.copytree(project, root, symlinks=True)
    refine = root / "Refine3D" / "job001"
    before = {p.name: p.read_bytes() for p in refine.iterdir()}
    assert EXIT_SUCCESS in before
    argv = {"optimize-deformations": ["optimize-deformations", "--refinement-star-file",
                                      "Refine3D/job001/run_data.star", "--initial-model",
                                      "Refine3D/job001/run_class001.mrc", "--output-directory", "Refine3D/job001/"],
            "optimize-inverse-deformations": ["optimize-inverse-deformations", "Refine3D/job001/"],
            "reconstruct": ["reconstruct", "--i", "Refine3D/job001/run_data.star", "--o", "x.mrc",
                            "--pipeline-control", "Refine3D/job001/"]}[command]
    res = subprocess.run([*LAUNCHER, *argv], cwd=root, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "not a DynaMight job" in lines[0], res.stderr
    assert {p.name: p.read_bytes() for p in refine.iterdir()} == before      # exit file and all: untouched


def test_foreign_directory_reasons(tmp_path: Path) -> None:
    (tmp_path / "Other" / "job003").mkdir(parents=True)
    (tmp_path / "Other" / "job003" / "job.star").write_text("data_job\n_rlnJobTypeLabel relion.class3d\n")
    (tmp_path / "Mine" / "job004").mkdir(parents=True)
    (tmp_path / "Mine" / "job004" / "run_it025_data.star").write_text("")
    (tmp_path / "Ext" / "job005").mkdir(parents=True)
    (tmp_path / "Ext" / "job005" / "job.star").write_text("data_job\n_rlnJobTypeLabel relion.external\n")
    (tmp_path / "default_pipeline.star").write_text(
        "data_pipeline_processes\nloop_\n_rlnPipeLineProcessName #1\n_rlnPipeLineProcessAlias #2\n"
        "_rlnPipeLineProcessTypeLabel #3\n_rlnPipeLineProcessStatusLabel #4\n"
        "Named/job006/ None relion.postprocess Succeeded\nDynaMight/job007/ None relion.dynamight Running\n")
    assert "relion.class3d" in jobguard.foreign_job_reason(tmp_path / "Other" / "job003", tmp_path)
    assert "run_it025_data.star" in jobguard.foreign_job_reason(tmp_path / "Mine" / "job004", tmp_path)
    assert "relion.postprocess" in jobguard.foreign_job_reason(tmp_path / "Named" / "job006", tmp_path)
    assert "Refine3D" in jobguard.foreign_job_reason(Path("Refine3D/job010"), tmp_path)
    for ours in ("Ext/job005", "DynaMight/job007", "DynaMight/job099", "Anything/else"):
        assert jobguard.foreign_job_reason(tmp_path / ours, tmp_path) is None, ours


# -- signals as clusters send them ------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["twice-to-the-group", "sigint", "sighup", "timeout-wrapper", "forwarding-shell"])
def test_signals_end_aborted_without_traceback(project: Path, tmp_path: Path, how: str) -> None:
    job = project / "Signals" / how
    wrapper = {"timeout-wrapper": ["timeout", "--signal=TERM", "600"],
               "forwarding-shell": ["bash", "-c", 'trap \'kill -TERM $child\' TERM; "$@" & child=$!; wait $child; '
                                                  'wait $child', "sh"]}.get(how)
    proc = start_slow(tmp_path, job, wrapper)
    group = os.getpgid(proc.pid)
    if how == "twice-to-the-group":        # scancel / mpiexec: the whole process group, and once more
        os.killpg(group, signal.SIGTERM)
        os.killpg(group, signal.SIGTERM)
    elif how == "sigint":
        os.killpg(group, signal.SIGINT)
    elif how == "sighup":
        os.killpg(group, signal.SIGHUP)
    else:                                  # the wrapper gets the signal and forwards it
        os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    wait_for(lambda: exit_files(job) == {EXIT_ABORTED}, "ABORTED", timeout=30)
    assert "Traceback" not in err and "Traceback" not in out, err
    assert not (job / jobguard.LOCK_NAME).exists()


# -- a closed stdout ------------------------------------------------------------------------------------------------
def test_closed_stdout_pipe_gives_no_traceback(project: Path) -> None:
    job = project / "Pipe" / "job001"
    cmd = " ".join([*LAUNCHER, "reconstruct", "--i", "Refine3D/job001/run_data.star", "--o", str(job / "map.mrc"),
                    "--pipeline-control", str(job)])
    res = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd} 2>err.txt | head -c 1 >/dev/null; true"],
                         cwd=project, env=ENV, capture_output=True, text=True, timeout=300)
    err = (project / "err.txt").read_text()
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert exit_files(job) == {EXIT_SUCCESS}, (res.stderr, err)
