"""Peak resident memory of a process tree, read from the processes themselves (Linux /proc).

`VmHWM` ("high water mark") is the kernel's record of a process's largest resident set since it
started: weights, gradients, optimizer state, activations, communication buffers, the data
pipeline and the framework itself, whatever allocated them. It only grows, so polling it while
the process lives and keeping the last value read loses at most what grew in the last interval.
In a watched run of several processes (a launcher and its workers), the workers are the children
of the launcher's fork server (or its `spawn` children), numbered in the order they started:
`torch.multiprocessing` starts rank 0 first, then 1, ...
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from giantpipe.strategies.memory_model import status_kb

MB = 2**20
__all__ = ["status_kb", "descendants", "TreeWatcher", "kill_tree"]


def children_of(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc/<pid>/task/*/children)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it."""
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.append(p)
            todo += children_of(p)
    return seen


def worker_pids(launcher: int) -> set[int]:
    """The launcher's workers: the children of its fork server (platform/launch.py), or children
    it started with multiprocessing's `spawn` (not the server itself, not a resource tracker)."""
    found: set[int] = set()
    for child in children_of(launcher):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            found.add(child)
        elif b"multiprocessing.forkserver" in cmdline:
            found.update(children_of(child))
    return found


@dataclass
class TreeWatcher:
    """Polls the VmHWM of a process tree every `interval_s`; calls `on_exceed(pid, mb)` once when
    a process passes `limit_mb` (the benchmark kills the run there instead of waiting)."""

    root: int
    interval_s: float = 0.02
    limit_mb: float | None = None
    on_exceed: object = None
    peaks_mb: dict[int, float] = field(default_factory=dict)
    workers: list[int] = field(default_factory=list)  # the workers' pids, in start order
    _helpers: set[int] = field(default_factory=set)  # pids checked and known not to be workers
    exceeded: tuple[int, float] | None = None

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def poll(self) -> None:
        workers = None  # read from /proc only when a new process is to be classified
        for pid in descendants(self.root):
            if pid != self.root and pid not in self.workers and pid not in self._helpers:
                # a fresh child still shows its parent's command line until it execs (a fork
                # server's short-lived subprocess, a spawn worker): classify it once settled;
                # VmHWM only grows, so reading it a second late loses nothing
                if not _settled(pid):
                    continue
                workers = worker_pids(self.root) if workers is None else workers
                if pid in workers:
                    self.workers = sorted([*self.workers, pid])
                else:
                    self._helpers.add(pid)
            kb = status_kb(pid)
            if kb is None:
                continue
            mb = kb / 1024
            self.peaks_mb[pid] = max(mb, self.peaks_mb.get(pid, 0.0))
            if self.limit_mb is not None and mb > self.limit_mb and self.exceeded is None:
                self.exceeded = (pid, mb)
                if callable(self.on_exceed):
                    self.on_exceed(pid, mb)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.poll()
            time.sleep(self.interval_s)

    def by_role(self) -> dict[str, float]:
        """Peaks keyed `launcher`, `rank<r>` (workers) or `helper<pid>` (anything else)."""
        out = {}
        for pid, mb in self.peaks_mb.items():
            if pid == self.root:
                key = "launcher"
            elif pid in self.workers:
                key = f"rank{self.workers.index(pid)}"
            else:
                key = f"helper{pid}"
            out[key] = max(mb, out.get(key, 0.0))
        return out


def _settled(pid: int) -> bool:
    """Whether a process has lived for a second: by then a forked child that was going to exec
    its own program has done so, and its command line says what it is."""
    try:
        started = Path(f"/proc/{pid}").stat().st_ctime
    except OSError:
        return False
    return time.time() - started > 1.0


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and its descendants (the benchmark's runs only)."""
    for p in reversed(descendants(pid)):
        try:
            os.kill(p, 9)
        except ProcessLookupError:
            pass
