"""Choose the torch device from RELION's free-text GPU field and the MPI local rank."""

from __future__ import annotations

import torch

from relion_dynamight.errors import InputError


def choose_device(gpu_id: str | None, local_rank: int = 0) -> torch.device:
    """Map ``--gpu-id`` to a device.

    ``""``/None: GPU ``local_rank % n_gpus`` when CUDA is available, else CPU.  ``"cpu"``: CPU.
    ``"0"``, ``"1"``: that GPU.  A comma/colon list (RELION style ``"0,1"`` or ``"0:1"``): entry
    ``local_rank`` modulo its length.  A GPU that does not exist is a clear error.
    """
    text = (gpu_id or "").strip()
    if text.lower() == "cpu":
        return torch.device("cpu")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not text:
        return torch.device(f"cuda:{local_rank % n}") if n else torch.device("cpu")
    parts = [p for p in text.replace(":", ",").split(",") if p.strip()]
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        raise InputError(f"--gpu-id {text!r} is not a GPU number; give e.g. 0, '0,1', or cpu") from None
    gid = ids[local_rank % len(ids)]
    if n == 0:
        raise InputError(f"--gpu-id {text!r}: no CUDA GPU is available here; leave the GPU field empty or give 'cpu'")
    if gid < 0 or gid >= n:
        raise InputError(f"--gpu-id {text!r}: GPU {gid} does not exist (this node has {n}); choose 0..{n - 1}")
    return torch.device(f"cuda:{gid}")


def thread_count(requested: int, option: str) -> int:
    """Threads to use for ``option``: at least 1 (else :class:`InputError`), at most the CPUs this process may
    run on (more only oversubscribes the cores and slows the job; a WARNING says so and the count is clamped)."""
    import logging
    import os

    if requested < 1:
        raise InputError(f"{option} {requested}: must be at least 1")
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    if requested > cores:
        logging.getLogger("relion_dynamight").warning(
            "WARNING: %s %d but this process may use %d CPU core(s); using %d", option, requested, cores, cores)
        return cores
    return int(requested)
