"""No silent NaN. A NaN born in a stage's activations stops a 2-stage run before the update,
with one line naming the step, the stage and the layer, and the last checkpoint keeps finite
weights; `callbacks.nonfinite.action=skip` drops that step's update instead (the optimizer
takes one step fewer), counts it in `train/skipped_steps`, and trains on."""

from __future__ import annotations

import re

import torch

from conftest import PIPE2, TINY, read_summary, shard_files
from giantpipe.platform.nonfinite import locate
from giantpipe.strategies.stage_checkpoint import load_checkpoint
from run_processes import finish, launch, leftovers

ARGS = TINY + PIPE2 + ["trainer.max_steps=8", "trainer.val_check_interval=2", "logger=csv",
                       "strategy.micro_batches=2", "run_test=false"]


def finite(checkpoint: dict) -> bool:
    return all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values() if t.is_floating_point())


def test_a_nan_in_stage_activations_stops_the_run_naming_step_stage_and_layer(tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(ARGS + [f"hydra.run.dir={run_dir}"], tmp_path, "stage=1,step=5,kind=nan", tmp_path / "fault.log")
    _, stderr = finish(proc)
    assert not leftovers(proc.pid)
    assert proc.returncode != 0 and "Traceback" not in stderr, stderr[-3000:]
    errors = [ln for ln in stderr.splitlines() if ln.startswith("giantpipe-train: error:")]
    last_ckpt = run_dir / "checkpoints" / "last.ckpt"
    shard1 = torch.load(last_ckpt.parent / shard_files(last_ckpt)[1], weights_only=False)
    first_layer = min(int(k.split(".")[2]) for k in shard1["state_dict"])  # stage 1's first layer
    assert len(errors) == 1, stderr[-3000:]
    assert re.search(rf"non-finite loss at step 5, first in stage 1 \(the output of layer {first_layer}\)",
                     errors[0]), errors
    last = load_checkpoint(last_ckpt)
    assert last["global_step"] == 4 and finite(last)  # the step-4 save, never replaced by a bad one


def test_skip_drops_the_update_of_a_step_with_a_nan_gradient_and_counts_it(tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(ARGS + ["callbacks.nonfinite.action=skip", f"hydra.run.dir={run_dir}"], tmp_path,
                  "stage=0,step=3,kind=nangrad", tmp_path / "fault.log")
    stdout, stderr = finish(proc)
    assert proc.returncode == 0, stderr[-3000:]
    assert "skipped the update of step 3: non-finite gradient norm, first in stage 0" in stdout
    assert read_summary(run_dir)["metrics"]["train/skipped_steps"] == 1
    last = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 8 and finite(last)
    adam_steps = {float(s["step"]) for s in last["optimizer_states"][0]["state"].values()}
    assert adam_steps == {7.0}  # 8 steps, one update dropped: every parameter's AdamW count is 7


def test_where_a_non_finite_value_first_appeared():
    """Forward outputs first (lowest layer), then the loss, then gradients in backward order."""
    stage = {0: 0, 1: 1, 2: 2}.get  # rank -> stage
    assert locate([[0, 0, -1]] * 3, stage) is None
    assert locate([[1, 1, -1], [1, 1, 3], [1, 1, 5]], stage) == ("loss", "stage 1 (the output of layer 3)")
    assert locate([[0, 1, -1], [0, 1, 4], [0, 0, -1]], stage) == ("gradient norm", "stage 1 (the output of layer 4)")
    assert locate([[0, 0, 1], [0, 0, -1], [0, 0, -1]], stage) is None  # a layer's -inf alone stops nothing
    assert locate([[1, 1, -1]] * 3, stage) == ("loss", "stage 2 (the loss)")
    assert locate([[0, 1, -1], [0, 1, -1], [0, 0, -1]], stage) == (
        "gradient norm", "stage 1 (its gradients, in backward order)")
