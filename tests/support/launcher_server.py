"""A fork server for running ``relion_dynamight`` many times in tests without paying torch's import each time.

Importing torch, pandas and friends costs ~3 s of CPU per process, most of a bad-input case's run.  The server
(this file run as a script) imports those third-party libraries once -- never ``relion_dynamight`` itself, nor
mpi4py -- and then forks one child per request.  The child is a fresh process for everything under test: it
changes to the case's directory, gets ``/dev/null`` as stdin and files as stdout/stderr, sets ``sys.argv`` and
runs ``relion_dynamight.launcher`` as ``python -m`` would (``__main__``, so the SIGTERM handler and the
watchdog are set up as usual), and ends through the interpreter's normal exit.  Exit codes are those of
``subprocess`` (negative = killed by that signal).

Protocol: one JSON object per line in both directions.  The server writes ``{"ready": true}`` after its
imports; a request ``{"argv": [...], "cwd": ..., "stdout": path, "stderr": path}`` is answered by
``{"pid": child}`` and, when the child has ended, ``{"returncode": code}``.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: Third-party modules imported before forking (what the launcher's tasks import anyway).
PRELOAD = ("numpy", "torch", "pandas", "starfile", "mrcfile", "h5py", "click", "matplotlib", "matplotlib.pyplot")


# -- server side --------------------------------------------------------------------------------------------
def _child(request: dict) -> None:
    """In the forked child: become ``python -m relion_dynamight.launcher ARGV`` run in ``cwd``; never returns."""
    import runpy

    code: object = 1
    try:
        os.chdir(request["cwd"])
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                                (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            new = os.open(path, flags, 0o600)
            os.dup2(new, fd)
            os.close(new)
        sys.argv = [sys.executable, *request["argv"]]
        sys.path[0] = os.getcwd()  # as ``python -m`` does (the server's own entry was this file's directory)
        runpy.run_module("relion_dynamight.launcher", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # noqa: BLE001 - an uncaught error ends the process as it would end python
        import traceback

        traceback.print_exc()
        code = 1
    raise SystemExit(code)  # the normal interpreter exit: atexit handlers, flushed streams


def serve() -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


# -- client side --------------------------------------------------------------------------------------------
class LauncherServer:
    """One server process; :meth:`run` is used like ``subprocess.run(..., capture_output=True, text=True)``.

    Not thread-safe: give each thread its own server.
    """

    def __init__(self, env: dict[str, str] | None = None, start_timeout: float = 300) -> None:
        self._dir = tempfile.mkdtemp(prefix="launcher_server_")
        self._buffer = b""
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env={**os.environ, **(env or {})}, cwd=self._dir)
        if "ready" not in self._reply(start_timeout):
            raise RuntimeError("launcher server did not start")

    def _reply(self, timeout: float) -> dict:
        """The next line of the server (unbuffered reads: ``select`` must see every byte not yet consumed)."""
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"no answer from the launcher server within {timeout:.0f} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"the launcher server ended (exit code {self.proc.wait()})")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def run(self, argv: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
        out, err = Path(self._dir) / "stdout", Path(self._dir) / "stderr"
        request = {"argv": [str(a) for a in argv], "cwd": str(cwd), "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        pid = self._reply(60)["pid"]
        try:
            code = self._reply(timeout)["returncode"]
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            self._reply(60)
            raise subprocess.TimeoutExpired(argv, timeout) from None
        return subprocess.CompletedProcess(argv, code, out.read_text(errors="replace"), err.read_text(errors="replace"))

    def close(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.wait(timeout=60)
        for name in ("stdout", "stderr"):
            Path(self._dir, name).unlink(missing_ok=True)
        os.rmdir(self._dir)


if __name__ == "__main__":
    serve()
