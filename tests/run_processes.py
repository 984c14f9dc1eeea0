"""Test helpers for runs that are stopped from outside: start giantpipe-train in its own session,
find what is left of it, read its checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import torch

import cli_server
from cli_server import ServedRun


def launch(args: list[str], cwd: Path, fault: str | None = None, fault_log: Path | None = None) -> ServedRun:
    """giantpipe-train in its own session (so every process it starts can be found), with a fault."""
    faults = {"GIANTPIPE_FAULT": fault, "GIANTPIPE_FAULT_LOG": str(fault_log)} if fault else {}
    return cli_server.start("giantpipe.platform.train", args, cwd, cli_server.run_env(**faults), new_session=True)


def session_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def leftovers(session: int, wait_s: float = 30.0) -> list[str]:
    """Command lines of processes still in the run's session after at most `wait_s` (the
    multiprocessing resource tracker takes a moment to notice its parent is gone). Zombies
    count as gone: they have ended and only wait to be reaped."""
    deadline = time.time() + wait_s
    while time.time() < deadline:
        if not live_members(session):
            return []
        time.sleep(0.2)
    return live_members(session)


def live_members(session: int) -> list[str]:
    ps = subprocess.run(["ps", "-o", "pid=,sid=,stat=,args=", "-e"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if line.split()[1] == str(session) and not line.split()[2].startswith("Z")]


def finish(proc: ServedRun, timeout: float = 900) -> tuple[str, str]:
    """Wait for the run; whatever happens, nothing of its session outlives the test."""
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if session_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)


def wait_for(path: Path, proc: ServedRun) -> None:
    """Until `path` exists (the run's progress, not a clock); fail if the run ends first."""
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {path.name} appeared:\n{proc.communicate()[1][-3000:]}")
        time.sleep(0.2)


def assert_same_state(got: dict, expected: dict) -> None:
    """Two consolidated checkpoints hold the same step, weights and optimizer state."""
    assert got["global_step"] == expected["global_step"]
    assert got["state_dict"].keys() == expected["state_dict"].keys()
    torch.testing.assert_close(got["state_dict"], expected["state_dict"], rtol=0, atol=1e-7)
    torch.testing.assert_close(got["optimizer_states"], expected["optimizer_states"], rtol=0, atol=1e-7)
