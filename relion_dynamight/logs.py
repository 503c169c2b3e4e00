"""Logging that reads well in RELION's run.out / run.err, and a log-friendly progress reporter."""

from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

_FORMAT = "%(asctime)s %(message)s"
_DATEFMT = "%Y-%m-%d %H:%M:%S"


class _MaxLevel(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


class _PipeSafeHandler(logging.StreamHandler):
    """A stream handler that goes quiet when its reader has gone (``relion_dynamight ... | head``): no
    "Logging error" traceback, the job carries on and ends with its exit file."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            silence_closed_stream(self.stream)
            return
        super().handleError(record)


def silence_closed_stream(stream: object) -> None:
    """Point ``sys.stdout``/``sys.stderr`` at /dev/null when ``stream`` is one whose reader has gone."""
    import os

    devnull = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    if stream is sys.stdout or getattr(stream, "fileno", None) and stream is sys.__stdout__:
        sys.stdout = devnull
    if stream is sys.stderr:
        sys.stderr = devnull
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is stream:
            handler.stream = devnull   # not setStream(): it flushes the closed stream and raises again


def setup_logging(verbose: bool = False, rank: int = 0) -> None:
    """INFO and WARNING go to stdout (run.out); WARNING and ERROR to stderr (run.err): a warning is seen in
    both files.  Each line is flushed.  Ranks other than 0 only log warnings and errors, prefixed with their rank.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    prefix = f"[rank {rank}] " if rank else ""
    fmt = logging.Formatter(prefix + _FORMAT, _DATEFMT)
    out = _PipeSafeHandler(sys.stdout)
    out.setFormatter(fmt)
    out.addFilter(_MaxLevel(logging.ERROR))
    err = _PipeSafeHandler(sys.stderr)
    err.setFormatter(fmt)
    err.setLevel(logging.WARNING)
    root.addHandler(out)
    root.addHandler(err)
    root.setLevel(logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING))


def progress(items: Iterable[T], total: int, desc: str, logger: logging.Logger | None = None,
             every_s: float = 30.0, steps: int = 10) -> Iterator[T]:
    """Yield ``items`` and log ``desc: k/total (p%), elapsed, ETA`` about every 10 % or ``every_s``.

    Unlike terminal progress bars this writes whole lines, which is what a log file needs.
    """
    log = logger or logging.getLogger("relion_dynamight")
    start = last = time.monotonic()
    next_mark = max(1, total // steps)
    for k, item in enumerate(items, start=1):
        yield item
        now = time.monotonic()
        if k == total or k >= next_mark or now - last >= every_s:
            elapsed = now - start
            eta = elapsed / k * (total - k) if k else 0.0
            log.info("%s: %d/%d (%3.0f%%) elapsed %.1fs, ETA %.1fs", desc, k, total,
                     100.0 * k / max(total, 1), elapsed, eta)
            last = now
            while next_mark <= k:
                next_mark += max(1, total // steps)
