"""kill -9 of every process at an arbitrary step, then resume: the loss curve is the uninterrupted one."""

import os
import signal
import subprocess
import time

import pytest
import torch

from conftest import TINY, TRAIN, run_train
from test_pipeline_cli import PIPE2, losses

STEPS = ["trainer.max_steps=12", "trainer.val_check_interval=2", "callbacks.model_checkpoint.save_top_k=-1",
         "logger=csv", "strategy.micro_batches=2"]


def test_kill_all_processes_then_resume_gives_the_same_losses(tmp_path):
    args = TINY + PIPE2 + STEPS
    run_train(args + [f"hydra.run.dir={tmp_path}/full"], tmp_path, timeout=400)
    expected = losses(tmp_path / "full")

    killed = tmp_path / "killed"
    # stage 1 freezes itself at step 8 (SIGSTOP), so the run is caught mid-step after the step-6
    # checkpoint; then the launcher and every stage process get SIGKILL.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GIANTPIPE_FAULT": "stage=1,step=7,kind=stop"}
    proc = subprocess.Popen(TRAIN + args + [f"hydra.run.dir={killed}"], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    last = killed / "checkpoints" / "last.ckpt"
    while time.time() < deadline and proc.poll() is None:
        if last.exists() and torch.load(last, weights_only=False)["global_step"] == 6:
            break
        time.sleep(0.5)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    step = torch.load(last, weights_only=False)["global_step"]
    assert step == 6 and proc.returncode == -signal.SIGKILL

    resumed = tmp_path / "resumed"
    run_train(args + [f"ckpt_path={last}", f"hydra.run.dir={resumed}"], tmp_path, timeout=400)
    got = losses(resumed)
    assert sorted(got) == list(range(step, 12))
    for s in got:
        assert got[s] == pytest.approx(expected[s], abs=1e-6), s
