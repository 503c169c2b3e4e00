"""Console entry point ``relion_dynamight``.

Imports only the standard library and :mod:`relion_dynamight.relion.jobdir` before loading the
command-line interface, so that a broken installation (torch, CUDA, our own code) still writes
``RELION_JOB_EXIT_FAILURE`` and RELION does not show the job as "Running" forever.
"""

from __future__ import annotations

import sys
import traceback
from typing import Sequence

from relion_dynamight.relion.jobdir import EXIT_FILES, EXIT_FAILURE, job_dir_from_argv


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


def _write_failure(argv: Sequence[str]) -> None:
    job_dir = job_dir_from_argv(argv)
    if job_dir is None:
        return
    try:
        job_dir.mkdir(parents=True, exist_ok=True)
        for name in EXIT_FILES:
            if name != EXIT_FAILURE and (job_dir / name).exists():
                (job_dir / name).unlink()
        (job_dir / EXIT_FAILURE).touch()
    except OSError as exc:
        print(f"ERROR: could not write {EXIT_FAILURE} in {job_dir}: {exc}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = normalize_argv(sys.argv[1:] if argv is None else argv)
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
        exc.show()
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
