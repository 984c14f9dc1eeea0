"""Stopping a run the way people and schedulers do: SIGTERM (`kill`, `timeout`, systemd, SLURM),
SIGINT (Ctrl-C: the terminal signals the whole foreground process group) and SIGHUP (a closed
terminal) to a training 2-stage run end every process of its session, print one line naming
the signal, exit 128 + its number, and leave the last checkpoint whole."""

from __future__ import annotations

import os
import signal

import pytest

from conftest import PIPE2, TINY
from giantpipe.strategies.stage_checkpoint import consolidate
from run_processes import finish, launch, leftovers, wait_for

# Long enough that the signal always lands in training; a checkpoint every 2 steps.
ARGS = TINY + PIPE2 + ["trainer.max_steps=100000", "trainer.val_check_interval=2", "logger=none",
                       "strategy.micro_batches=2", "strategy.timeout_s=30"]


@pytest.mark.parametrize("signum, to_group", [
    (signal.SIGTERM, False),  # kill <pid of giantpipe-train>
    (signal.SIGINT, True),  # Ctrl-C: every process of the terminal's foreground group gets it
    (signal.SIGHUP, False),  # the terminal closed
], ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_stop_signal_ends_every_process_with_one_line_and_a_whole_checkpoint(tmp_path, signum, to_group):
    run_dir = tmp_path / "run"
    proc = launch(ARGS + [f"hydra.run.dir={run_dir}"], tmp_path)
    last = run_dir / "checkpoints" / "last.ckpt"
    try:
        wait_for(last, proc)  # training, and one checkpoint on disk
        (os.killpg if to_group else os.kill)(proc.pid, signum)
    finally:
        _, stderr = finish(proc, timeout=120)
    assert not leftovers(proc.pid), "processes of the run outlived it"
    assert proc.returncode == 128 + signum
    name = signal.Signals(signum).name
    lines = [ln for ln in stderr.splitlines() if name in ln or "Traceback" in ln or "Error" in ln]
    assert lines == [f"giantpipe-train: stopped by {name}: every process of the run has ended; resume with "
                     "ckpt_path=<run>/checkpoints/last.ckpt"], stderr[-3000:]
    whole = consolidate(last)  # the manifest and both shards it names, checksums verified
    assert whole["global_step"] % 2 == 0 and whole["global_step"] >= 2
