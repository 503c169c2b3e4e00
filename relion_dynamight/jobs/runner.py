"""Run one task under the job protocol: logging, exit files, abort, one-line errors, MPI failure."""

from __future__ import annotations

import errno
import logging
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from relion_dynamight.errors import BadOutput, InputError, JobAborted
from relion_dynamight.logs import setup_logging
from relion_dynamight.relion.jobdir import Job

if TYPE_CHECKING:  # the launcher imports this module in its error path: stdlib and jobdir only at run time
    from relion_dynamight.parallel.mpi import Comm

log = logging.getLogger("relion_dynamight")

Task = Callable[[Job], Iterable[tuple[str, str]] | None]


def run_task(name: str, job_dir: Path | None, task: Task) -> int:
    """Run ``task(job)``; returns the process exit code (0 success, 1 failure, 3 aborted).

    The task returns the output nodes to declare (``(path, RELION 5 label)``) or None.  With MPI,
    only rank 0 writes exit files; an exception on any rank aborts all ranks after FAILURE is
    written (see :mod:`relion_dynamight.parallel.mpi`).
    """
    from relion_dynamight.parallel.mpi import world

    comm = world()
    setup_logging(rank=comm.rank)
    job = Job(job_dir, writer=comm.rank == 0)
    job.start()
    try:
        log.info("relion_dynamight %s started%s", name, f" in {job_dir}" if job_dir else "")
        nodes = list(task(job) or [])
        comm.barrier()
        if comm.rank == 0:
            from relion_dynamight.relion.output_checks import check_outputs

            check_outputs([name for name, _ in nodes] + [str(p) for p in job.outputs_to_check])
    except (InputError, BadOutput) as exc:
        print(f"ERROR: {exc}", file=sys.stderr, flush=True)
        return _fail(job, comm)
    except JobAborted as exc:
        log.warning("Aborted: %s", exc)
        if comm.rank == 0:
            job.aborted()
        comm.abort_all_if_parallel(3)
        return 3
    except OSError as exc:  # disk full, read-only or blocked output: one line; details in the log (stdout)
        traceback.print_exc(file=sys.stdout)
        print(f"ERROR: {os_error_message(exc)}", file=sys.stderr, flush=True)
        return _fail(job, comm)
    except Exception as exc:  # noqa: BLE001 - any crash must become FAILURE, never a hang
        traceback.print_exc(file=sys.stderr)
        print(f"ERROR: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return _fail(job, comm)
    try:
        job.succeed(nodes)
        log.info("relion_dynamight %s finished successfully", name)
    except JobAborted:       # a stop signal while the exit file was being written: the job did finish
        pass
    return 0


_OS_HINTS = {
    errno.ENOSPC: "free disk space or choose another output directory",
    errno.EDQUOT: "free space within your quota or choose another output directory",
    errno.EFBIG: "the file system or a file-size limit refused the file; free space or choose another directory",
    errno.EROFS: "the file system is read-only; choose a writable output directory",
    errno.EACCES: "check the permissions or choose another directory",
    errno.EPERM: "check the permissions or choose another directory",
    errno.EEXIST: "a file is in the way of a directory; move it or choose another output directory",
    errno.ENOTDIR: "a file is in the way of a directory; move it or choose another output directory",
}


def os_error_message(exc: OSError) -> str:
    """One line for an operating-system error: the file, the reason and what to do."""
    where = f"{exc.filename}: " if exc.filename else ""
    reason = exc.strerror or str(exc) or type(exc).__name__
    hint = _OS_HINTS.get(exc.errno or 0, "check the file and the file system")
    return " ".join(f"{where}{reason} ({type(exc).__name__}); {hint}".split())


def _fail(job: Job, comm: Comm) -> int:
    # Any rank may write FAILURE here: a failing rank other than 0 must not leave the job "Running".
    Job(job.job_dir, writer=True).fail()
    comm.abort_all_if_parallel(1)
    return 1
