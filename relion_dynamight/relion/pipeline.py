"""RELION's ``default_pipeline.star``: read, edit and write it in the project's own format, under RELION's lock.

Three formats exist (relion-facts §3), told apart by their column labels:

* ``"5"`` (RELION 5, ``# version 50001``): type *labels* for processes and nodes, plus the column
  ``_rlnPipeLineNodeTypeLabelDepth``;
* ``"4"`` (RELION 4.0, ``# version 30001``): type labels, no depth column, older node labels
  (``ParticlesData.star.relion``, ``DensityMap.mrc.halfmap``);
* ``"3.1"`` (RELION 3.1, ``# version 30001``): integer ``_rlnPipeLineProcessType`` (External = 99),
  ``_rlnPipeLineProcessStatus`` (0 Running … 4 Aborted) and ``_rlnPipeLineNodeType``.

A file is written back in the format it was read in.  Every read-modify-write goes through
:func:`update_pipeline`, which takes RELION's own lock (``mkdir .relion_lock`` plus the file
``.relion_lock/lock_default_pipeline.star``; 20 tries 3 s apart, like RELION) and replaces the file
atomically, so a crash never leaves a half-written pipeline.  Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

from relion_dynamight.errors import InputError

PIPELINE_NAME = "default"
LOCK_DIR = ".relion_lock"
PIPELINE_HAS_CHANGED = ".pipeline_has_changed"
VERSIONS = ("5", "4", "3.1")
STATUSES = ("Running", "Scheduled", "Succeeded", "Failed", "Aborted")  # RELION 3.1 integers 0..4

#: Our process type label (RELION 5) -> (RELION 4.0 label, RELION 3.1 integer).  RELION < 5 has no
#: DynaMight job type: such projects get the job registered as an External job.
PROCESS_TYPES = {
    "dynamight": ("relion.external", 99),
    "relion.external": ("relion.external", 99),
}

#: RELION 5 node-label prefix -> (RELION 4.0 label, RELION 3.1 integer, keep the rest of the label in 4.0);
#: the longest matching prefix wins.
NODE_TYPES = {
    "ParticleGroupMetadata.star.relion": ("ParticlesData.star.relion", 3, True),
    "DensityMap.mrc.relion.halfmap": ("DensityMap.mrc.halfmap", 10, False),
    "DensityMap.mrc": ("DensityMap.mrc", 6, False),
    "Mask3D.mrc": ("Mask3D.mrc", 7, False),
    "LogFile.pdf.relion": ("LogFile.pdf.relion", 13, True),
    "ProcessData.star.relion": ("ProcessData.star.relion", 0, True),
}

T = TypeVar("T")


class PipelineLockError(InputError):
    """``.relion_lock`` stayed in place for all retries (another writer, or a stale lock)."""


@dataclass
class Process:
    name: str            # "DynaMight/job012/" (with trailing slash)
    alias: str           # "None" when there is none
    type: str            # label (RELION 4/5) or integer as text (RELION 3.1)
    status: str          # label (RELION 4/5) or integer as text (RELION 3.1)


@dataclass
class Node:
    name: str
    type: str            # label (RELION 4/5) or integer as text (RELION 3.1)
    depth: str = "1"     # RELION 5 only


@dataclass
class Pipeline:
    """The five tables of a pipeline file; type and status values are kept exactly as read."""

    version: str = "5"
    job_counter: int = 1
    processes: list[Process] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    input_edges: list[tuple[str, str]] = field(default_factory=list)    # (from node, process)
    output_edges: list[tuple[str, str]] = field(default_factory=list)   # (process, to node)

    # -- lookups and edits (all version-aware) ---------------------------------------------------
    def process(self, name: str) -> Process | None:
        name = _dir_name(name)
        return next((p for p in self.processes if p.name == name), None)

    def node(self, name: str) -> Node | None:
        return next((n for n in self.nodes if n.name == name), None)

    def process_type_label(self, process: Process) -> str:
        """The process type as a label (RELION 3.1 integers are translated where we know them)."""
        if self.version != "3.1":
            return process.type
        return {"99": "relion.external"}.get(process.type, f"relion-3.1-type-{process.type}")

    def status_label(self, process: Process) -> str:
        if self.version == "3.1":
            return STATUSES[int(process.status)]
        return process.status

    def add_process(self, name: str, type_label: str, status: str = "Running", alias: str = "None") -> Process:
        """Add (or update the status of) a process; ``type_label`` and ``status`` are RELION 5 labels."""
        existing = self.process(name)
        if existing is not None:
            existing.status = self._status_value(status)
            return existing
        proc = Process(_dir_name(name), alias, process_type_value(type_label, self.version), self._status_value(status))
        self.processes.append(proc)
        return proc

    def set_status(self, name: str, status: str) -> None:
        proc = self.process(name)
        if proc is None:
            raise KeyError(f"process {name} is not in the pipeline")
        proc.status = self._status_value(status)

    def add_node(self, name: str, label: str) -> Node:
        """Add a node (``label`` is a RELION 5 node type label) unless one with that name exists."""
        existing = self.node(name)
        if existing is not None:
            return existing
        node = Node(name, node_type_value(label, self.version))
        self.nodes.append(node)
        return node

    def add_input_edge(self, node_name: str, label: str, process_name: str) -> None:
        self.add_node(node_name, label)
        edge = (node_name, _dir_name(process_name))
        if edge not in self.input_edges:
            self.input_edges.append(edge)

    def add_output_edge(self, process_name: str, node_name: str, label: str) -> None:
        self.add_node(node_name, label)
        edge = (_dir_name(process_name), node_name)
        if edge not in self.output_edges:
            self.output_edges.append(edge)

    def _status_value(self, status: str) -> str:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}; use one of {', '.join(STATUSES)}")
        return str(STATUSES.index(status)) if self.version == "3.1" else status


def _dir_name(name: str) -> str:
    return name if name.endswith("/") else name + "/"


# -- type conversions between versions ------------------------------------------------------------
def process_type_value(label: str, version: str) -> str:
    """The process type as the ``version`` writes it (label for 5, older label for 4, integer for 3.1)."""
    if version == "5":
        return label
    if label not in PROCESS_TYPES:
        raise ValueError(f"no RELION {version} process type for {label!r}")
    old_label, number = PROCESS_TYPES[label]
    return old_label if version == "4" else str(number)


def node_type_value(label: str, version: str) -> str:
    """A RELION 5 node type label as ``version`` writes it (e.g. ``DensityMap.mrc.halfmap`` or ``10``)."""
    if version == "5":
        return label
    best = max((k for k in NODE_TYPES if label.startswith(k)), key=len, default=None)
    if best is None:
        raise ValueError(f"no RELION {version} node type for label {label!r}")
    old_label, number, keep_suffix = NODE_TYPES[best]
    if version == "3.1":
        return str(number)
    return old_label + (label[len(best):] if keep_suffix else "")


# -- STAR text -------------------------------------------------------------------------------------
def _tokens(line: str) -> list[str]:
    try:
        return shlex.split(line, posix=True)
    except ValueError:
        return line.split()


def _parse_blocks(text: str) -> tuple[list[str], dict[str, tuple[list[str], list[list[str]]]]]:
    """``(version comments, {block: (labels, rows)})``; key-value blocks become one-row tables."""
    versions: list[str] = []
    blocks: dict[str, tuple[list[str], list[list[str]]]] = {}
    current: tuple[list[str], list[list[str]]] | None = None
    in_loop = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line[1:].split()
            if len(parts) == 2 and parts[0] == "version":
                versions.append(parts[1])
            continue
        if line.startswith("data_"):
            current = ([], [])
            blocks[line[5:]] = current
            in_loop = False
        elif current is None:
            raise ValueError(f"text before the first data_ block: {line!r}")
        elif line == "loop_":
            in_loop = True
        elif line.startswith("_"):
            parts = line.split(None, 1)
            current[0].append(parts[0][1:])
            if not in_loop:
                value = _tokens(parts[1]) if len(parts) > 1 else [""]
                if not current[1]:
                    current[1].append([])
                current[1][0].append(value[0] if value else "")
        elif in_loop:
            current[1].append(_tokens(line))
        else:
            raise ValueError(f"unexpected line {line!r}")
    return versions, blocks


def _detect_version(path: Path, versions: list[str], blocks: dict) -> str:
    proc_labels = blocks.get("pipeline_processes", ([], []))[0]
    node_labels = blocks.get("pipeline_nodes", ([], []))[0]
    if "rlnPipeLineProcessType" in proc_labels or "rlnPipeLineNodeType" in node_labels:
        return "3.1"
    if "rlnPipeLineNodeTypeLabelDepth" in node_labels:
        return "5"
    if "rlnPipeLineProcessTypeLabel" in proc_labels or "rlnPipeLineNodeTypeLabel" in node_labels:
        return "5" if "50001" in versions else "4"
    known = {"50001": "5", "30001": "3.1"}
    unknown = [v for v in versions if v not in known]
    if unknown:
        raise InputError(f"{path}: unknown pipeline version '# version {unknown[0]}' (this program knows RELION "
                         "3.1, 4.0 and 5.0 pipelines); run it with the RELION version that made the project")
    # An empty pipeline (no processes yet): RELION 5 writes 50001; 30001 or nothing -> RELION 3.1 style,
    # which RELION 4 and 5 also read.
    return known.get(versions[0], "3.1") if versions else "3.1"


def _column(labels: list[str], name: str, path: Path, block: str) -> int:
    if name not in labels:
        raise InputError(f"{path}: table data_{block} lacks column _{name}; the pipeline file is damaged or "
                         "from an unknown RELION version")
    return labels.index(name)


def parse_pipeline(text: str, path: Path = Path("default_pipeline.star")) -> Pipeline:
    """Parse pipeline STAR text (any of the three versions) into a :class:`Pipeline`."""
    try:
        versions, blocks = _parse_blocks(text)
    except ValueError as exc:
        raise InputError(f"{path}: not a RELION pipeline file ({exc})") from exc
    if "pipeline_general" not in blocks:
        raise InputError(f"{path}: no data_pipeline_general table; not a RELION pipeline file")
    version = _detect_version(path, versions, blocks)
    pipe = Pipeline(version=version)
    labels, rows = blocks["pipeline_general"]
    counter = rows[0][_column(labels, "rlnPipeLineJobCounter", path, "pipeline_general")] if rows else "1"
    try:
        pipe.job_counter = int(float(counter))
    except ValueError as exc:
        raise InputError(f"{path}: _rlnPipeLineJobCounter is {counter!r}, not a number") from exc
    legacy = version == "3.1"
    if "pipeline_processes" in blocks:
        labels, rows = blocks["pipeline_processes"]
        cols = [_column(labels, c, path, "pipeline_processes") for c in (
            "rlnPipeLineProcessName", "rlnPipeLineProcessAlias",
            "rlnPipeLineProcessType" if legacy else "rlnPipeLineProcessTypeLabel",
            "rlnPipeLineProcessStatus" if legacy else "rlnPipeLineProcessStatusLabel")]
        pipe.processes = [Process(*(r[c] for c in cols)) for r in rows]
    if "pipeline_nodes" in blocks:
        labels, rows = blocks["pipeline_nodes"]
        name_c = _column(labels, "rlnPipeLineNodeName", path, "pipeline_nodes")
        type_c = _column(labels, "rlnPipeLineNodeType" if legacy else "rlnPipeLineNodeTypeLabel", path,
                         "pipeline_nodes")
        depth_c = labels.index("rlnPipeLineNodeTypeLabelDepth") if version == "5" and \
            "rlnPipeLineNodeTypeLabelDepth" in labels else None
        pipe.nodes = [Node(r[name_c], r[type_c], r[depth_c] if depth_c is not None else "1") for r in rows]
    for block, first, second, attr in (
            ("pipeline_input_edges", "rlnPipeLineEdgeFromNode", "rlnPipeLineEdgeProcess", "input_edges"),
            ("pipeline_output_edges", "rlnPipeLineEdgeProcess", "rlnPipeLineEdgeToNode", "output_edges")):
        if block in blocks:
            labels, rows = blocks[block]
            a, b = _column(labels, first, path, block), _column(labels, second, path, block)
            setattr(pipe, attr, [(r[a], r[b]) for r in rows])
    return pipe


def _quote(value: str) -> str:
    if value == "":
        return '""'
    if any(c.isspace() for c in value):
        return f'"{value}"'
    return value


def _table(version_line: str, block: str, labels: list[str], rows: Sequence[tuple[str, ...]]) -> list[str]:
    out = ["", version_line, "", f"data_{block}", "", "loop_"]
    out += [f"_{label} #{i}" for i, label in enumerate(labels, start=1)]
    out += [" ".join(_quote(v) for v in row) for row in rows]
    out.append("")
    return out


def format_pipeline(pipe: Pipeline) -> str:
    """The pipeline as RELION ``pipe.version`` writes it (empty tables are left out, as RELION does)."""
    if pipe.version not in VERSIONS:
        raise ValueError(f"unknown pipeline version {pipe.version!r}")
    vline = "# version 50001" if pipe.version == "5" else "# version 30001"
    legacy = pipe.version == "3.1"
    out = ["", vline, "", "data_pipeline_general", "", f"_rlnPipeLineJobCounter {pipe.job_counter}", ""]
    if pipe.processes:
        labels = ["rlnPipeLineProcessName", "rlnPipeLineProcessAlias",
                  "rlnPipeLineProcessType" if legacy else "rlnPipeLineProcessTypeLabel",
                  "rlnPipeLineProcessStatus" if legacy else "rlnPipeLineProcessStatusLabel"]
        out += _table(vline, "pipeline_processes", labels,
                      [(p.name, p.alias, p.type, p.status) for p in pipe.processes])
    if pipe.nodes:
        labels = ["rlnPipeLineNodeName", "rlnPipeLineNodeType" if legacy else "rlnPipeLineNodeTypeLabel"]
        if pipe.version == "5":
            labels.append("rlnPipeLineNodeTypeLabelDepth")
            rows: list[tuple[str, ...]] = [(n.name, n.type, n.depth) for n in pipe.nodes]
        else:
            rows = [(n.name, n.type) for n in pipe.nodes]
        out += _table(vline, "pipeline_nodes", labels, rows)
    if pipe.input_edges:
        out += _table(vline, "pipeline_input_edges", ["rlnPipeLineEdgeFromNode", "rlnPipeLineEdgeProcess"],
                      pipe.input_edges)
    if pipe.output_edges:
        out += _table(vline, "pipeline_output_edges", ["rlnPipeLineEdgeProcess", "rlnPipeLineEdgeToNode"],
                      pipe.output_edges)
    return "\n".join(out) + "\n"


def pipeline_path(project_dir: Path, name: str = PIPELINE_NAME) -> Path:
    return Path(project_dir) / f"{name}_pipeline.star"


def read_pipeline(project_dir: Path, name: str = PIPELINE_NAME) -> Pipeline:
    """Read ``PROJECT/default_pipeline.star`` (no lock: use :func:`update_pipeline` to change it)."""
    path = pipeline_path(project_dir, name)
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise InputError(f"{path}: not found; run inside a RELION project directory") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot be read ({exc})") from exc
    return parse_pipeline(text, path)


def write_pipeline(project_dir: Path, pipe: Pipeline, name: str = PIPELINE_NAME) -> Path:
    """Replace the pipeline file atomically (temporary file + ``os.replace``); call it under the lock."""
    path = pipeline_path(project_dir, name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(format_pipeline(pipe))
            handle.flush()
            os.fsync(handle.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        else:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


# -- RELION's lock --------------------------------------------------------------------------------
@contextlib.contextmanager
def pipeline_lock(project_dir: Path, message: str = "relion_dynamight", name: str = PIPELINE_NAME,
                  retries: int = 20, wait_s: float = 3.0) -> Iterator[None]:
    """Hold RELION's pipeline lock: ``mkdir .relion_lock`` + ``.relion_lock/lock_<name>_pipeline.star``.

    ``mkdir`` is atomic, so exactly one process (ours or RELION's) holds the lock.  After ``retries``
    failed attempts ``wait_s`` apart (RELION: 20 × 3 s) a :class:`PipelineLockError` explains how to
    remove a stale lock.
    """
    project_dir = Path(project_dir)
    lock_dir = project_dir / LOCK_DIR
    lock_file = lock_dir / f"lock_{name}_pipeline.star"
    for attempt in range(retries + 1):
        try:
            lock_dir.mkdir()
            break
        except FileExistsError:
            if attempt == retries:
                raise PipelineLockError(
                    f"{lock_dir}: RELION's pipeline lock is still held after {retries} tries "
                    f"({retries * wait_s:g} s). If no RELION GUI, relion_pipeliner, relion_schemer or other "
                    f"relion_dynamight job is writing this project, the lock is stale: remove it with "
                    f"'rm -rf {lock_dir}' and run again") from None
            time.sleep(wait_s)
        except PermissionError as exc:
            raise InputError(f"{lock_dir}: cannot create RELION's pipeline lock ({exc}); you need write "
                             "permission in the project directory") from exc
    try:
        lock_file.write_text(message + "\n")
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock_file.unlink()
        with contextlib.suppress(OSError):
            lock_dir.rmdir()


def update_pipeline(project_dir: Path, edit: Callable[[Pipeline], T], message: str = "relion_dynamight",
                    retries: int = 20, wait_s: float = 3.0) -> T:
    """Read, ``edit`` in place and write back the pipeline under RELION's lock; returns ``edit``'s value.

    The file keeps its version format.  ``.pipeline_has_changed`` is touched so an open GUI reloads.
    """
    with pipeline_lock(project_dir, message, retries=retries, wait_s=wait_s):
        pipe = read_pipeline(project_dir)
        result = edit(pipe)
        write_pipeline(project_dir, pipe)
    with contextlib.suppress(OSError):
        (Path(project_dir) / PIPELINE_HAS_CHANGED).touch()
    return result


def touch_node_files(project_dir: Path, pipe: Pipeline, names: list[str]) -> None:
    """Touch ``.Nodes/<type>/<name>`` for existing node files, as RELION does for its file browsers."""
    project_dir = Path(project_dir)
    for name in names:
        node = pipe.node(name)
        if node is None or not (project_dir / name).exists():
            continue
        kind = node.type if pipe.version == "3.1" else node.type.split(".")[0]
        target = project_dir / ".Nodes" / kind / name
        with contextlib.suppress(OSError):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
