"""RELION's job-directory protocol (relion-facts §2), shared by every command.

Standard library only: the launcher imports this module before anything heavy so that even an import
failure of torch or of our own package leaves ``RELION_JOB_EXIT_FAILURE`` behind.

* At start: stale ``RELION_JOB_EXIT_*`` and ``RELION_JOB_ABORT_NOW`` files are removed.
* During the run: :meth:`Job.check_abort` is called between batches; it raises :class:`JobAborted`
  when ``RELION_JOB_ABORT_NOW`` exists or SIGTERM was received.
* At the end: exactly one of ``RELION_JOB_EXIT_SUCCESS``/``FAILURE``/``ABORTED`` is written, and on
  success ``RELION_OUTPUT_NODES.star`` (RELION 5 labels) is written *before* the exit file.
"""

from __future__ import annotations

import os
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

EXIT_SUCCESS = "RELION_JOB_EXIT_SUCCESS"
EXIT_FAILURE = "RELION_JOB_EXIT_FAILURE"
EXIT_ABORTED = "RELION_JOB_EXIT_ABORTED"
ABORT_NOW = "RELION_JOB_ABORT_NOW"
OUTPUT_NODES = "RELION_OUTPUT_NODES.star"
EXIT_FILES = (EXIT_SUCCESS, EXIT_FAILURE, EXIT_ABORTED)
#: Signals that stop a job with ABORTED (SIGHUP: the terminal or the ssh session closed).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))

#: RELION 3.1 integer node types for the labels we declare (relion-facts §2).
LEGACY_NODE_TYPES = {
    "ParticleGroupMetadata.star": 3,
    "DensityMap.mrc.relion.halfmap": 10,
    "Mask3D.mrc": 7,
    "DensityMap.mrc": 6,
}

_TASKS_WITH_POSITIONAL_DIR = (
    "explore-latent-space",
    "optimize-inverse-deformations",
    "deformable-backprojection",
)


def job_dir_from_argv(argv: Sequence[str]) -> Path | None:
    """Find the job directory a command line refers to, without importing anything heavy.

    Order: ``--pipeline-control``/``--pipeline_control`` (what RELION appends), then
    ``--output-directory`` (optimize-deformations), then the positional directory of the three
    "continue" tasks.  Returns None when the command has no job directory (e.g. ``reconstruct``).
    """
    args = [a.strip() for a in argv]
    for flag in ("--pipeline-control", "--pipeline_control", "--output-directory", "--output_directory"):
        for i, a in enumerate(args):
            if a == flag and i + 1 < len(args) and args[i + 1] and not args[i + 1].startswith("--"):
                return Path(args[i + 1])
            if a.startswith(flag + "="):
                return Path(a.split("=", 1)[1])
    for i, a in enumerate(args[:-1]):
        if a in _TASKS_WITH_POSITIONAL_DIR and not args[i + 1].startswith("-"):
            return Path(args[i + 1])
    return None


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; when the block succeeds the file is made readable
    (0644), flushed to disk and renamed onto ``path``; on any exception it is removed.

    Readers (RELION, a resumed run, another rank) therefore only ever see a complete file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:   # name the file the user asked for, not our temporary one
        tmp.unlink(missing_ok=True)
        raise type(exc)(exc.errno, exc.strerror or str(exc), str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_output`)."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_output_nodes(job_dir: Path, nodes: Iterable[tuple[str, str]], legacy: bool = False) -> Path:
    """Write ``RELION_OUTPUT_NODES.star`` declaring ``(node name, RELION 5 type label)`` pairs.

    ``legacy=True`` writes RELION 3.1's integer ``_rlnPipeLineNodeType`` column instead of labels.
    """
    lines = ["", "# version 50001" if not legacy else "# version 30001", "", "data_output_nodes", "", "loop_",
             "_rlnPipeLineNodeName #1"]
    lines.append("_rlnPipeLineNodeType #2" if legacy else "_rlnPipeLineNodeTypeLabel #2")
    for name, label in nodes:
        value = str(legacy_node_type(label)) if legacy else label
        lines.append(f"{name} {value}")
    path = Path(job_dir) / OUTPUT_NODES
    atomic_write_text(path, "\n".join(lines) + "\n\n")
    return path


def legacy_node_type(label: str) -> int:
    """RELION 3.1 integer node type for a RELION 5 label (longest matching prefix)."""
    best = max((k for k in LEGACY_NODE_TYPES if label.startswith(k)), key=len, default=None)
    if best is None:
        raise ValueError(f"no RELION 3.1 node type for label {label!r}")
    return LEGACY_NODE_TYPES[best]


def read_output_nodes(job_dir: Path) -> list[tuple[str, str]]:
    """Parse ``RELION_OUTPUT_NODES.star`` back into ``(name, label)`` pairs."""
    rows: list[tuple[str, str]] = []
    in_loop = False
    for raw in (Path(job_dir) / OUTPUT_NODES).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line == "loop_":
            in_loop = True
            continue
        if line.startswith("_") or line.startswith("data_"):
            continue
        if in_loop:
            name, label = line.split()[:2]
            rows.append((name, label))
    return rows


@contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """Hold SIGTERM/SIGINT/SIGHUP back (delivered on exit from the block) where the platform allows it."""
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    except (AttributeError, ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Job:
    """The exit-file and abort state of one job directory.

    ``writer=False`` (MPI ranks other than 0) makes every file operation a no-op, while abort
    polling still works on all ranks.
    """

    def __init__(self, job_dir: Path | None, writer: bool = True) -> None:
        self.job_dir = Path(job_dir) if job_dir is not None else None
        self.writer = writer
        self._terminated = False
        #: Files the task wrote that are not output nodes but must pass the output check before SUCCESS.
        self.outputs_to_check: list[Path] = []

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Create the directory, remove stale exit/abort files, and route SIGTERM to an abort."""
        if self.job_dir is not None and self.writer:
            self.job_dir.mkdir(parents=True, exist_ok=True)
            for name in (*EXIT_FILES, ABORT_NOW):
                try:
                    (self.job_dir / name).unlink()
                except FileNotFoundError:
                    pass
        for sig in STOP_SIGNALS:
            try:
                signal.signal(sig, self._on_stop_signal)
            except (ValueError, OSError):  # not in the main thread
                pass

    def _on_stop_signal(self, signum: int, frame: object) -> None:
        """SIGTERM/SIGINT/SIGHUP: stop with ABORTED.  Only the first signal raises; clusters send several
        (``scancel``, ``timeout`` and MPI launchers signal the whole process group, wrappers forward another),
        and a second one must not interrupt the clean-up of the first."""
        if self._terminated:
            return
        self._terminated = True
        from relion_dynamight.errors import JobAborted

        raise JobAborted(f"received {signal.Signals(signum).name}")

    def abort_requested(self) -> bool:
        return self._terminated or (self.job_dir is not None and (self.job_dir / ABORT_NOW).exists())

    def check_abort(self) -> None:
        """Raise :class:`JobAborted` if RELION asked this job to stop."""
        if self.abort_requested():
            from relion_dynamight.errors import JobAborted

            raise JobAborted(f"{ABORT_NOW} found in {self.job_dir}")

    def _touch(self, name: str) -> None:
        if self.job_dir is None or not self.writer:
            return
        with _stop_signals_blocked():   # a stop signal must not leave the directory without an exit file
            self._write_exit_file(name)

    def _write_exit_file(self, name: str) -> None:
        assert self.job_dir is not None
        self.job_dir.mkdir(parents=True, exist_ok=True)
        for other in EXIT_FILES:
            if other != name:
                try:
                    (self.job_dir / other).unlink()
                except FileNotFoundError:
                    pass
        (self.job_dir / name).touch()

    def succeed(self, nodes: Iterable[tuple[str, str]] = ()) -> None:
        """Write the output nodes (if any), then ``RELION_JOB_EXIT_SUCCESS``."""
        nodes = list(nodes)
        if nodes and self.job_dir is not None and self.writer:
            write_output_nodes(self.job_dir, nodes)
        self._touch(EXIT_SUCCESS)

    def fail(self) -> None:
        self._touch(EXIT_FAILURE)

    def aborted(self) -> None:
        self._touch(EXIT_ABORTED)
