"""Fixtures; the helpers the tests import are in tests/support/ (put on sys.path here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

from runs import mpiexec_path, relion_available  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def relion() -> None:
    """Skip unless Debian's RELION 3.1.3 is installed (``.ci/run`` installs it when run as root)."""
    if not relion_available():
        pytest.skip("RELION 3.1.3 binaries not found (install with: apt-get install -y relion)")


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
