"""Run `giantpipe-train` many times without importing it each time: one server per pytest worker.

Most of a tiny run's cost is importing torch, Lightning and Hydra (~9 s of CPU on a slow
2-core host, against ~3 s of training). The server imports `giantpipe.platform.train` and what a
run builds once, then forks a fresh process per run; from the fork on, the child is what
`python -m giantpipe.platform.train ARGS` would be: its own working directory, environment,
stdin (empty), stdout and stderr files and exit status. The server itself starts no thread and
touches no tensor, like the fork server the launcher's workers come from (platform/launch.py).

Protocol: one JSON request per line on stdin ({"args", "cwd", "env", "stdout", "stderr"}); the
server answers {"pid": ...} at the fork and {"returncode": ...} at the child's end, one line each.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

PRELOAD = (
    "giantpipe.platform.train", "giantpipe.platform.build", "giantpipe.strategies.lightning_strategy",
    "giantpipe.platform.tasks.language_model", "giantpipe.platform.tasks.translation",
    "giantpipe.platform.tasks.speech", "giantpipe.platform.data.text",
    "giantpipe.platform.data.translation_module", "giantpipe.platform.data.speech_module",
)  # fmt: skip


def run_child(request: dict) -> int:
    """In the forked child: become the run `request` describes; return its exit status."""
    import atexit

    from giantpipe.platform import train

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_CREAT),
                            (2, request["stderr"], os.O_WRONLY | os.O_CREAT)):  # fmt: skip
        target = os.open(path, flags, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's stdin for its whole life
    sys.argv = [train.__file__, *request["args"]]
    code = 0
    try:
        train.main()
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


if __name__ == "__main__":
    serve()
