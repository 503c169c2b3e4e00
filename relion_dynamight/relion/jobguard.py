"""One task per job directory, and only DynaMight directories (standard library only: used by the launcher).

**Lock.**  A task holds ``JOB_DIR/.relion_dynamight.lock`` (JSON: host, PID, the PID's start time, start
time, command) from before its job directory is touched until just after its exit file is written.  A second
task in the same directory is refused with one line and writes nothing there.  A lock whose process is gone (on
this host: PID not running, or the PID reused by another process) is stale: it is explained and taken over.
The lock is the run token of :mod:`.watchdog`: the watchdog of a task writes FAILURE only while the lock is
still that task's, so it never writes into a later task's run of the same directory (RELION 5's "continue"
starts the next task within a second of the previous exit file).

**Foreign directories.**  ``--output-directory Refine3D/job001/`` or the positional directory of a continue
task must not be another RELION job: refused (before anything is written) when the directory is a RELION job
type's folder (``Refine3D/jobNNN``), when its ``job.star`` or the project's ``default_pipeline.star`` names
another job type, or when it holds another program's run files (``run_data.star``, ``run_it*``).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

LOCK_NAME = ".relion_dynamight.lock"
#: Job types a DynaMight task may run in (RELION 5's tab, and External jobs in RELION 3.1/4.0).
OUR_TYPES = {"relion.dynamight", "dynamight", "relion.external", "external"}
#: RELION 3.1's integer process type of External jobs.
EXTERNAL_TYPE_31 = "99"
#: Folders of RELION's own job types (RELION 3.1–5), whose jobNNN directories are never ours.
RELION_TYPE_FOLDERS = {
    "Import", "MotionCorr", "CtfFind", "ManualPick", "AutoPick", "Extract", "Select", "Class2D", "Class3D",
    "Refine3D", "InitialModel", "MaskCreate", "JoinStar", "Subtract", "PostProcess", "LocalRes", "CtfRefine",
    "Polish", "MultiBody", "ModelAngelo",
}
#: Files other RELION programs write into their job directories.
FOREIGN_FILES = ("run_data.star", "run_model.star", "run_optimiser.star", "run_sampling.star",
                 "micrographs_ctf.star", "corrected_micrographs.star", "postprocess.star", "particles.star")
FOREIGN_PATTERNS = (re.compile(r"^run_it\d+_.*"), re.compile(r"^run_ct\d+_.*"))
#: Seconds to wait for a lock whose task has already written its exit file (it is finishing).
FINISHING_WAIT = 10.0


class JobDirBusy(Exception):
    """The job directory is locked by a running task or belongs to another job type (one-line message)."""


# -- foreign directories ------------------------------------------------------------------------------------
def foreign_job_reason(job_dir: Path, project_dir: Path = Path(".")) -> str | None:
    """Why ``job_dir`` is another program's job directory, or None when it may be ours."""
    job_dir = Path(job_dir)
    parts = Path(os.path.normpath(job_dir)).parts
    if len(parts) >= 2 and parts[-2] in RELION_TYPE_FOLDERS and re.fullmatch(r"job\d+", parts[-1]):
        return f"{job_dir} is a RELION {parts[-2]} job directory"
    label = _job_star_type(job_dir / "job.star")
    if label is not None and label.lower() not in OUR_TYPES and label != EXTERNAL_TYPE_31:
        return f"{job_dir}/job.star says it is a '{label}' job"
    label = _pipeline_type(project_dir / "default_pipeline.star", job_dir, project_dir)
    if label is not None and label.lower() not in OUR_TYPES and label != EXTERNAL_TYPE_31:
        return f"{job_dir} is a '{label}' job in {project_dir / 'default_pipeline.star'}"
    if job_dir.is_dir():
        for entry in os.listdir(job_dir):
            if entry in FOREIGN_FILES or any(p.match(entry) for p in FOREIGN_PATTERNS):
                return f"{job_dir} holds another program's output ({entry})"
    return None


def _job_star_type(path: Path) -> str | None:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    for key in ("_rlnJobTypeLabel", "_rlnJobType"):
        match = re.search(rf"^\s*{key}\s+(\S+)", text, flags=re.M)
        if match:
            return match.group(1).strip("'\"")
    return None


def _pipeline_type(pipeline: Path, job_dir: Path, project_dir: Path) -> str | None:
    """The process type (label, or 3.1 integer) of ``job_dir`` in a RELION pipeline STAR file."""
    try:
        lines = pipeline.read_text(errors="replace").splitlines()
    except OSError:
        return None
    try:
        name = os.path.relpath(os.path.abspath(job_dir), os.path.abspath(project_dir)).rstrip("/") + "/"
    except ValueError:
        return None
    labels: list[str] = []
    in_processes = False
    for raw in lines:
        line = raw.strip()
        if line.startswith("data_"):
            in_processes = line == "data_pipeline_processes"
            labels = []
            continue
        if not in_processes or not line or line.startswith("#") or line == "loop_":
            continue
        if line.startswith("_"):
            labels.append(line.split()[0])
            continue
        fields = line.split()
        if fields and fields[0].rstrip("/") + "/" == name:
            for key in ("_rlnPipeLineProcessTypeLabel", "_rlnPipeLineProcessType"):
                if key in labels and labels.index(key) < len(fields):
                    return fields[labels.index(key)]
    return None


# -- the lock -----------------------------------------------------------------------------------------------
def start_ticks(pid: int) -> str | None:
    """Start time of ``pid`` (field 22 of /proc/PID/stat), to tell a reused PID apart; None when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def alive(pid: int, ticks: str | None) -> bool:
    """Whether process ``pid`` started at ``ticks`` still runs (no ticks or no /proc: a signal-0 probe)."""
    if ticks is not None and Path("/proc").is_dir():
        return start_ticks(pid) == ticks
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_lock(job_dir: Path) -> dict | None:
    try:
        return json.loads((Path(job_dir) / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return None


def is_mine(lock: dict | None, pid: int | None = None) -> bool:
    pid = os.getpid() if pid is None else pid
    return lock is not None and bool(lock) and lock.get("host") == socket.gethostname() and \
        lock.get("pid") == pid and lock.get("ticks") == start_ticks(pid)


def acquire(job_dir: Path, command: str, wait: float = FINISHING_WAIT) -> str | None:
    """Take the lock of ``job_dir`` for this process; returns a note about a stale lock taken over (or None).

    Raises :class:`JobDirBusy` when another live task holds it.  A holder that has already written an exit file
    is finishing: wait up to ``wait`` seconds for it to let go."""
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    path = job_dir / LOCK_NAME
    me = {"host": socket.gethostname(), "pid": os.getpid(), "ticks": start_ticks(os.getpid()),
          "started": time.time(), "command": command}
    deadline = time.monotonic() + wait
    note = None
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            held = read_lock(job_dir)
            if held is None:             # being written this instant, or garbage: look again shortly
                if time.monotonic() > deadline:
                    note = f"replaced an unreadable lock file {path}"
                    _remove(path)
                time.sleep(0.05)
                continue
            if is_mine(held):
                return None
            if _holder_gone(held):
                note = (f"took over the stale lock of PID {held.get('pid')} on {held.get('host')} (started "
                        f"{_when(held)}; that process is no longer running)")
                _remove(path)
                continue
            if _finishing(job_dir, held) and time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            raise JobDirBusy(_busy_message(job_dir, held)) from None
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        return note


def release(job_dir: Path | None) -> None:
    """Remove the lock if this process holds it."""
    if job_dir is None:
        return
    if is_mine(read_lock(job_dir)):
        _remove(Path(job_dir) / LOCK_NAME)


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _holder_gone(held: dict) -> bool:
    if held.get("host") != socket.gethostname():
        return False       # another node: cannot tell; the message says how to clear it
    try:
        return not alive(int(held.get("pid", -1)), held.get("ticks"))
    except (TypeError, ValueError):
        return True


def _finishing(job_dir: Path, held: dict) -> bool:
    started = float(held.get("started") or 0.0)
    for name in ("RELION_JOB_EXIT_SUCCESS", "RELION_JOB_EXIT_FAILURE", "RELION_JOB_EXIT_ABORTED"):
        try:
            if (job_dir / name).stat().st_mtime >= started:
                return True
        except OSError:
            continue
    return False


def _when(held: dict) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(held["started"])))
    except (KeyError, TypeError, ValueError):
        return "at an unknown time"


def _busy_message(job_dir: Path, held: dict) -> str:
    where = f"PID {held.get('pid')} on {held.get('host')}"
    command = str(held.get("command", "")).split(" --", 1)[0]
    return (f"{job_dir} is in use by another relion_dynamight task ({command or 'unknown'}, {where}, started "
            f"{_when(held)}); wait for it to finish or abort it; if no such process runs, delete "
            f"{Path(job_dir) / LOCK_NAME}")
