"""Particle images from MRC stacks (relion-facts §5–6), read lazily through ``mrcfile`` memory maps.

``rlnImageName`` is ``N@path`` (1-based image ``N`` of a ``.mrcs`` stack, zero-padded or not) or a plain
``path`` (a single image). Paths are resolved against the project directory (default: the working
directory, which is where RELION runs a job), then the STAR file's directory and each of its parents (STAR
files converted by pyem hold paths relative to those).

:class:`ImageSource` checks every stack's header once at construction (exists, readable, supported mode,
square, the expected box, enough images), then reads images on demand as float32 ``(k, N, N)`` arrays
indexed ``[y, x]``; ``preload=True`` keeps all of them in RAM instead (float16 stacks stay float16).
"""

from __future__ import annotations

import os
import struct
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import mrcfile
import numpy as np

from relion_dynamight.errors import InputError

if TYPE_CHECKING:
    from relion_dynamight.relion.star import ParticleTable

#: MRC modes we read: 0 int8, 1 int16, 2 float32, 6 uint16, 12 float16.
SUPPORTED_MODES = {0: 1, 1: 2, 2: 4, 6: 2, 12: 2}
MAX_OPEN_STACKS = 32
PRELOAD_MEMORY_FRACTION = 0.8


def parse_image_name(name: str) -> tuple[int, str]:
    """``'12@Extract/a.mrcs'`` → ``(11, 'Extract/a.mrcs')`` (0-based); plain ``'a.mrc'`` → ``(0, 'a.mrc')``."""
    name = str(name).strip()
    if "@" not in name:
        if not name:
            raise InputError("empty _rlnImageName; every particle needs an image name")
        return 0, name
    number, path = name.split("@", 1)
    if not number.strip().isdigit() or int(number) < 1 or not path.strip():
        raise InputError(f"_rlnImageName '{name}': expected N@stack.mrcs with N >= 1")
    return int(number) - 1, path.strip()


def _search_bases(star_path: Path, project_dir: Path | None) -> list[Path]:
    star_dir = Path(star_path).absolute().parent
    bases = [Path(project_dir) if project_dir is not None else Path.cwd(), star_dir, *star_dir.parents]
    return list(dict.fromkeys(bases))


def candidate_paths(stack: str, star_path: Path, project_dir: Path | None = None) -> list[Path]:
    """Where to look for ``stack``, in order: project dir (or cwd), the STAR file's directory, its parents."""
    if Path(stack).is_absolute():
        return [Path(stack)]
    return [base / stack for base in _search_bases(star_path, project_dir)]


def resolve_stack(stack: str, star_path: Path, project_dir: Path | None = None,
                  bases: list[Path] | None = None) -> Path | None:
    """First existing candidate of :func:`candidate_paths` (``bases`` precomputed), or ``None``."""
    if Path(stack).is_absolute():
        return Path(stack) if os.path.isfile(stack) else None
    for base in bases if bases is not None else _search_bases(star_path, project_dir):
        cand = os.path.join(base, stack)
        if os.path.isfile(cand):
            return Path(cand)
    return None


@dataclass(frozen=True)
class StackHeader:
    """What the header says about one MRC file."""

    nx: int
    ny: int
    nz: int
    mode: int


def read_header(path: Path, image_name: str, star_path: Path) -> StackHeader:
    """Header of an MRC file (plain 1024-byte read, fast for many stacks); :class:`InputError` naming the
    image and STAR file when the file is not a readable MRC file of a supported mode."""
    where = f"needed by image {image_name} of {star_path}"
    try:
        with open(path, "rb") as fh:
            raw = fh.read(1024)
        size = os.path.getsize(path)
    except OSError as exc:
        raise InputError(f"{path}: cannot read the MRC file ({exc.strerror}), {where}") from None
    if len(raw) < 1024:
        raise InputError(f"{path}: not a readable MRC file (shorter than its 1024-byte header), {where}")
    order = ">" if raw[212] == 0x11 else "<"  # machine stamp: 0x44 0x44 little endian, 0x11 0x11 big endian
    nx, ny, nz, mode = struct.unpack(order + "4i", raw[:16])
    nsymbt = struct.unpack(order + "i", raw[92:96])[0]
    header = StackHeader(nx, ny, nz, mode)
    if min(nx, ny, nz) < 1 or nsymbt < 0:
        raise InputError(f"{path}: not a readable MRC file (header {nx}x{ny}x{nz}, mode {mode}), {where}")
    if mode not in SUPPORTED_MODES:
        raise InputError(f"{path}: MRC mode {mode} is not supported (use 0, 1, 2, 6 or 12), {where}")
    if size < 1024 + nsymbt + nx * ny * nz * SUPPORTED_MODES[mode]:
        raise InputError(f"{path}: MRC file is truncated ({size} bytes for {nx}x{ny}x{nz} mode {mode}), {where}")
    return header


def _missing(name: str, stack: str, star_path: Path, project_dir: Path | None) -> InputError:
    tried = ", ".join(str(c) for c in candidate_paths(stack, star_path, project_dir))
    return InputError(f"{star_path}: image file of particle {name} not found (tried {tried}); run from the "
                      "RELION project directory or fix _rlnImageName")


def available_memory_bytes() -> int | None:
    """Memory this process may still allocate (bytes), or ``None`` where nothing can be read.

    The least of: ``MemAvailable`` of ``/proc/meminfo``, the headroom under the address-space limit
    (``ulimit -v``: ``RLIMIT_AS`` minus ``VmSize``) and the headroom of the memory cgroup (what Slurm and
    containers enforce: ``memory.max`` minus ``memory.current``, or cgroup v1's ``limit_in_bytes``).
    """
    values = [v for v in (_meminfo_available(), _rlimit_headroom(), _cgroup_headroom()) if v is not None]
    return min(values) if values else None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _rlimit_headroom() -> int | None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return None
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            used = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    except (OSError, ValueError, IndexError, StopIteration):
        used = 0
    return max(0, soft - used)


def _cgroup_headroom() -> int | None:
    """Headroom of this process's memory cgroup (v2 or v1); None when unlimited or unknown."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            base, limit_name, usage_name = Path("/sys/fs/cgroup") / parts[2].lstrip("/"), "memory.max", "memory.current"
        elif "memory" in parts[1].split(","):
            base = Path("/sys/fs/cgroup/memory") / parts[2].lstrip("/")
            limit_name, usage_name = "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        try:
            limit_text = (base / limit_name).read_text().strip()
            usage = int((base / usage_name).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit_text == "max" or not limit_text.isdigit() or int(limit_text) >= 2**60:
            continue
        return max(0, int(limit_text) - usage)
    return None


class ImageSource:
    """Images of the particles of a :class:`~relion_dynamight.relion.star.ParticleTable`, row by row."""

    def __init__(self, table: "ParticleTable", project_dir: Path | None = None, preload: bool = False) -> None:
        self.table = table
        self.project_dir = Path(project_dir) if project_dir is not None else None
        self.names = table.image_names
        parsed = [self._parse(i, n) for i, n in enumerate(self.names)]
        self._slot = np.fromiter((p[0] for p in parsed), dtype=np.int64, count=len(parsed))
        stacks, inverse = np.unique(np.array([p[1] for p in parsed], dtype=object), return_inverse=True)
        self._stack_id = inverse.astype(np.int64).reshape(-1)
        self._plain = np.array(["@" not in str(n) for n in self.names], dtype=bool)
        self._paths, self._headers = self._check_stacks(list(stacks))
        self._open: OrderedDict[int, mrcfile.mrcmmap.MrcMemmap] = OrderedDict()
        self._cache: np.ndarray | None = None
        if preload:
            self.preload()

    # -- construction-time checks ------------------------------------------------------------
    def _parse(self, row: int, name: str) -> tuple[int, str]:
        try:
            return parse_image_name(name)
        except InputError as exc:
            raise InputError(f"{self.table.path}: particle row {row + 1}: {exc}") from None

    def _check_stacks(self, stacks: list[str]) -> tuple[list[Path], list[StackHeader]]:
        order = np.argsort(self._stack_id, kind="stable")
        groups = np.split(order, np.flatnonzero(np.diff(self._stack_id[order])) + 1)
        expected = self.table.optics_image_size()  # None for 3.0 files: the first particle's image sets it
        paths: list[Path] = [Path()] * len(stacks)
        headers: list[StackHeader] = [StackHeader(0, 0, 0, 2)] * len(stacks)
        bases = _search_bases(self.table.path, self.project_dir)
        first = int(self._stack_id[0]) if len(self._stack_id) else 0
        for sid in sorted(range(len(stacks)), key=lambda k: k != first):
            rows, stack = groups[sid], stacks[sid]
            name = self.names[rows[0]]
            path = resolve_stack(stack, self.table.path, self.project_dir, bases)
            if path is None:
                raise _missing(name, stack, self.table.path, self.project_dir)
            header = read_header(path, name, self.table.path)
            if expected is None:
                expected = header.nx
            self._check_header(rows, path, header, expected)
            paths[sid], headers[sid] = path, header
        self.image_size = int(expected) if expected is not None else 0
        return paths, headers

    def _check_header(self, rows: np.ndarray, path: Path, h: StackHeader, expected: int) -> None:
        """Validate one stack against the particle rows ``rows`` that use it."""
        star = self.table.path
        if h.nx != h.ny:
            raise InputError(f"{path}: images are {h.nx}x{h.ny} pixels, not square (particle "
                             f"{self.names[rows[0]]} of {star}); re-extract with a square box")
        if h.nx != expected:
            raise InputError(f"{path}: images are {h.nx}x{h.ny} pixels but {star} says {expected} "
                             f"(_rlnImageSize / first image), particle {self.names[rows[0]]}; "
                             "use one box size for all particles")
        bad = rows[np.argmax(self._slot[rows])]
        if self._slot[bad] >= h.nz:
            raise InputError(f"{star}: particle {self.names[bad]} asks for image {self._slot[bad] + 1} but "
                             f"{path} holds {h.nz} images; fix _rlnImageName or the stack")
        plain = rows[self._plain[rows]]
        if plain.size and h.nz > 1:
            raise InputError(f"{star}: _rlnImageName {self.names[plain[0]]} has no N@ index but {path} holds "
                             f"{h.nz} images; use N@{self.names[plain[0]]}")

    # -- reading -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.names)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()  # memory maps do not survive pickling / forking
        return state

    def _data(self, sid: int) -> np.ndarray:
        """The memory-mapped ``(nz, N, N)`` data of stack ``sid`` (kept in a small LRU of open files)."""
        mrc = self._open.get(sid)
        if mrc is None:
            path = self._paths[sid]
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    mrc = mrcfile.mmap(path, mode="r", permissive=True)
            except (OSError, ValueError, EOFError) as exc:
                raise InputError(f"{path}: cannot read MRC data ({exc}); check the file") from None
            if mrc.data is None:
                mrc.close()
                raise InputError(f"{path}: MRC file has no readable data; check the file")
            self._open[sid] = mrc
            while len(self._open) > MAX_OPEN_STACKS:
                self._open.popitem(last=False)[1].close()
        else:
            self._open.move_to_end(sid)
        data = mrc.data
        return data[None] if data.ndim == 2 else data

    def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Images of particle rows ``indices`` as float32 ``(k, N, N)`` ``[y, x]``; rejects NaN/Inf pixels."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"particle index out of range 0..{len(self) - 1}")
        if self._cache is not None:
            return self._cache[idx].astype(np.float32)
        out = np.empty((idx.size, self.image_size, self.image_size), dtype=np.float32)
        sids, slots = self._stack_id[idx], self._slot[idx]
        order = np.lexsort((slots, sids))
        bounds = np.flatnonzero(np.diff(sids[order])) + 1
        for group in np.split(order, bounds) if idx.size else []:
            out[group] = self._data(int(sids[group[0]]))[slots[group]]
        finite = np.isfinite(out).all(axis=(1, 2))
        if not finite.all():
            name = self.names[idx[np.argmin(finite)]]
            raise InputError(f"{self.table.path}: image {name} contains NaN or Inf pixels; remove the particle "
                             "or repair the stack")
        return out

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()

    # -- preloading ----------------------------------------------------------------------------
    @property
    def preload_dtype(self) -> np.dtype:
        """float16 when every stack is float16 (mode 12), else float32."""
        return np.dtype(np.float16 if all(h.mode == 12 for h in self._headers) else np.float32)

    def estimate_bytes(self) -> int:
        """Bytes of RAM that :meth:`preload` needs for all images."""
        return len(self) * self.image_size**2 * self.preload_dtype.itemsize

    def preload(self, chunk: int = 1024) -> None:
        """Read every image into RAM once; refuses with :class:`InputError` when it would not fit."""
        if self._cache is not None:
            return
        need, avail = self.estimate_bytes(), available_memory_bytes()
        if avail is not None and need > PRELOAD_MEMORY_FRACTION * avail:
            raise InputError(f"{self.table.path}: preloading {len(self)} images of {self.image_size}² pixels needs "
                             f"{need / 2**30:.1f} GiB but only {avail / 2**30:.1f} GiB of memory is available; "
                             "run without preloading images")
        cache = np.empty((len(self), self.image_size, self.image_size), dtype=self.preload_dtype)
        for start in range(0, len(self), chunk):
            rows = np.arange(start, min(start + chunk, len(self)))
            cache[rows] = self.read(rows)
        self.close()
        self._cache = cache

    @property
    def preloaded(self) -> bool:
        return self._cache is not None
