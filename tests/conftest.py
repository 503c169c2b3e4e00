"""Shared fixtures: RELION binaries (skip with a reason when absent), MPI launcher, threads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

RELION_TOOLS = ("relion_project", "relion_reconstruct", "relion_postprocess", "relion_pipeliner")


def relion_available() -> bool:
    return all(shutil.which(t) for t in RELION_TOOLS)


@pytest.fixture
def relion() -> None:
    """Skip unless Debian's RELION 3.1.3 is installed (``.ci/run`` installs it when run as root)."""
    if not relion_available():
        pytest.skip("RELION 3.1.3 binaries not found (install with: apt-get install -y relion)")


def mpiexec_path() -> str | None:
    """The MPICH launcher that matches the mpi4py wheel (never Debian's Open MPI mpirun)."""
    exe = Path(sys.executable).parent / "mpiexec"
    if exe.exists():
        return str(exe)
    found = shutil.which("mpiexec.hydra") or shutil.which("mpiexec")
    if found and "openmpi" not in os.path.realpath(found):
        return found
    return None


@pytest.fixture
def mpiexec() -> str:
    exe = mpiexec_path()
    if exe is None:
        pytest.skip("MPICH's mpiexec not found (pip install mpich mpi4py)")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.skip("mpi4py not installed")
    return exe


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
