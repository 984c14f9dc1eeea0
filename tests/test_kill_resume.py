"""Faults, then resume. Every injected fault (a stage raising, exiting, killed, stopped, cut off
by a network partition, never joining, or killed halfway through writing a checkpoint) ends
every process of the run, non-zero and naming the stage, within strategy.timeout_s of the
fault (plus a few seconds of shutdown); the last checkpoint on disk is whole, and resuming from
it gives the uninterrupted run's losses. And kill -9 of the launcher and every stage at once,
then resume, reproduces the loss curve."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY, TRAIN, run_train
from giantpipe.strategies.stage_checkpoint import consolidate
from test_pipeline_cli import PIPE2, losses

TIMEOUT_S = 10
SHUTDOWN_S = 20  # after detection: the launcher's grace periods, teardown, a loaded 2-core machine
STEPS = ["trainer.max_steps=8", "trainer.val_check_interval=2", "callbacks.model_checkpoint.save_top_k=-1",
         "logger=csv"]
ARGS = TINY + STEPS + PIPE2 + ["strategy.micro_batches=2", f"strategy.timeout_s={TIMEOUT_S}"]

# kind: (GIANTPIPE_FAULT, what the error says, the step of the last whole checkpoint)
# Checkpoints are saved every 2 steps, step{N}.ckpt then last.ckpt, so save 3 is last.ckpt of step 4.
FAULTS = {
    "raise": ("stage=1,step=5,kind=raise", r"pipeline stage 1 .*injected fault", 4),
    "exit": ("stage=1,step=5,kind=exit", r"pipeline stage 1 .*exited with code 3", 4),
    "kill": ("stage=1,step=5,kind=kill", r"pipeline stage 1 .*killed by a signal", 4),
    "stop": ("stage=1,step=5,kind=stop", r"stage 0 got no answer from stage 1 within strategy.timeout_s", 4),
    "partition": ("stage=1,step=5,kind=partition",
                  r"stage 1 got no answer from stage 0|stage 0 got no answer from stage 1", 4),
    "nojoin": ("stage=1,kind=nojoin", r"stage 1 \(rank 1, replica 0\) did not join the pipeline", None),
    "kill_mid_save": ("stage=1,save=3,kind=kill", r"pipeline stage 1 .*killed by a signal", 2),
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, float]:
    base = tmp_path_factory.mktemp("uninterrupted")
    run_train(ARGS + [f"hydra.run.dir={base / 'run'}"], base, timeout=900)
    return losses(base / "run")


def launch(args: list[str], cwd: Path, fault: str, fault_log: Path) -> subprocess.Popen:
    """giantpipe-train in its own session (so every process it starts can be found), with a fault."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "GIANTPIPE_FAULT": fault,
           "GIANTPIPE_FAULT_LOG": str(fault_log)}
    return subprocess.Popen(TRAIN + args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def session_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def leftovers(session: int, wait_s: float = 5.0) -> list[str]:
    """Command lines of processes still in the run's session after `wait_s` (the
    multiprocessing resource tracker takes a moment to notice its parent is gone)."""
    deadline = time.time() + wait_s
    while session_alive(session) and time.time() < deadline:
        time.sleep(0.2)
    ps = subprocess.run(["ps", "-o", "pid=,sid=,stat=,args=", "-e"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if line.split()[1] == str(session)]


@pytest.mark.parametrize("kind", list(FAULTS))
def test_a_fault_ends_every_process_naming_the_stage_and_the_last_checkpoint_resumes(tmp_path, kind, uninterrupted):
    fault, message, last_good = FAULTS[kind]
    run_dir, fault_log = tmp_path / "faulty", tmp_path / "faults.log"
    proc = launch(ARGS + [f"hydra.run.dir={run_dir}"], tmp_path, fault, fault_log)
    try:
        _, stderr = proc.communicate(timeout=900)
        ended = time.time()
        assert not leftovers(proc.pid), "processes of the run outlived it"
    finally:
        if session_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and "Traceback" not in stderr.split("giantpipe-train: error:")[-1]
    assert re.search(message, stderr), stderr[-3000:]
    fired = float(fault_log.read_text().split()[0])
    print(f"fault {kind}: every process ended {ended - fired:.1f} s after it")
    assert ended - fired < TIMEOUT_S + SHUTDOWN_S, f"the run ended {ended - fired:.0f} s after the fault"

    last = run_dir / "checkpoints" / "last.ckpt"
    if last_good is None:  # nothing was ever saved, nor half-saved
        assert not last.exists() and not list(run_dir.glob("checkpoints/*"))
        return
    whole = consolidate(last)  # the manifest and every shard it names load, and agree
    assert whole["global_step"] == last_good
    resumed = tmp_path / "resumed"  # on one device: the shards are consolidated, optimizer included
    run_train(TINY + STEPS + [f"ckpt_path={last}", f"hydra.run.dir={resumed}"], tmp_path, timeout=900)
    got = losses(resumed)
    assert sorted(got) == list(range(last_good, 8))
    for step in got:
        assert got[step] == pytest.approx(uninterrupted[step], rel=1e-5, abs=1e-6), step


def test_kill_all_processes_then_resume_gives_the_same_losses(tmp_path, uninterrupted):
    """kill -9 of the launcher and both stages while stage 1 is frozen in step 7 (after the
    step-6 checkpoint): resuming with 2 stages reproduces the uninterrupted losses. The moment
    to kill is the fault's own log line, not a wall-clock guess, so load cannot move it."""
    killed, fault_log = tmp_path / "killed", tmp_path / "faults.log"
    proc = launch(ARGS + ["strategy.timeout_s=600", f"hydra.run.dir={killed}"], tmp_path,
                  "stage=1,step=7,kind=stop", fault_log)
    try:
        while not fault_log.exists() and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    last = killed / "checkpoints" / "last.ckpt"
    step = consolidate(last)["global_step"]
    assert step == 6

    resumed = tmp_path / "resumed"
    run_train(ARGS + [f"ckpt_path={last}", f"hydra.run.dir={resumed}"], tmp_path, timeout=900)
    got = losses(resumed)
    assert sorted(got) == list(range(step, 8))
    for s in got:
        assert got[s] == pytest.approx(uninterrupted[s], abs=1e-6), s


def test_a_shard_from_another_save_is_named_at_load(tmp_path):
    """A manifest and a shard that do not belong together (copied by hand, say) are refused."""
    from giantpipe.strategies.stage_checkpoint import load_shard

    manifest = {"stages": 2, "files": ["a.stage0-of-2", "a.stage1-of-2"], "save_id": "new"}
    torch.save({"state_dict": {}, "giantpipe_shard": {"stage": 1, "stages": 2, "save_id": "old"}},
               tmp_path / "a.stage1-of-2")
    with pytest.raises(ValueError, match=r"a.stage1-of-2 of stage 1 belongs to another save"):
        load_shard(tmp_path / "a", manifest, 1)
