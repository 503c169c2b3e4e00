"""Check a job's outputs before ``RELION_JOB_EXIT_SUCCESS`` is written: a job never reports success with garbage.

Maps and stacks (``.mrc``, ``.mrcs``, ``.map``) must be finite and not constant (an all-zero or all-NaN map is
what a bad input that slipped through produces); STAR files must hold at least one non-empty table with finite
numbers; any other file must exist and not be empty.  A failed check raises :class:`BadOutput` with one line
naming the file and what is wrong; the job ends with FAILURE.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from relion_dynamight.errors import BadOutput

MAP_SUFFIXES = (".mrc", ".mrcs", ".map")


def check_outputs(paths: Iterable[str | Path]) -> None:
    """Check every path (see the module docstring)."""
    for path in paths:
        check_output(Path(path))


def check_output(path: Path) -> None:
    if not path.exists():
        raise BadOutput(f"output {path} was not written; the job is not marked successful")
    if path.is_dir():
        return
    if path.stat().st_size == 0:
        raise BadOutput(f"output {path} is empty; the job is not marked successful")
    if path.suffix.lower() in MAP_SUFFIXES:
        _check_map(path)
    elif path.suffix.lower() == ".star":
        _check_star(path)


def _check_map(path: Path) -> None:
    import mrcfile

    try:
        with mrcfile.mmap(path, mode="r", permissive=True) as mrc:
            data = mrc.data
            if data is None or data.size == 0:
                raise BadOutput(f"output {path} holds no data; the job is not marked successful")
            finite, lo, hi = True, np.inf, -np.inf
            for chunk in np.array_split(data.reshape(-1), max(1, data.size // (1 << 22))):
                values = np.asarray(chunk, dtype=np.float64)
                finite &= bool(np.isfinite(values).all())
                if not finite:
                    break
                lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
    except (OSError, ValueError) as exc:
        raise BadOutput(f"output {path} cannot be read back as MRC ({exc}); the job is not marked successful") from None
    if not finite:
        raise BadOutput(f"output {path} contains NaN or Inf values; the job is not marked successful (check the "
                        "inputs' numbers and the options)")
    if hi - lo <= 1e-30 + 1e-12 * max(abs(hi), abs(lo)):
        what = "all zero" if hi == 0.0 and lo == 0.0 else f"constant ({hi:g})"
        raise BadOutput(f"output {path} is {what}; the job is not marked successful (check the inputs: CTF scale, "
                        "resolution limits, particle count)")


def _check_star(path: Path) -> None:
    from relion_dynamight.errors import InputError
    from relion_dynamight.relion.star import read_star

    try:
        blocks = read_star(path)
    except InputError as exc:
        raise BadOutput(f"output {exc}; the job is not marked successful") from None
    if not any(len(frame) for frame in blocks.values()):
        raise BadOutput(f"output {path} has no rows; the job is not marked successful")
    for name, frame in blocks.items():
        numeric = frame.select_dtypes(include=[np.number])
        if numeric.size and not np.isfinite(numeric.to_numpy(dtype=np.float64)).all():
            column = next(c for c in numeric.columns if not np.isfinite(numeric[c].to_numpy(dtype=np.float64)).all())
            raise BadOutput(f"output {path}: column _{column} of data_{name} has NaN or Inf values; the job is not "
                            "marked successful")
