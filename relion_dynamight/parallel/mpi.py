"""MPI made optional: rank, local rank, device choice, reductions, and all-ranks failure.

mpi4py is imported only when the process was started by an MPI launcher (``mpiexec``/``mpirun``/
``srun`` set PMI_* or OMPI_* variables), so plain runs never touch MPI.  ``mpirun -n 1`` works
like a plain run.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

import numpy as np

_LAUNCHER_VARS = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_RANK")
_LOCAL_RANK_VARS = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "PMI_LOCAL_RANK")


class Comm:
    """A thin wrapper over an mpi4py communicator, or a serial stand-in when ``mpi`` is None."""

    def __init__(self, mpi_comm: Any = None) -> None:
        self._comm = mpi_comm
        self.rank = 0 if mpi_comm is None else mpi_comm.Get_rank()
        self.size = 1 if mpi_comm is None else mpi_comm.Get_size()

    @property
    def parallel(self) -> bool:
        return self.size > 1

    @property
    def local_rank(self) -> int:
        for var in _LOCAL_RANK_VARS:
            if var in os.environ:
                return int(os.environ[var])
        return self.rank

    def barrier(self) -> None:
        if self._comm is not None and self.size > 1:
            self._comm.Barrier()

    def allreduce_sum(self, array: np.ndarray) -> np.ndarray:
        """Element-wise sum of a numpy array over ranks (returns a new array on every rank)."""
        if self._comm is None or self.size == 1:
            return array
        from mpi4py import MPI

        arr = np.ascontiguousarray(array)
        out = np.empty_like(arr)
        self._comm.Allreduce(arr, out, op=MPI.SUM)
        return out

    def bcast(self, obj: Any, root: int = 0) -> Any:
        """Broadcast a small picklable object (configuration, numbers); never used for user files."""
        if self._comm is None or self.size == 1:
            return obj
        return self._comm.bcast(obj, root=root)

    def gather(self, obj: Any, root: int = 0) -> list[Any] | None:
        if self._comm is None or self.size == 1:
            return [obj]
        return self._comm.gather(obj, root=root)

    def abort_all_if_parallel(self, code: int) -> None:
        """End every rank (no hang) after a failure on this one."""
        if self._comm is not None and self.size > 1:
            sys.stdout.flush()
            sys.stderr.flush()
            self._comm.Abort(code)


def launched_by_mpi() -> bool:
    return any(var in os.environ for var in _LAUNCHER_VARS)


@functools.lru_cache(maxsize=1)
def world() -> Comm:
    """The world communicator (serial stand-in when not started by an MPI launcher)."""
    if not launched_by_mpi():
        return Comm(None)
    try:
        from mpi4py import MPI
    except ImportError:
        return Comm(None)
    return Comm(MPI.COMM_WORLD)


def split_range(n: int, rank: int, size: int) -> range:
    """Contiguous share ``[start, stop)`` of ``n`` items for ``rank`` of ``size``."""
    per, extra = divmod(n, size)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (1 if rank < extra else 0))
