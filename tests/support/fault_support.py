"""Shared machinery of the fault-injection and determinism tests (engineer J, issue 7 items 2 and 5).

A tiny simulated project (150 particles, box 24, 100 Gaussians) is taken through the three long-running
jobs -- ``optimize-deformations``, ``optimize-inverse-deformations``, ``deformable-backprojection`` --
as real subprocesses on the CPU with a fixed ``--seed``.  :func:`reference_pipeline` caches one
uninterrupted run per pytest session so both test files share it.

Kills: :func:`run_with_kills` starts a job, sends SIGKILL or SIGTERM after a seeded random delay, checks
the job directory (every ``.h5`` complete and valid, ABORTED written promptly after SIGTERM) and repeats;
the job is then run to completion.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import h5py
import numpy as np
import torch

from relion_dynamight.relion.jobdir import EXIT_ABORTED, EXIT_FAILURE, EXIT_FILES, EXIT_SUCCESS

N_PARTICLES, BOX, N_GAUSSIANS = 150, 24, 100
TRAIN_EPOCHS, INVERSE_EPOCHS, SEED = 4, 4, 1
STEPS = ("train", "inverse", "backprojection")
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def make_project(root: Path) -> Path:
    from relion_dynamight.jobs.simulate import simulate_project

    simulate_project(root, n_particles=N_PARTICLES, box=BOX, pixel_size=3.0, snr=1.0, seed=3)
    return root


def step_args(step: str, job: str) -> list[str]:
    """The command line (after ``relion_dynamight``) of ``step`` in job directory ``job`` (relative)."""
    job = job.rstrip("/") + "/"
    if step == "train":
        return ["optimize-deformations", "--refinement-star-file", "Refine3D/job001/run_data.star",
                "--output-directory", job, "--initial-model", "Refine3D/job001/run_class001.mrc",
                "--n-gaussians", str(N_GAUSSIANS), "--n-threads", "1", "--gpu-id", "cpu",
                "--n-epochs", str(TRAIN_EPOCHS), "--batch-size", "32", "--seed", str(SEED), "--pipeline-control", job]
    if step == "inverse":
        return ["optimize-inverse-deformations", job, "--n-epochs", str(INVERSE_EPOCHS), "--batch-size", "16",
                "--seed", str(SEED), "--gpu-id", "cpu", "--pipeline-control", job]
    if step == "backprojection":
        return ["deformable-backprojection", job, "--gpu-id", "cpu", "--pipeline-control", job]
    raise ValueError(step)


def command(step: str, job: str, mpi: list[str] | None = None) -> list[str]:
    return [*(mpi or []), sys.executable, "-m", "relion_dynamight.launcher", *step_args(step, job)]


def run_step(project: Path, step: str, job: str, mpi: list[str] | None = None,
             timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command(step, job, mpi), cwd=project, env={**os.environ, **ENV}, capture_output=True,
                          text=True, timeout=timeout)


def run_pipeline(project: Path, job: str, steps: Iterable[str] = STEPS) -> dict[str, float]:
    """Run ``steps`` uninterrupted in ``project/job``; returns the wall time of each."""
    times = {}
    for step in steps:
        t0 = time.monotonic()
        res = run_step(project, step, job)
        times[step] = time.monotonic() - t0
        assert res.returncode == 0, f"{step} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
        assert (project / job / EXIT_SUCCESS).exists()
    return times


# -- the reference run, shared by test files within one pytest session ------------------------------
_REFERENCE: dict[str, object] = {}
REFERENCE_JOB = "DynaMight/job002"
#: Independent job directories run this many at a time: each job is one single-threaded process that the
#: test only waits for, so two at a time use both cores of a 2-core CI machine (``RELION_DYNAMIGHT_TEST_JOBS``).
WORKERS = max(1, int(os.environ.get("RELION_DYNAMIGHT_TEST_JOBS", "2")))


def run_pipelines(project: Path, jobs: Iterable[str]) -> dict[str, dict[str, float]]:
    """:func:`run_pipeline` for each of ``jobs`` (separate job directories), ``WORKERS`` at a time."""
    jobs = list(jobs)
    with ThreadPoolExecutor(min(WORKERS, len(jobs))) as pool:
        futures = {job: pool.submit(run_pipeline, project, job) for job in jobs}
    return {job: fut.result() for job, fut in futures.items()}


def reference_pipeline(tmp_path_factory, also: Iterable[str] = ()) -> tuple[Path, str, dict[str, float]]:
    """``(project, job, wall times)`` of one uninterrupted run of the three steps (cached per session).

    ``also``: further job directories to run uninterrupted in the same project (cached too); they run
    alongside the reference when it is made in the same call.
    """
    if "project" not in _REFERENCE:
        _REFERENCE["project"] = make_project(tmp_path_factory.mktemp("faultproj"))
        _REFERENCE["times"] = {}
    project: Path = _REFERENCE["project"]  # type: ignore[assignment]
    times: dict[str, dict[str, float]] = _REFERENCE["times"]  # type: ignore[assignment]
    todo = [job for job in dict.fromkeys((REFERENCE_JOB, *also)) if job not in times]
    if todo:
        times.update(run_pipelines(project, todo))
    return project, REFERENCE_JOB, times[REFERENCE_JOB]


def copy_inputs_for(project: Path, reference_job: str, new_job: str, step: str) -> None:
    """Give ``new_job`` the outputs of the steps before ``step`` (copied from the reference job)."""
    src, dst = project / reference_job, project / new_job
    dst.mkdir(parents=True, exist_ok=True)
    if step in ("inverse", "backprojection"):
        shutil.copytree(src / "forward_deformations", dst / "forward_deformations")
    if step == "backprojection":
        shutil.copytree(src / "inverse_deformations", dst / "inverse_deformations")


# -- checks -----------------------------------------------------------------------------------------
def h5_files(job_dir: Path) -> list[Path]:
    return sorted(p for p in job_dir.rglob("*.h5"))


def validate_h5(job_dir: Path) -> list[str]:
    """Problems of the ``.h5`` files in a job (empty = every one opens and passes the project's checks)."""
    from relion_dynamight.training.trained import load_inverse
    from relion_dynamight.training.checkpoint import load_checkpoint

    problems = []
    for path in h5_files(job_dir):
        try:
            with h5py.File(path, "r") as f:
                assert f.attrs.get("complete", False), "no 'complete' attribute"
            if path.parent.name == "checkpoints":
                load_checkpoint(path)
            elif path.parent.name == "inverse_deformations":
                load_inverse(path)
        except Exception as exc:  # noqa: BLE001 - every problem is reported
            problems.append(f"{path}: {type(exc).__name__}: {exc}")
    return problems


def exit_files(job_dir: Path) -> list[str]:
    return [name for name in EXIT_FILES if (job_dir / name).exists()]


# -- kills ------------------------------------------------------------------------------------------
@dataclass
class KillRecord:
    step: str
    signal: str
    delay: float              # seconds after the start when the signal was sent
    alive: bool               # the process was still running (else the run had already finished)
    exit_code: int | None = None
    exit_seconds: float = 0.0  # from the signal to the end of the process
    exit_file: str = ""


@dataclass
class KillLog:
    records: list[KillRecord] = field(default_factory=list)

    def kills(self) -> int:
        """Signals that hit a running, unfinished job."""
        return sum(r.alive and r.exit_file != EXIT_SUCCESS for r in self.records)

    def summary(self) -> str:
        return "; ".join(f"{r.step} {r.signal}@{r.delay:.1f}s->{r.exit_code}/{r.exit_file or '-'}"
                         f"({r.exit_seconds:.1f}s)" for r in self.records)


def finished(job_dir: Path, step: str) -> bool:
    """The step's final output exists (a later kill could not interrupt anything)."""
    from relion_dynamight.training.checkpoint import final_path

    if step == "train":
        return (job_dir / "forward_deformations" / "latent_space.star").exists() and final_path(job_dir).exists()
    return (job_dir / EXIT_SUCCESS).exists()


def kill_once(project: Path, step: str, job: str, sig: signal.Signals, delay: float,
              term_limit: float = 10.0) -> KillRecord:
    """Start ``step``, send ``sig`` after ``delay`` seconds, wait for the end, check the job directory."""
    job_dir = project / job
    proc = subprocess.Popen(command(step, job), cwd=project, env={**os.environ, **ENV},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        proc.wait(timeout=delay)
        alive = False
    except subprocess.TimeoutExpired:
        alive = True
    rec = KillRecord(step, sig.name, delay, alive)
    if alive:
        t0 = time.monotonic()
        proc.send_signal(sig)
        try:
            proc.wait(timeout=term_limit if sig == signal.SIGTERM else 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rec.exit_seconds = float("inf")
        else:
            rec.exit_seconds = time.monotonic() - t0
    rec.exit_code = proc.returncode
    proc.stderr.close()  # type: ignore[union-attr]
    deadline = time.monotonic() + 5  # after SIGKILL the launcher's watchdog writes FAILURE
    while alive and not exit_files(job_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    rec.exit_file = ",".join(exit_files(job_dir))
    return rec


def run_with_kills(project: Path, step: str, job: str, reference_job: str, rnd: random.Random, n_kills: int,
                   duration: float, log: KillLog) -> subprocess.CompletedProcess:
    """Kill ``step`` ``n_kills`` times at seeded random moments, checking the job after each, then finish it.

    Delays are uniform in [0.1, 0.7] of ``duration`` (the uninterrupted run's wall time), so they fall into
    start-up, training/insertion, checkpoint writing and output writing.  Each rerun resumes the job; when
    a run finishes before its signal, the job directory is started afresh (inputs copied again), so that
    exactly ``n_kills`` signals hit a running job.
    """
    job_dir = project / job
    copy_inputs_for(project, reference_job, job, step)
    done = 0
    while done < n_kills:
        if finished(job_dir, step):
            shutil.rmtree(job_dir)
            copy_inputs_for(project, reference_job, job, step)
        sig = rnd.choice((signal.SIGKILL, signal.SIGTERM))
        rec = kill_once(project, step, job, sig, rnd.uniform(0.1, 0.7) * duration)
        log.records.append(rec)
        problems = validate_h5(job_dir)
        assert not problems, f"after {rec}: damaged HDF5 files: {problems}"
        if not rec.alive or rec.exit_file == EXIT_SUCCESS:
            continue  # the run finished (possibly killed while the interpreter was shutting down)
        done += 1
        if sig == signal.SIGTERM:
            assert rec.exit_seconds < 10, f"SIGTERM did not stop the job within 10 s: {rec}"
            assert rec.exit_code == 3 and rec.exit_file == EXIT_ABORTED, f"SIGTERM: {rec}"
        else:
            assert rec.exit_code == -signal.SIGKILL
            assert rec.exit_file == EXIT_FAILURE, f"SIGKILL: the watchdog left {rec.exit_file!r}: {rec}"
    res = run_step(project, step, job)
    assert res.returncode == 0, f"rerun of {step} after kills failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    assert validate_h5(job_dir) == []
    return res


# -- comparisons ------------------------------------------------------------------------------------
def tree_differences(a, b, path: str = "", rtol: float = 0.0, atol: float = 0.0,
                     skip: tuple[str, ...] = ("seconds",)) -> list[str]:
    """Paths at which two checkpoint trees differ (exactly, or beyond the tolerances)."""
    out: list[str] = []
    if isinstance(a, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"]
        for k in a:
            if k not in skip:
                out += tree_differences(a[k], b[k], f"{path}/{k}", rtol, atol, skip)
    elif isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} vs {len(b)}"]
        for i, (x, y) in enumerate(zip(a, b)):
            out += tree_differences(x, y, f"{path}/{i}", rtol, atol, skip)
    elif isinstance(a, (torch.Tensor, np.ndarray)):
        x, y = np.asarray(a.cpu() if isinstance(a, torch.Tensor) else a), np.asarray(
            b.cpu() if isinstance(b, torch.Tensor) else b)
        if x.shape != y.shape or x.dtype != y.dtype:
            out.append(f"{path}: {x.shape}/{x.dtype} vs {y.shape}/{y.dtype}")
        elif rtol == 0 and atol == 0:
            if x.tobytes() != y.tobytes():
                out.append(f"{path}: not bit-identical (max |diff| {np.abs(x.astype(float) - y.astype(float)).max():.3g})")
        elif not np.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True):
            out.append(f"{path}: max |diff| {np.abs(x.astype(float) - y.astype(float)).max():.3g}")
    elif isinstance(a, float) and isinstance(b, float):
        if not (a == b or abs(a - b) <= atol + rtol * max(abs(a), abs(b))):
            out.append(f"{path}: {a!r} vs {b!r}")
    elif a != b:
        out.append(f"{path}: {a!r} vs {b!r}")
    return out


def forward_differences(job_a: Path, job_b: Path, rtol: float = 0.0, atol: float = 0.0) -> list[str]:
    """Differences of the final forward checkpoints (both halves, initial model, split) and latents."""
    from relion_dynamight.training.checkpoint import final_path, load_checkpoint

    a, b = load_checkpoint(final_path(job_a)), load_checkpoint(final_path(job_b))
    out = [] if a["epoch"] == b["epoch"] else [f"epoch {a['epoch']} vs {b['epoch']}"]
    for key in ("halves", "initial", "split_half", "split_validation"):
        out += tree_differences(a[key], b[key], key, rtol, atol)
    la = (job_a / "forward_deformations" / "latent_space.star").read_text()
    lb = (job_b / "forward_deformations" / "latent_space.star").read_text()
    if la != lb:
        out.append("latent_space.star differs")
    return out


def inverse_differences(job_a: Path, job_b: Path, rtol: float = 0.0, atol: float = 0.0) -> list[str]:
    from relion_dynamight.training.trained import inverse_path, load_inverse

    out = []
    for h in (1, 2):
        a, b = load_inverse(inverse_path(job_a, h)), load_inverse(inverse_path(job_b, h))
        out += tree_differences(a["state"], b["state"], f"inverse_half{h}", rtol, atol)
        out += tree_differences(a["centres"], b["centres"], f"inverse_half{h}/centres", rtol, atol)
    return out


MAP_NAMES = ("map_half1.mrc", "map_half2.mrc", "map.mrc", "standard_half1.mrc", "standard_half2.mrc")


def map_differences(job_a: Path, job_b: Path, rtol: float = 0.0, atol: float = 0.0) -> list[str]:
    from relion_dynamight.relion.mrc import read_map

    out = []
    for name in MAP_NAMES:
        a, _ = read_map(job_a / "backprojection" / name)
        b, _ = read_map(job_b / "backprojection" / name)
        out += tree_differences(a, b, name, rtol, atol * float(np.abs(a).max()))
    return out


# -- MPI: kill one rank -----------------------------------------------------------------------------
def descendants(pid: int) -> list[int]:
    """PIDs of all descendants of ``pid`` (read from /proc, no psutil)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """``{MPI rank: pid}`` of the relion_dynamight processes started by an ``mpiexec``."""
    out = {}
    for pid in descendants(launcher_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"relion_dynamight.launcher" not in cmdline:
            continue
        for item in environ:
            if item.startswith(b"PMI_RANK="):
                out[int(item[9:])] = pid
    return out


def kill_one_rank(project: Path, step: str, job: str, mpiexec: str, rank: int, delay: float,
                  timeout: float = 120) -> tuple[int | None, float, str, str]:
    """Run ``step`` under ``mpiexec -n 2``, SIGKILL ``rank`` after ``delay`` s (counted from when both ranks
    exist); returns ``(launcher exit code or None on a hang, seconds from kill to end, exit files, stderr)``."""
    proc = subprocess.Popen(command(step, job, [mpiexec, "-n", "2"]), cwd=project, env={**os.environ, **ENV},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        ranks: dict[int, int] = {}
        while len(ranks) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
            ranks = rank_pids(proc.pid)
        assert len(ranks) == 2, f"could not find both MPI ranks ({ranks})"
        time.sleep(delay)
        assert proc.poll() is None, "the job finished before a rank could be killed"
        os.kill(ranks[rank], signal.SIGKILL)
        t0 = time.monotonic()
        try:
            _, err = proc.communicate(timeout=timeout)
            code: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            code, err = None, ""
        seconds = time.monotonic() - t0
        deadline = time.monotonic() + 5  # the watchdog of rank 0 writes FAILURE after the launcher ends
        while code is not None and not exit_files(project / job) and time.monotonic() < deadline:
            time.sleep(0.05)
        return code, seconds, ",".join(exit_files(project / job)), err
    finally:
        if proc.poll() is None:  # a hang: end the whole launcher session we started
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
