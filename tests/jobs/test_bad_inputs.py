"""Issue 7: the catalogue of bad inputs through the real command line, and safe files.

Each case of :mod:`bad_input_cases` runs ``relion_dynamight`` in a subprocess on a private copy of a
tiny simulated project (a child forked by :mod:`launcher_server`, which has imported torch once, so the
~70 cases do not each pay ~3 s of imports; two cases at a time).  A bad input must end with exit code != 0, ONE ``ERROR:`` line (the last line of
stderr, no traceback) that names the problem, ``RELION_JOB_EXIT_FAILURE`` in the job directory, every
file that existed before byte-identical, no temporary file left behind and nothing written outside the
job directory.  The valid variants (RELION 3.0/3.1/4/5 files, comments, quotes, CRLF, spaces) must succeed
under the same rules, with ``RELION_OUTPUT_NODES.star`` written after every other output.
"""

from __future__ import annotations

import ast
import hashlib
import os
import queue
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import pytest

from bad_input_cases import PWNED, STAR, TRAINED, Case, catalogue, train
from runs import run_cli
from launcher_server import LauncherServer

PACKAGE = Path(__file__).resolve().parents[2] / "relion_dynamight"
EXIT_FILES = ("RELION_JOB_EXIT_SUCCESS", "RELION_JOB_EXIT_FAILURE", "RELION_JOB_EXIT_ABORTED", "RELION_JOB_ABORT_NOW",
              ".relion_dynamight.lock")   # protocol files (a stale lock is taken over)
ENV = {"DISPLAY": "", "WAYLAND_DISPLAY": "", "MPLBACKEND": "Agg"}
CASES = catalogue()
#: Cases run this many at a time.  Each is its own single-threaded subprocess (the test process only waits),
#: so on a 2-core CI machine two at a time halve the catalogue's wall time.  Cases with a ``preexec``
#: (resource limits) run alone afterwards: ``preexec_fn`` is unsafe while other threads start processes.
WORKERS = max(1, int(os.environ.get("RELION_DYNAMIGHT_TEST_JOBS", "2")))
FORK = os.environ.get("RELION_DYNAMIGHT_TEST_FORK", "1") != "0"


# -- helpers ----------------------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` (exit/abort files excluded)."""
    out = {}
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.name not in EXIT_FILES:
            out[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def run(argv: list[str], cwd: Path, preexec=None) -> subprocess.CompletedProcess:  # noqa: ANN001
    if preexec is None:
        return run_cli(*argv, cwd=cwd, env=ENV, timeout=300)
    cmd = [sys.executable, "-m", "relion_dynamight.launcher", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **ENV}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, preexec_fn=preexec)


def inside(rel: str, directory: str | None) -> bool:
    return directory is not None and (rel + "/").startswith(directory.rstrip("/") + "/")


def check_files(root: Path, before: dict[str, str], after: dict[str, str], job: str | None) -> None:
    changed = sorted(p for p, h in before.items() if after.get(p) != h)
    assert not changed, f"input files changed or deleted: {changed}"
    new = sorted(set(after) - set(before))
    leftovers = [p for p in new if p.endswith(".tmp") or ".tmp." in p.rsplit("/", 1)[-1]]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    outside = [p for p in new if not inside(p, job)]
    assert not outside, f"files written outside the job directory {job}: {outside}"
    assert not (root / PWNED).exists(), "a pickle was unpickled"


# -- fixtures: one simulated project, one trained job, copied per case -------------------------------------
@pytest.fixture(scope="module")
def project_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from relion_dynamight.jobs.simulate import simulate_project

    root = tmp_path_factory.mktemp("bad_inputs") / "project"
    simulate_project(root, n_particles=120, box=24, snr=0.5, seed=7)
    return root


@pytest.fixture(scope="module")
def trained_dir(project_dir: Path) -> tuple[Path, dict[str, str], dict[str, str]]:
    """The project plus ``DynaMight/job002`` trained for 1 epoch; with the tree before and after training."""
    root = project_dir.parent / "trained"
    shutil.copytree(project_dir, root)
    before = snapshot(root)
    proc = run_cli(*train(STAR, "Refine3D/job001/run_class001.mrc", TRAINED), "--pipeline-control", TRAINED,
                   cwd=root, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, before, snapshot(root)


def copy_of(src: Path, case: Case, tmp_path: Path) -> Path:
    root = tmp_path / ("my project dir" if "spaces" in case.id else "project")
    shutil.copytree(src, root, symlinks=True)
    for name in EXIT_FILES:  # the copied job starts clean, as RELION would leave it
        (root / TRAINED / name).unlink(missing_ok=True)
    return root


@dataclass
class Outcome:
    root: Path
    before: dict[str, str]       # snapshot before the command ran
    after: dict[str, str]        # and after
    proc: subprocess.CompletedProcess


def prepare(case: Case, src: Path, tmp_path: Path) -> tuple[Path, list[str], dict[str, str]]:
    """A private copy of ``src`` edited by the case; returns ``(root, argv, snapshot before)``."""
    root = copy_of(src, case, tmp_path)
    argv = case.prepare(root)
    if case.control:
        argv += ["--pipeline-control", case.job]
    return root, argv, snapshot(root)


def execute(case: Case, root: Path, argv: list[str], before: dict[str, str],
            servers: queue.Queue | None) -> Outcome:
    """Run the case's command: forked by a launcher server when one is given, else a fresh interpreter."""
    if servers is None or case.preexec is not None:
        proc = run(argv, root, case.preexec)
    else:
        server = servers.get()
        try:
            proc = server.run(argv, root, timeout=300)
        finally:
            servers.put(server)
    return Outcome(root, before, snapshot(root), proc)


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Future]:
    """``{case id: Future of its Outcome}`` for the selected cases, run ``WORKERS`` at a time.

    Copies are prepared here, in order; an error while preparing or running a case is raised by that case's
    test alone.  Project cases come first, so training the ``trained`` base overlaps with them.  Commands
    are forked from :mod:`launcher_server` processes (torch imported once; ``RELION_DYNAMIGHT_TEST_FORK=0``:
    a fresh interpreter per case); cases with a ``preexec`` always get a fresh interpreter.
    """
    selected = {item.callspec.params["case"].id for item in request.session.items
                if getattr(item, "originalname", "") == "test_case" and item.path == request.path}
    cases = sorted((c for c in CASES if c.id in selected), key=lambda c: (c.preexec is not None, c.base))
    out: dict[str, Future] = {}
    servers: queue.Queue | None = None
    if FORK and any(c.preexec is None for c in cases):
        servers = queue.Queue()
        for _ in range(WORKERS):
            servers.put(LauncherServer({"OMP_NUM_THREADS": "1", **ENV}))
    with ThreadPoolExecutor(WORKERS) as pool:
        for case in cases:
            out[case.id] = done = Future()
            try:
                src = request.getfixturevalue("trained_dir")[0] if case.base == "trained" \
                    else request.getfixturevalue("project_dir")
                root, argv, before = prepare(case, src, tmp_path_factory.mktemp("case"))
                if case.preexec is None:
                    out[case.id] = pool.submit(execute, case, root, argv, before, servers)
                    continue
                wait([f for f in out.values() if f is not done])  # alone: no other thread starts processes
                done.set_result(execute(case, root, argv, before, servers))
            except Exception as exc:  # noqa: BLE001 - reported by the case's own test
                done.set_exception(exc)
    while servers is not None and not servers.empty():
        servers.get().close()
    return out


# -- the catalogue ----------------------------------------------------------------------------------------
def test_catalogue_size() -> None:
    bad = [c for c in CASES if not c.ok]
    assert len(bad) >= 40 and len(CASES) - len(bad) >= 5
    assert {c.base for c in CASES} == {"project", "trained"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case: Case, outcomes: dict[str, Future]) -> None:
    res = outcomes[case.id].result()
    root, before, after, proc = res.root, res.before, res.after, res.proc
    job = root / case.job if case.job else None
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    report = f"rc={proc.returncode}\nstderr tail:\n" + "\n".join(lines[-8:])
    if case.ok:
        assert proc.returncode == 0, report
        assert (job / "RELION_JOB_EXIT_SUCCESS").exists(), report
        nodes = job / "RELION_OUTPUT_NODES.star"
        assert nodes.exists(), report
        newest = max((p.stat().st_mtime_ns for p in job.rglob("*") if p.is_file() and p.name not in
                      (*EXIT_FILES, nodes.name)), default=0)
        assert nodes.stat().st_mtime_ns >= newest, "RELION_OUTPUT_NODES.star was not written last"
        check_files(root, before, after, case.job)
        return
    assert proc.returncode != 0, report
    assert lines, "no error message on stderr"
    last = lines[-1]
    assert last.startswith("ERROR:"), report
    assert "Traceback" not in proc.stderr, report
    for word in case.expect:
        assert word.lower() in last.lower(), f"{word!r} not named in: {last}"
    if job is not None:
        assert (job / "RELION_JOB_EXIT_FAILURE").exists(), report
        assert not (job / "RELION_JOB_EXIT_SUCCESS").exists(), report
    check_files(root, before, after, case.job)


# -- safe files (issue 7, item 4) -------------------------------------------------------------------------
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def unsafe_calls(source: str) -> list[str]:
    """Loads of untrusted objects in ``source``: pickle-family imports, ``torch.load`` without
    ``weights_only=True``, ``numpy.load(..., allow_pickle=True)``, ``pandas.read_pickle``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name, owner = node.func.attr, ast.unparse(node.func.value)
            kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if owner == "torch" and name == "load" and kw.get("weights_only") != "True":
                found.append(f"line {node.lineno}: torch.load without weights_only=True")
            if name == "load" and owner in ("np", "numpy") and kw.get("allow_pickle") == "True":
                found.append(f"line {node.lineno}: numpy.load(allow_pickle=True)")
            if name == "read_pickle":
                found.append(f"line {node.lineno}: read_pickle")
    return found


def test_unsafe_call_detector_finds_what_it_should() -> None:
    bad = ("import pickle\nfrom dill import loads\nimport torch, numpy as np, pandas as pd\ntorch.load('a')\n"
           "torch.load('a', weights_only=False)\nnp.load('a', allow_pickle=True)\npd.read_pickle('x')\n")
    assert len(unsafe_calls(bad)) == 6
    assert unsafe_calls("import torch\ntorch.load('a', map_location='cpu', weights_only=True)\n") == []


def test_no_module_loads_pickles() -> None:
    problems = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        found = unsafe_calls(path.read_text())
        if found:
            problems[str(path.relative_to(PACKAGE.parent))] = found
    assert not problems, f"unsafe loading (use HDF5; torch.load only with weights_only=True): {problems}"


def test_training_writes_only_inside_its_job_directory(trained_dir: tuple[Path, dict, dict]) -> None:
    root, before, after = trained_dir
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    assert changed, "training wrote nothing"
    outside = [p for p in changed if not inside(p, TRAINED)]
    assert not outside, f"optimize-deformations changed files outside {TRAINED}: {outside}"
    assert any(p.endswith("checkpoint_final.h5") for p in changed)
    assert not [p for p in changed if p.endswith(".tmp")], "temporary files left behind"
    assert (root / TRAINED / "RELION_JOB_EXIT_SUCCESS").exists()
