"""Fault injection (issue 7 item 2): SIGKILL/SIGTERM at seeded random moments, then resume.

For each of the three long jobs the command is killed several times at random moments (start-up,
training, checkpoint writing, output writing), the job directory is checked after every kill (each
``.h5`` complete and accepted by the project's own loaders; SIGTERM -> ``RELION_JOB_EXIT_ABORTED``
within 10 s; SIGKILL -> ``RELION_JOB_EXIT_FAILURE`` from the launcher's watchdog), and the rerun must
finish with the result of an uninterrupted run.  Under ``mpiexec -n 2`` one rank is SIGKILLed: the job
must end (no hang) with ``RELION_JOB_EXIT_FAILURE``.

``RELION_DYNAMIGHT_FAULT_SEED`` changes the seed of the kill moments (default 2024).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

import fault_support as fs

FAULT_SEED = int(os.environ.get("RELION_DYNAMIGHT_FAULT_SEED", "2024"))
#: Kills per job (20 in total).
KILLS = {"train": 8, "inverse": 6, "backprojection": 6}
#: Tolerances of "the same result" (float32 arithmetic; in practice the results are bit-identical).
RTOL, ATOL = 1e-5, 1e-6
#: Kill loops run at a time.  1 by default: the 10-s SIGTERM limit is a timing assertion, and two loops side
#: by side on a machine whose cores are already busy slow each job enough to miss it (seen at load 5 on 2
#: cores).  On free cores (CI) ``RELION_DYNAMIGHT_FAULT_JOBS=2`` runs two of the three loops at once.
KILL_WORKERS = max(1, int(os.environ.get("RELION_DYNAMIGHT_FAULT_JOBS", "1")))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return fs.reference_pipeline(tmp_path_factory)


def _kill_and_resume(project, ref_job, times, step) -> fs.KillLog:
    rnd = random.Random(f"{FAULT_SEED}-{step}")
    log = fs.KillLog()
    job = f"DynaMight/job1{fs.STEPS.index(step)}0"
    fs.run_with_kills(project, step, job, ref_job, rnd, KILLS[step], times[step], log)
    return log


@pytest.fixture(scope="module")
def killed(request, reference) -> dict[str, Future]:
    """``{step: Future of its KillLog}``: the selected steps' kill-and-resume loops, ``KILL_WORKERS`` at a time.

    Each loop works in its own job directory and only waits on its own subprocesses; the kill delays are
    drawn from per-step seeded generators, so running the loops side by side changes no draw.
    """
    steps = [item.callspec.params["step"] for item in request.session.items
             if getattr(item, "originalname", "") == "test_kills_then_resume_equals_uninterrupted"
             and item.path == request.path]
    with ThreadPoolExecutor(KILL_WORKERS) as pool:
        return {step: pool.submit(_kill_and_resume, *reference, step) for step in fs.STEPS if step in steps}


@pytest.mark.parametrize("step", fs.STEPS)
def test_kills_then_resume_equals_uninterrupted(reference, killed, step):
    project, ref_job, _ = reference
    log = killed[step].result()
    job = f"DynaMight/job1{fs.STEPS.index(step)}0"
    print(f"{step}: {log.kills()} kills: {log.summary()}")
    assert log.kills() == KILLS[step]
    ref, got = project / ref_job, project / job
    if step == "train":
        diffs = fs.forward_differences(ref, got, RTOL, ATOL)
        exact = fs.forward_differences(ref, got)
    elif step == "inverse":
        diffs = fs.inverse_differences(ref, got, RTOL, ATOL)
        exact = fs.inverse_differences(ref, got)
    else:
        diffs = fs.map_differences(ref, got, RTOL, ATOL)
        exact = fs.map_differences(ref, got)
    assert not diffs, f"resumed {step} differs from the uninterrupted run: {diffs[:10]}"
    print(f"{step}: resumed result bit-identical to the uninterrupted run: {not exact} {exact[:3]}")
    assert (got / fs.EXIT_SUCCESS).exists() and not (got / fs.EXIT_FAILURE).exists()


@pytest.mark.parametrize("step,rank", [("train", 1), ("inverse", 0)])
def test_mpi_one_rank_killed_ends_with_failure(reference, mpiexec, step, rank):
    project, ref_job, times = reference
    rnd = random.Random(f"{FAULT_SEED}-mpi-{step}")
    job = f"DynaMight/job2{fs.STEPS.index(step)}{rank}"
    fs.copy_inputs_for(project, ref_job, job, step)
    delay = rnd.uniform(0.1, 0.4) * times[step]
    code, seconds, exit_file, err = fs.kill_one_rank(project, step, job, mpiexec, rank, delay, timeout=120)
    print(f"mpi {step}: rank {rank} SIGKILLed {delay:.1f} s after start: launcher exit {code} after {seconds:.1f} s, "
          f"exit file {exit_file!r}")
    assert code is not None, f"mpiexec still running 120 s after rank {rank} was killed (hang)"
    assert code != 0
    assert exit_file == fs.EXIT_FAILURE, f"expected {fs.EXIT_FAILURE}, found {exit_file!r}; stderr: {err[-2000:]}"
    assert fs.validate_h5(project / job) == []  # (resuming is covered by the serial test above)


# -- the pieces that make kills safe, in isolation (fast) -------------------------------------------
def test_watchdog_writes_failure_after_a_silent_death(tmp_path):
    from relion_dynamight.relion.watchdog import start_watchdog

    victim = subprocess.Popen(["sleep", "60"])
    dog = start_watchdog(tmp_path, victim.pid)
    time.sleep(0.5)
    victim.kill()
    victim.wait()
    assert dog.wait(timeout=20) == 0
    assert fs.exit_files(tmp_path) == [fs.EXIT_FAILURE]


def test_watchdog_leaves_a_written_exit_file_alone(tmp_path):
    from relion_dynamight.relion.watchdog import start_watchdog

    (tmp_path / fs.EXIT_ABORTED).touch()  # stale, from an earlier run: ignored
    victim = subprocess.Popen(["sleep", "2"])
    dog = start_watchdog(tmp_path, victim.pid)
    time.sleep(1.0)
    (tmp_path / fs.EXIT_ABORTED).unlink()
    (tmp_path / fs.EXIT_SUCCESS).touch()
    victim.wait()
    assert dog.wait(timeout=20) == 0
    assert fs.exit_files(tmp_path) == [fs.EXIT_SUCCESS]


def watchdog_of(pid: int) -> bool:
    """The launcher ``pid`` has started its watchdog (other children, e.g. ``ldconfig`` run by ctypes'
    ``find_library`` before the SIGTERM handler is set, do not count)."""
    for child in fs.descendants(pid):
        try:
            if b"relion_dynamight.relion.watchdog" in Path(f"/proc/{child}/cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


def test_sigterm_while_starting_writes_aborted(tmp_path):
    """SIGTERM during the imports (before the job protocol is up) still leaves ABORTED, within 10 s."""
    (tmp_path / "in.star").write_text("data_\n")
    job = tmp_path / "job"
    proc = subprocess.Popen([sys.executable, "-m", "relion_dynamight.launcher", "deformable-backprojection",
                             str(job), "--pipeline-control", str(job)], env={**os.environ, **fs.ENV},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not watchdog_of(proc.pid) and time.monotonic() < deadline:  # the watchdog: handlers are set
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=10)
    assert time.monotonic() - t0 < 10
    assert proc.returncode == 3, err[-2000:]
    assert fs.exit_files(job) == [fs.EXIT_ABORTED]
