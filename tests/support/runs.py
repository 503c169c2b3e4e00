"""Helpers the tests share: RELION's binaries, MPICH's launcher, our CLI as a real subprocess, waiting for events."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

RELION_TOOLS = ("relion_project", "relion_reconstruct", "relion_postprocess", "relion_pipeliner")


def relion_available() -> bool:
    return all(shutil.which(t) for t in RELION_TOOLS)


def mpiexec_path() -> str | None:
    """The MPICH launcher that matches the mpi4py wheel (never Debian's Open MPI mpirun)."""
    exe = Path(sys.executable).parent / "mpiexec"
    if exe.exists():
        return str(exe)
    found = shutil.which("mpiexec.hydra") or shutil.which("mpiexec")
    if found and "openmpi" not in os.path.realpath(found):
        return found
    return None


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600,
            mpi: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run ``relion_dynamight ARGS`` as a real subprocess (optionally under ``mpi`` launcher args)."""
    cmd = [*(mpi or []), sys.executable, "-m", "relion_dynamight.launcher", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def wait_for(predicate, what: str, timeout: float = 300.0) -> None:  # noqa: ANN001
    """Poll ``predicate`` until it is true (an event, never a fixed duration); fail after ``timeout`` s."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
