"""Run giantpipe's commands many times without importing them each time: one server per pytest worker.

Most of a tiny run's cost is importing torch, Lightning and Hydra (~9 s of CPU on a slow
2-core host, against ~3 s of training). The server imports the commands' modules once, then
forks a fresh process per run, which runs the command's module as `__main__` (runpy, as
`python -m giantpipe.platform.train ARGS` does) with its own working directory, environment,
stdin, stdout and stderr files, exit status and, if asked, session. The server starts no thread
and touches no tensor, like the fork server the launcher's workers come from
(platform/launch.py). The tests of the entry point itself still start a fresh interpreter
(`run_cli(..., fresh_interpreter=True)` in conftest.py).

Protocol: one JSON request per line on stdin ({"module", "args", "cwd", "env", "stdin",
"stdout", "stderr", "new_session"}); the server answers {"pid": ...} at the fork and
{"returncode": ...} when the child ends, one line each, and takes the next request after that.
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
import traceback
from pathlib import Path

PRELOAD = (
    "giantpipe.platform.train", "giantpipe.platform.evaluate", "giantpipe.platform.export",
    "giantpipe.platform.plan", "giantpipe.platform.build", "giantpipe.strategies.lightning_strategy",
    "giantpipe.platform.tasks.language_model", "giantpipe.platform.tasks.translation",
    "giantpipe.platform.tasks.speech", "giantpipe.platform.data.text",
    "giantpipe.platform.data.translation_module", "giantpipe.platform.data.speech_module",
)  # fmt: skip


def run_env(**extra: str) -> dict:
    """The environment of a test's run: this process's, one thread per process (two workers
    share two cores), output unbuffered, and `extra`."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


# --- the server's side ----------------------------------------------------------------------


def run_child(request: dict) -> int:
    """In the forked child: become the run `request` describes; return its exit status."""
    import atexit
    import runpy
    import warnings

    if request["new_session"]:
        os.setsid()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    write = os.O_WRONLY | os.O_CREAT
    streams = ((0, request["stdin"] or os.devnull, os.O_RDONLY), (1, request["stdout"], write),
               (2, request["stderr"], write))
    for fd, path, flags in streams:
        target = os.open(path, flags, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's stdin for its whole life
    sys.argv = [request["module"], *request["args"]]  # runpy puts the module's file first
    code = 0
    # the module is preloaded here, unlike under `python -m`: runpy's warning about it is ours
    warnings.filterwarnings("ignore", message=".*found in sys.modules after import of package",
                            category=RuntimeWarning)
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, (int, type(None))):
            print(stop.code, file=sys.stderr)
    except BaseException:  # what the interpreter would print before exiting 1
        traceback.print_exc()
        code = 1
    finally:
        atexit._run_exitfuncs()  # os._exit below skips them (wandb's finish, log flushes)
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def serve() -> None:
    import importlib

    from giantpipe.platform.launch import die_with_parent

    die_with_parent()  # the pytest worker that started us
    for name in PRELOAD:
        importlib.import_module(name)
    requests = os.fdopen(os.dup(0), "r")
    answers = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)  # nothing of ours goes to the answers by accident
    print(json.dumps({"ready": os.getpid()}), file=answers, flush=True)
    for line in requests:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            requests.close()
            answers.close()
            os._exit(run_child(request))
        print(json.dumps({"pid": pid}), file=answers, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), file=answers, flush=True)


# --- the tests' side ------------------------------------------------------------------------


class ServedRun:
    """A run forked by the server, used like the `subprocess.Popen` of a fresh interpreter."""

    def __init__(self, server: Server, module: str, args: list[str], cwd: Path, env: dict,
                 new_session: bool, stdin: str | None):
        self.server, self.args, self.returncode = server, [sys.executable, "-m", module, *args], None
        self._captured: tuple[str, str] | None = None
        self._outputs = tempfile.TemporaryDirectory()
        self._out, self._err = Path(self._outputs.name) / "stdout", Path(self._outputs.name) / "stderr"
        stdin_path = None
        if stdin is not None:
            stdin_path = Path(self._outputs.name) / "stdin"
            stdin_path.write_text(stdin)
        request = {"module": module, "args": args, "cwd": str(cwd), "env": env, "stdout": str(self._out),
                   "stderr": str(self._err), "stdin": stdin_path and str(stdin_path),
                   "new_session": new_session}  # fmt: skip
        server.send(request)
        self.pid = server.answer(timeout=60)["pid"]

    def poll(self) -> int | None:
        if self.returncode is None and self.server.has_answer(timeout=0):
            self.returncode = self.server.answer(timeout=0)["returncode"]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self.server.answer(timeout)["returncode"]
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """The run's stdout and stderr once it has ended (the same again on a second call)."""
        self.wait(timeout)
        if self._captured is None:
            self._captured = self._out.read_text(), self._err.read_text()
            self._outputs.cleanup()
        return self._captured

    def kill(self) -> None:
        if self.returncode is None:
            os.kill(self.pid, signal.SIGKILL)  # its workers die with it (platform/launch.py)


class Server:
    """This pytest worker's server process (started at the first run, ended with the worker)."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, __file__], env=run_env(), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.current: ServedRun | None = None
        self._received = b""  # read from the answers, unbuffered: select sees what is left
        assert "ready" in self.answer(timeout=300), "the CLI server did not start"

    def has_answer(self, timeout: float | None) -> bool:
        """Whether a whole answer line has arrived within `timeout` seconds (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._received:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.proc.stdout], [], [], left)[0]:
                return False
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"the CLI server ended (exit {self.proc.wait()})")
            self._received += chunk
        return True

    def answer(self, timeout: float | None) -> dict:
        if not self.has_answer(timeout):
            raise subprocess.TimeoutExpired("cli_server", timeout)
        line, _, self._received = self._received.partition(b"\n")
        return json.loads(line)

    def send(self, request: dict) -> None:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()

    def start(self, module: str, args: list[str], cwd: Path, env: dict, new_session: bool,
              stdin: str | None) -> ServedRun:
        if self.current is not None and self.current.poll() is None:  # a test left it running
            self.current.kill()
            self.current.wait(timeout=60)
        self.current = ServedRun(self, module, args, cwd, env, new_session, stdin)
        return self.current


_server: Server | None = None


def start(module: str, args: list[str], cwd: Path, env: dict | None = None, new_session: bool = False,
          stdin: str | None = None) -> ServedRun:
    """Start `python -m MODULE ARGS` in `cwd` with `env` (default `run_env()`), forked from
    this worker's server."""
    global _server
    if _server is None or _server.proc.poll() is not None:
        _server = Server()
    return _server.start(module, args, cwd, env or run_env(), new_session, stdin)


def run(module: str, args: list[str], cwd: Path, timeout: float,
        input: str | None = None) -> subprocess.CompletedProcess:
    """`subprocess.run([python, "-m", module, *args], input=input, capture_output=True,
    text=True, timeout=timeout, env=run_env())`, forked."""
    served = start(module, args, cwd, stdin=input)
    try:
        out, err = served.communicate(timeout)
    except subprocess.TimeoutExpired:
        served.kill()
        served.wait(timeout=60)
        raise
    return subprocess.CompletedProcess(served.args, served.returncode, out, err)


if __name__ == "__main__":
    serve()
