"""A tiny companion process that writes ``RELION_JOB_EXIT_FAILURE`` when a job process dies silently.

A process killed by SIGKILL (the kernel's OOM killer, a scheduler, ``mpiexec`` cleaning up after another
rank died) cannot write an exit file itself, and RELION would show the job as "Running" forever.  The
launcher therefore starts ``python -m relion_dynamight.relion.watchdog PID JOB_DIR`` (standard library
only, in its own session so that a launcher's clean-up does not take it along).  It polls ``PID``; when
that process is gone and no exit file was written since the watchdog started, it writes FAILURE, unless the
job directory's lock (:mod:`.jobguard`) now belongs to another task: RELION 5 starts the next task of a job in
the same directory within a second of the previous exit file, and that task's exit files are not ours.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from relion_dynamight.relion.jobdir import EXIT_FAILURE, EXIT_FILES
from relion_dynamight.relion.jobguard import LOCK_NAME, alive, read_lock, start_ticks

POLL_SECONDS = 0.2


def has_fresh_exit_file(job_dir: Path, since: float) -> bool:
    for name in EXIT_FILES:
        try:
            if (job_dir / name).stat().st_mtime >= since:
                return True
        except FileNotFoundError:
            continue
    return False


def watch(pid: int, job_dir: Path, poll: float = POLL_SECONDS) -> bool:
    """Wait for ``pid`` to end; write FAILURE if it left no exit file. Returns True when FAILURE was written."""
    since = time.time()
    ticks = start_ticks(pid)
    while alive(pid, ticks):
        time.sleep(poll)
    time.sleep(poll)  # let a last exit file reach the disk
    if has_fresh_exit_file(job_dir, since) or not job_dir.is_dir():
        return False
    held = read_lock(job_dir)
    if held is not None and held.get("pid") != pid:
        return False      # a later task runs in this directory now: its exit files are not ours to write
    for name in EXIT_FILES:
        try:
            (job_dir / name).unlink()
        except FileNotFoundError:
            pass
    (job_dir / EXIT_FAILURE).touch()
    if held is not None:
        try:
            (job_dir / LOCK_NAME).unlink()
        except FileNotFoundError:
            pass
    return True


def start_watchdog(job_dir: Path, pid: int | None = None) -> subprocess.Popen | None:
    """Start the watchdog of process ``pid`` (default: this one) for ``job_dir``; None if it cannot start."""
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "relion_dynamight.relion.watchdog", str(pid or os.getpid()), str(job_dir)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True)
    except OSError:
        return None


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m relion_dynamight.relion.watchdog PID JOB_DIR", file=sys.stderr)
        return 2
    watch(int(argv[0]), Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
