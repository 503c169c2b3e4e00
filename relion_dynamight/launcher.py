"""Console entry point ``relion_dynamight``.

Imports only the standard library and :mod:`relion_dynamight.relion.jobdir` before loading the
command-line interface, so that a broken installation (torch, CUDA, our own code) still writes
``RELION_JOB_EXIT_FAILURE`` and RELION does not show the job as "Running" forever.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from typing import Sequence

from pathlib import Path

from relion_dynamight.relion.jobdir import EXIT_ABORTED, EXIT_FILES, EXIT_FAILURE, STOP_SIGNALS, job_dir_from_argv


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """Clean a command line as RELION builds it.

    * surplus whitespace inside arguments is stripped and empty arguments are dropped;
    * ``--gpu-id`` followed by another option (RELION's empty GPU field) gets the value ``""``.
    """
    out: list[str] = []
    args = [a.strip() for a in argv if a.strip()]
    for i, a in enumerate(args):
        out.append(a)
        if a in ("--gpu-id", "--gpu_id") and (i + 1 == len(args) or args[i + 1].startswith("--")):
            out.append("")
    return out


def _write_failure(argv: Sequence[str], exit_file: str = EXIT_FAILURE) -> None:
    job_dir = job_dir_from_argv(argv)
    if job_dir is None:
        return
    try:
        job_dir.mkdir(parents=True, exist_ok=True)
        for name in EXIT_FILES:
            if name != exit_file and (job_dir / name).exists():
                (job_dir / name).unlink()
        (job_dir / exit_file).touch()
    except OSError as exc:
        print(f"ERROR: could not write {exit_file} in {job_dir}: {exc}", file=sys.stderr)


def _abort_during_startup(argv: Sequence[str]) -> None:
    """SIGTERM before the job has started (imports take seconds): write ABORTED and leave at once.

    :meth:`relion_dynamight.relion.jobdir.Job.start` replaces this handler with the job's own.
    """

    def handler(signum: int, frame: object) -> None:
        print(f"relion_dynamight: received {signal.Signals(signum).name} while starting; aborted", file=sys.stderr,
              flush=True)
        _write_failure(argv, EXIT_ABORTED)
        job_dir = job_dir_from_argv(argv)
        if job_dir is not None:
            from relion_dynamight.relion.jobguard import release

            release(job_dir)
        os._exit(3)

    for sig in STOP_SIGNALS:
        try:
            signal.signal(sig, handler)
        except (ValueError, OSError):  # not in the main thread (embedded use)
            pass


_WATCHDOG: list[object] = []

#: Rank variables of MPI launchers (MPICH/Intel, Open MPI, PMIx, Slurm).
_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")


def _start_watchdog(argv: Sequence[str]) -> None:
    """On rank 0 of a job with a directory: a companion process that writes FAILURE if we are SIGKILLed
    (see :mod:`relion_dynamight.relion.watchdog`).  ``RELION_DYNAMIGHT_NO_WATCHDOG=1`` disables it."""
    job_dir = job_dir_from_argv(argv)
    rank = next((os.environ[v] for v in _RANK_VARS if v in os.environ), "0")
    if job_dir is None or rank.strip() != "0" or os.environ.get("RELION_DYNAMIGHT_NO_WATCHDOG") == "1":
        return
    from relion_dynamight.relion.watchdog import start_watchdog

    proc = start_watchdog(job_dir)
    if proc is not None:
        _WATCHDOG.append(proc)


def bound_heap_growth(threshold_bytes: int = 4 << 20) -> bool:
    """Serve allocations above ``threshold_bytes`` with mmap (glibc ``mallopt(M_MMAP_THRESHOLD)``).

    glibc raises its mmap threshold after large blocks are freed, so torch's repeated tens-of-MB
    temporaries then come from the heap, which fragments and never shrinks: grouping 50k particles for the
    deformed backprojection peaked at 4.5 GiB instead of 0.9 GiB.  A fixed threshold keeps peak memory
    bounded.  Returns False where glibc is absent (macOS, musl).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not sys.platform.startswith("linux") or not name:
        return False
    try:
        return bool(ctypes.CDLL(name).mallopt(-3, int(threshold_bytes)))  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _claim_job_dir(args: Sequence[str]) -> Path | None:
    """Refuse another program's job directory and take the job directory's lock (:mod:`.relion.jobguard`),
    before anything is written there.  Returns the locked directory (None: no job directory, or not rank 0).
    Raises :class:`SystemExit` with one ERROR line; nothing is written into a directory that is not ours."""
    from relion_dynamight.relion import jobguard

    job_dir = job_dir_from_argv(args)
    rank = next((os.environ[v] for v in _RANK_VARS if v in os.environ), "0")
    if job_dir is None or rank.strip() != "0" or any(a in ("--help", "-h", "--version") for a in args):
        return None
    reason = jobguard.foreign_job_reason(job_dir)
    if reason:
        _error(f"{reason}, not a DynaMight job; give a DynaMight job directory (e.g. DynaMight/job012/); "
               "nothing was written there")
    try:
        note = jobguard.acquire(job_dir, " ".join(args))
    except jobguard.JobDirBusy as exc:
        _error(str(exc))
    except OSError as exc:
        from relion_dynamight.jobs.runner import os_error_message

        _error(os_error_message(exc))
    if note:
        print(f"WARNING: {job_dir}: {note}", file=sys.stderr, flush=True)
    return job_dir


def _error(line: str) -> None:
    print(f"ERROR: {' '.join(line.split())}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def main(argv: Sequence[str] | None = None) -> int:
    args = normalize_argv(sys.argv[1:] if argv is None else argv)
    if argv is None:  # a real process, not an in-process call
        _abort_during_startup(args)   # first: a SIGTERM from here on ends in ABORTED
    bound_heap_growth()
    try:
        locked = _claim_job_dir(args)
    except SystemExit as exc:
        return int(exc.code or 1)
    try:
        return _main(args, argv is None)
    finally:
        from relion_dynamight.relion.jobguard import release

        release(locked)
        _flush_or_silence()


def _flush_or_silence() -> None:
    """Flush stdout/stderr; when their reader has gone (``| head``), point them at /dev/null so that Python's
    own exit flush prints no "Exception ignored ... BrokenPipeError" traceback."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ConnectionResetError, ValueError):
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, stream.fileno())
            except (OSError, ValueError):
                pass


def _main(args: list[str], real_process: bool) -> int:
    if real_process:
        _start_watchdog(args)
    try:
        import click

        from relion_dynamight.cli import cli
    except Exception as exc:  # noqa: BLE001 - any import failure must still leave FAILURE
        traceback.print_exc()
        print(f"ERROR: relion_dynamight could not start ({type(exc).__name__}: {exc}); "
              "check the installation (pip install relion-dynamight).", file=sys.stderr)
        _write_failure(args)
        return 1
    try:
        cli.main(args=args, prog_name="relion_dynamight", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.Abort:
        _write_failure(args)
        return 1
    except click.ClickException as exc:
        hint = " (see relion_dynamight --help)" if isinstance(exc, click.UsageError) else ""
        print(f"ERROR: {' '.join(exc.format_message().split())}{hint}", file=sys.stderr, flush=True)
        _write_failure(args)
        return exc.exit_code
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:  # noqa: BLE001 - e.g. a failing lazy import inside a command
        traceback.print_exc()
        print(f"ERROR: relion_dynamight failed ({type(exc).__name__}: {exc})", file=sys.stderr)
        _write_failure(args)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
