"""Start the processes of a multi-process run, once per Hydra job.

Lightning's own launcher re-runs the command line in each child, which breaks Hydra multirun
(Lightning #15737: every child re-runs the whole sweep). giantpipe spawns the workers of each
job itself, passing them the job's resolved config, so a sweep runs its jobs one after another
and each job has its own process group on a fresh port. Under `torchrun` (or SLURM) the
processes already exist and each runs the job directly.

Workers fork from multiprocessing's fork server, started as the job begins, before the launcher
imports anything heavy: it imports torch, Lightning and the job's task once while the launcher
imports them and prepares the data (on two cores at once), so a worker starts in
well under a second instead of importing them again (~4 s of CPU each, the larger part of a
small run's cost). The server is a fresh interpreter that only imports: no thread, no CUDA
context, no OpenMP pool exists in it to be forked (unlike the launcher itself).

If any worker fails, the others are terminated at once and the error names the stage. SIGTERM
(`kill`, `timeout`, systemd, schedulers), SIGINT (Ctrl-C) and SIGHUP (a closed terminal) to the
launcher end every worker within seconds, print one line and exit 128 + the signal number;
the checkpoints on disk stay whole (they are written atomically, stage_checkpoint.py). Workers
ignore SIGINT and SIGHUP themselves (a terminal sends those to the whole process group: the
launcher decides), and die with the launcher even when it is killed with SIGKILL.
"""

from __future__ import annotations

import atexit
import ctypes
import multiprocessing.forkserver
import os
import signal
import socket
import sys
from contextlib import contextmanager

from giantpipe.platform.allocator import keep_freed_memory
from giantpipe.platform.config import ConfigError

EXTERNAL_LAUNCH_VARS = ("TORCHELASTIC_RUN_ID", "SLURM_PROCID", "LOCAL_RANK")
# Once a worker failed, the others get this long to end by themselves, then SIGTERM, then as
# long again before SIGKILL (torch's default is 30 s; a stage blocked in a receive, or stopped,
# never handles SIGTERM, so the run would outlive strategy.timeout_s by half a minute).
SHUTDOWN_GRACE_S = 3.0
EVERY_RANK_ERRORS = ("NonFiniteError",)  # raised by every rank at once (platform/nonfinite.py)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process receives when its parent dies


class Stopped(Exception):
    """The launcher received a stop signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def launched_externally() -> bool:
    """True under torchrun, SLURM, or inside a worker this module started."""
    return any(v in os.environ for v in EXTERNAL_LAUNCH_VARS)


def start_worker_server(family: str) -> None:
    """Start the fork server the workers of this launcher will come from, importing in it what a
    worker of a `family` job runs (a sweep's later jobs reuse it: they fork at once)."""
    multiprocessing.set_forkserver_preload([
        "giantpipe.platform.fork_server", "giantpipe.platform.train", "giantpipe.platform.build",
        "giantpipe.strategies.lightning_strategy", f"giantpipe.platform.tasks.{family}",
    ])
    multiprocessing.forkserver.ensure_running()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(local_rank: int, world_size: int, port: int, fn, args) -> None:
    die_with_parent()  # the fork server, itself tied to the launcher (fork_server.py)
    for signum in (signal.SIGINT, signal.SIGHUP):  # the launcher decides, and ends us
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the server ignores it; torch ends failed runs with it
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(local_rank),
        LOCAL_RANK=str(local_rank), NODE_RANK="0", LOCAL_WORLD_SIZE=str(world_size),
    )
    keep_freed_memory()  # for a parent that did not set the environment before spawning
    try:
        fn(*args)
    except ConfigError as err:
        if getattr(err, "every_rank", False):  # the launcher reports it once, without a rank
            raise
        print(f"giantpipe-train: error on rank {local_rank}: {err}", file=sys.stderr)
        sys.exit(2)
    finally:  # a forked worker ends with os._exit, which skips them: wandb's finish, log flushes
        atexit._run_exitfuncs()


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent (the launcher) dies, however it dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (AttributeError, OSError):  # not Linux: the launcher's signal handlers still end us
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)


@contextmanager
def stop_signals_raise():
    """Within: SIGTERM, SIGINT and SIGHUP raise `Stopped` in the main thread."""
    def stop(signum, frame):
        raise Stopped(signum)

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def end_workers(context) -> None:
    """SIGKILL every process this launcher started, workers and theirs (data loaders, the
    resource tracker). Not SIGTERM: Lightning's SIGTERM handler runs a collective inside the
    signal handler, which waits on peers that may be blocked; and a kill at any moment leaves
    the checkpoints whole."""
    for pid in descendants(os.getpid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in context.processes if context is not None else ():
        p.join()


def descendants(root: int) -> list[int]:
    """Every live process below `root` in the process tree (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def spawn(fn, args: tuple, world_size: int, describe_rank) -> None:
    """Run `fn(*args)` in `world_size` fresh processes; raise ConfigError naming a failed rank.
    A stop signal ends them all, prints one line and exits 128 + its number."""
    import torch.multiprocessing as mp

    context = None
    try:
        with stop_signals_raise():
            context = mp.start_processes(_worker, args=(world_size, free_port(), fn, args), nprocs=world_size,
                                         join=False, start_method="forkserver")
            while not context.join(grace_period=SHUTDOWN_GRACE_S):
                pass
    except Stopped as stop:
        with stop_signals_ignored():
            end_workers(context)
        print(f"giantpipe-train: stopped by {stop}: every process of the run has ended; resume with "
              "ckpt_path=<run>/checkpoints/last.ckpt", file=sys.stderr, flush=True)
        os._exit(128 + stop.signum)
    except mp.ProcessExitedException as err:
        raise ConfigError(
            f"{describe_rank(err.error_index)} exited with code {err.exit_code}"
            f"{' (killed by a signal)' if err.exit_code < 0 else ''}; the other processes were stopped"
        ) from None
    except mp.ProcessRaisedException as err:
        if os.environ.get("GIANTPIPE_DEBUG"):
            print(err, file=sys.stderr)
        last = [ln for ln in str(err).strip().splitlines() if ln.strip()][-1]
        kind, _, message = last.partition(": ")
        kind = kind.rsplit(".", 1)[-1]  # CheckpointError, not giantpipe.strategies.stage_checkpoint.CheckpointError
        if kind in EVERY_RANK_ERRORS:  # every rank raised it together: no rank to name
            raise ConfigError(message) from None
        cause = f"{kind}: {message}" if message else kind
        raise ConfigError(f"{describe_rank(err.error_index)} failed: {cause}; the other processes were stopped") from None


@contextmanager
def stop_signals_ignored():
    """A second Ctrl-C while the workers are being ended changes nothing."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
