"""``python <args>`` for the tests, as a process forked from an interpreter that has the heavy modules imported.

Importing torch, Lightning (with torchmetrics, torchvision and ``torch._dynamo``) and Hydra costs 5-8 s of CPU,
most of a small ``train.py`` run, and the suite starts about a hundred such runs.  :func:`run` and :func:`start`
start them through a fork server, one per test process: ``python tests/forked.py`` imports those modules once
(and computes nothing, so no OpenMP thread pool exists to be lost in a fork), then forks a child per command.  The
child is a separate process with its own pid, signals, exit status and output, and sets up what a new interpreter
would have:

- the environment given (``env``, else the caller's), the working directory, ``sys.argv`` and ``sys.path[0]``
  (the script's folder for a script, the working directory for ``-m``, ``''`` for ``-c``), and ``PYTHONPATH``
  entries the server did not have;
- stdout and stderr on files (read back as ``CompletedProcess.stdout`` / ``.stderr``, or together; stdout
  unbuffered under ``PYTHONUNBUFFERED``), stdin on ``/dev/null``, default signal handlers;
- torch's intra-op thread count from ``OMP_NUM_THREADS`` (else torch's default), OpenBLAS's from
  ``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS``, float32 default dtype;
- the exit status as Python's: ``SystemExit``'s code (a message: printed, status 1), 1 after an uncaught
  exception (traceback on stderr), ``-N`` when killed by signal N; ``atexit`` handlers run at the end.

What a child cannot show is an import-time message of a preloaded module: tests that check that a run's output
is free of warnings use ``fork=False`` (a real ``python``), as does anything that needs interpreter options.
``FLOWFORGE_TEST_FORK=0`` makes every call a real subprocess, as it is on systems other than Linux.

Protocol: the test process writes pickled requests ``(token, args, cwd, env, out_path, err_path)`` to the
server's stdin; the server answers ``("pid", token, pid)`` at the fork and ``("exit", pid, status)`` when the
child ends, on a pipe the child does not inherit.  Each message is a 4-byte length and a pickle."""

from __future__ import annotations

import atexit
import io
import itertools
import os
import pickle
import runpy
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRELOAD = ("torch", "flowforge.experiment", "flowforge.report")
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
_BLAS_VARIABLES = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")


# ------------------------------------------------------------------------------------------------ messages
def _send(fd: int, message) -> None:
    data = pickle.dumps(message)
    data = struct.pack("<I", len(data)) + data
    while data:
        data = data[os.write(fd, data) :]


def _read_exactly(fd: int, n: int) -> bytes | None:
    parts, left = [], n
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            return None
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _receive(fd: int):
    head = _read_exactly(fd, 4)
    if head is None:
        return None
    body = _read_exactly(fd, struct.unpack("<I", head)[0])
    return None if body is None else pickle.loads(body)


# ------------------------------------------------------------------------------------------------ the child
def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _child(args: list[str], cwd: str, env: dict, out_path: str, err_path: str | None, threads: int) -> None:
    """Run ``python *args`` in this freshly forked process and leave with its exit status."""
    code = 1
    try:
        out_fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        err_fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) if err_path else out_fd
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        for fd in {null, out_fd, err_fd} - {0, 1, 2}:
            os.close(fd)
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
        unbuffered = bool(env.get("PYTHONUNBUFFERED"))  # (as python -u: what a killed run printed is kept)
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", write_through=unbuffered)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", line_buffering=True)
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        for entry in reversed([p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]):
            if entry not in sys.path:
                sys.path.insert(1, entry)
        import torch

        given = next((env[k] for k in _THREAD_VARIABLES if env.get(k, "").isdigit()), None)
        torch.set_num_threads(int(given) if given else threads)
        blas = next((env[k] for k in _BLAS_VARIABLES if env.get(k, "").isdigit()), None)
        if blas:  # numpy's and scipy's OpenBLAS read these when they load, in the server
            from threadpoolctl import threadpool_limits

            threadpool_limits(int(blas), user_api="blas")
        torch.set_default_dtype(torch.float32)
        try:
            if args[0] == "-m":
                sys.argv = ["-m", *args[2:]]
                sys.path[0] = cwd
                runpy.run_module(args[1], run_name="__main__", alter_sys=True)
            elif args[0] == "-c":
                sys.argv = ["-c", *args[2:]]
                sys.path[0] = ""
                exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
            else:
                sys.argv = list(args)
                sys.path[0] = str(Path(cwd, args[0]).resolve().parent)
                runpy.run_path(args[0], run_name="__main__")
            code = 0
        except SystemExit as e:
            code = _exit_code(e.code)
        except BaseException:
            traceback.print_exc()
            code = 1
        try:
            atexit._run_exitfuncs()
        except BaseException:
            traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


# ------------------------------------------------------------------------------------------------ the server
def serve() -> None:
    """The fork server: import :data:`PRELOAD`, then fork a child per request until stdin closes (then any child
    still running is killed)."""
    requests = 0
    answers = os.dup(1)
    os.dup2(2, 1)  # whatever an import prints goes to stderr, not into the answers
    sys.stdout = sys.stderr
    os.set_inheritable(answers, False)
    os.set_inheritable(requests, False)
    for name in PRELOAD:
        __import__(name)
    threads = sys.modules["torch"].get_num_threads()  # a fresh interpreter's default (no thread count given)
    children: set[int] = set()
    try:
        while True:
            if select.select([requests], [], [], 0.02)[0]:
                message = _receive(requests)
                if message is None:
                    break
                token, args, cwd, env, out_path, err_path = message
                pid = os.fork()
                if pid == 0:
                    os.close(answers)  # (stdin, the requests, is replaced by /dev/null in the child)
                    _child(args, cwd, env, out_path, err_path, threads)
                children.add(pid)
                _send(answers, ("pid", token, pid))
            while children:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                children.discard(pid)
                _send(answers, ("exit", pid, os.waitstatus_to_exitcode(status)))
    except BrokenPipeError:
        pass
    # the test process has ended: so do the children it left running
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    for pid in children:
        os.waitpid(pid, 0)


class _Server:
    """The test process's end of one fork server."""

    def __init__(self):
        env = {k: v for k, v in os.environ.items() if k not in _THREAD_VARIABLES + _BLAS_VARIABLES}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
        )
        self.requests, self.answers = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        self.tokens = itertools.count()
        self.exits: dict[int, int] = {}

    def fork(self, args, cwd, env, out_path, err_path) -> int:
        token = next(self.tokens)
        _send(self.requests, (token, args, cwd, env, out_path, err_path))
        while True:
            message = self._next(None)
            if message[0] == "pid" and message[1] == token:
                return message[2]

    def _next(self, timeout: float | None):
        """The next message (None when none came within ``timeout``); exits are recorded as they pass."""
        if timeout is not None and not select.select([self.answers], [], [], timeout)[0]:
            return None
        message = _receive(self.answers)
        if message is None:
            raise RuntimeError(f"the test fork server ended (status {self.proc.wait()})")
        if message[0] == "exit":
            self.exits[message[1]] = message[2]
        return message

    def status(self, pid: int, timeout: float | None = 0.0) -> int | None:
        """The exit status of child ``pid``, waiting up to ``timeout`` seconds (None: for ever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while pid not in self.exits:
            left = None if deadline is None else deadline - time.monotonic()
            if self._next(None if left is None else max(0.0, left)) is None and left <= 0:
                break
        return self.exits.get(pid)


_server: _Server | None = None


def _fork_server() -> _Server:
    global _server
    if _server is None or _server.proc.poll() is not None:
        _server = _Server()
    return _server


def _fork_enabled() -> bool:
    """Linux only (macOS frameworks are not safe to use in a forked child), unless ``FLOWFORGE_TEST_FORK=0``."""
    return sys.platform == "linux" and os.environ.get("FLOWFORGE_TEST_FORK", "1").lower() not in ("0", "false", "no")


# ------------------------------------------------------------------------------------------------ the API
class Process:
    """A started command: the parts of :class:`subprocess.Popen` the tests use."""

    def __init__(self, args: list[str], cwd, env: dict, merge_stderr: bool, fork: bool):
        self.args = args
        self._dir = tempfile.TemporaryDirectory(prefix="forked-")
        self._out = os.path.join(self._dir.name, "stdout")
        self._err = None if merge_stderr else os.path.join(self._dir.name, "stderr")
        self.returncode: int | None = None
        if fork and _fork_enabled():
            self._server, self._popen = _fork_server(), None
            self.pid = self._server.fork(args, str(cwd), dict(env), self._out, self._err)
        else:
            self._server = None
            with open(self._out, "wb") as out, open(self._err or os.devnull, "wb") as err:
                self._popen = subprocess.Popen(
                    [sys.executable, *args],
                    cwd=cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err if self._err else subprocess.STDOUT,
                )
            self.pid = self._popen.pid

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._popen.poll() if self._popen else self._server.status(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if self._popen:
                self.returncode = self._popen.wait(timeout)
            else:
                self.returncode = self._server.status(self.pid, timeout)
                if self.returncode is None:
                    raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str | None]:
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.wait()
            raise
        out = Path(self._out).read_text(encoding="utf-8", errors="replace")
        err = None if self._err is None else Path(self._err).read_text(encoding="utf-8", errors="replace")
        self._dir.cleanup()
        return out, err


def start(args, *, cwd=ROOT, env: dict | None = None, merge_stderr: bool = True, fork: bool = True) -> Process:
    """Start ``python *args``, stdout and stderr together unless ``merge_stderr=False`` (module docstring)."""
    return Process([str(a) for a in args], cwd, os.environ.copy() if env is None else env, merge_stderr, fork)


def run(args, *, cwd=ROOT, env: dict | None = None, timeout: float | None = None, fork: bool = True):
    """``subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)``, the process
    forked from the pre-imported interpreter unless ``fork=False``; a process that overruns ``timeout`` is killed
    and ``subprocess.TimeoutExpired`` raised."""
    proc = start(args, cwd=cwd, env=env, merge_stderr=False, fork=fork)
    out, err = proc.communicate(timeout)
    return subprocess.CompletedProcess([sys.executable, *proc.args], proc.returncode, out, err)


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    serve()
