"""The pipeline through the real entry point: same losses as one device, torchrun on one and two
"nodes", sweeps, export, resume from stage shards. A run shows several things where it can (the
schedule sweep is also the multirun test; the timeline flag's run is tests/test_timeline.py's).
Faults: test_kill_resume.py; resharding: test_reshard.py."""

import json
import os
import subprocess
import sys

import pytest

from conftest import PIPE2, TINY, losses, read_summary, run_cli, run_train, shard_files
from giantpipe.platform.launch import free_port


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("single")
    # clipping always active: the pipeline must clip by the global norm across stages, as here
    run_train(TINY + ["model.dropout=0", "trainer.max_steps=20", "logger=csv", "trainer.gradient_clip_val=0.05",
                      f"hydra.run.dir={base / 'run'}"], base)
    return base / "run"


def assert_same_losses(run_dir, reference_dir, what=""):
    """Every logged training loss of `run_dir` equals `reference_dir`'s at the same step."""
    expected, got = losses(reference_dir), losses(run_dir)
    assert got and sorted(got) == sorted(expected), what
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-5), (what, step)


def test_two_stage_pipeline_logs_the_same_losses_as_one_device(tmp_path, single_run):
    run_dir = tmp_path / "pipe"
    args = TINY + PIPE2 + ["model.dropout=0", "strategy.micro_batches=4", "trainer.max_steps=20", "logger=csv",
                           "trainer.gradient_clip_val=0.05", f"hydra.run.dir={run_dir}"]
    proc = run_train(args, tmp_path, fresh_interpreter=True)  # the real entry point, as a user starts it
    assert "partition of 4 layers into 2 stages" in proc.stdout
    assert len(losses(run_dir)) == 20
    assert_same_losses(run_dir, single_run)
    summary = read_summary(run_dir)
    assert summary["choices"]["strategy"] == "pipeline" and summary["steps"] == 20
    assert summary["metrics"]["test/loss"] == pytest.approx(read_summary(single_run)["metrics"]["test/loss"], rel=1e-4)

    # one shard per stage, consolidated by giantpipe-export, evaluated on one device
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert all((run_dir / "checkpoints" / f).exists() for f in shard_files(ckpt)) and len(shard_files(ckpt)) == 2
    run_cli("export", [str(ckpt)], tmp_path, timeout=120)
    merged = run_dir / "checkpoints" / "last.consolidated.ckpt"
    evaluated = tmp_path / "eval.json"
    run_cli("evaluate", [str(merged), "--out", str(evaluated)], tmp_path, timeout=120)
    assert json.loads(evaluated.read_text())["test/loss"] == pytest.approx(summary["metrics"]["test/loss"], rel=1e-5)


def test_torchrun_launch_gives_the_same_losses(tmp_path, single_run):
    run_dir = tmp_path / "tr"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "giantpipe.platform.train", *TINY, *PIPE2, "model.dropout=0", "trainer.max_steps=20",
           "trainer.gradient_clip_val=0.05", "logger=csv", "callbacks=none", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_same_losses(run_dir, single_run)


def test_two_node_torchrun_on_localhost_gives_the_same_losses(tmp_path, single_run):
    run_dir, port = tmp_path / "nodes", free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def node(rank: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
               "-m", "giantpipe.platform.train", *TINY, "strategy=pipeline", "strategy.stages=2",
               "trainer.devices=1", "trainer.num_nodes=2", "model.dropout=0", "trainer.max_steps=20",
               "trainer.gradient_clip_val=0.05",
               "logger=csv", "callbacks=none", f"hydra.run.dir={run_dir}"]
        return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    nodes = [node(0), node(1)]
    outputs = [p.communicate(timeout=300) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    assert_same_losses(run_dir, single_run)


def test_deferred_batch_norm_keeps_the_mini_batch_running_statistics(tmp_path):
    tiny = [a for a in TINY if not a.startswith("model.")]
    conv = ["model=giant_conv", "model.d_model=16", "model.n_layers=2", "model.max_len=32", "model.dropout=0",
            "trainer.max_steps=1", "logger=none", "run_test=false", "trainer.limit_val_batches=0"]
    run_train(tiny + conv + [f"hydra.run.dir={tmp_path}/single"], tmp_path)
    run_train(tiny + conv + PIPE2 + ["strategy.micro_batches=4", "strategy.deferred_batch_norm=true",
                                     f"hydra.run.dir={tmp_path}/pipe"], tmp_path)
    run_cli("export", [f"{tmp_path}/pipe/checkpoints/last.ckpt"], tmp_path, timeout=120)
    import torch

    single = torch.load(f"{tmp_path}/single/checkpoints/last.ckpt", weights_only=False)["state_dict"]
    piped = torch.load(f"{tmp_path}/pipe/checkpoints/last.consolidated.ckpt", weights_only=False)["state_dict"]
    for stat in ("running_mean", "running_var"):
        key = f"model.layers.1.norm.{stat}"  # the first BatchNorm sees the same inputs in both runs
        torch.testing.assert_close(piped[key], single[key], rtol=1e-5, atol=1e-6)


def test_pipelined_run_resumes_from_its_stage_shards_with_the_same_losses_and_names_a_missing_one(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = TINY + PIPE2 + ["strategy.micro_batches=2", "logger=csv"]
    run_train(args + ["callbacks.model_checkpoint.save_top_k=-1", f"hydra.run.dir={full}"], tmp_path)
    run_train(args + [f"hydra.run.dir={resumed}", f"ckpt_path={full}/checkpoints/step3.ckpt"], tmp_path)
    expected, got = losses(full), losses(resumed)
    assert sorted(got) == [3, 4, 5]
    for step in got:  # dropout on: each stage's RNG stream comes back from its shard
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step

    shard = shard_files(full / "checkpoints" / "last.ckpt")[1]
    (full / "checkpoints" / shard).unlink()
    proc = run_train(args + [f"ckpt_path={full}/checkpoints/last.ckpt", f"hydra.run.dir={tmp_path}/again"],
                     tmp_path, check=False)
    assert proc.returncode != 0
    assert shard in proc.stderr and "stage 1" in proc.stderr, proc.stderr[-2000:]


def test_with_dropout_on_the_pipeline_draws_the_single_device_masks(tmp_path):
    common = TINY + ["model.dropout=0.2", "trainer.max_steps=8", "logger=csv", "callbacks=none"]
    run_train(common + [f"hydra.run.dir={tmp_path}/single"], tmp_path)
    run_train(common + PIPE2 + ["strategy.micro_batches=2", "strategy.schedule=1f1b", "strategy.checkpoint=always",
                                f"hydra.run.dir={tmp_path}/pipe"], tmp_path)
    assert len(losses(tmp_path / "pipe")) == 8
    assert_same_losses(tmp_path / "pipe", tmp_path / "single")


def test_bf16_mixed_precision_pipeline_follows_one_device(tmp_path):
    """bf16-mixed (the default on GPU) through the pipeline, its split backward included."""
    base = TINY + ["model.dropout=0", "trainer.max_steps=4", "logger=csv", "trainer.precision=bf16-mixed"]
    run_train(base + [f"hydra.run.dir={tmp_path / 'single'}"], tmp_path)
    run_train(base + PIPE2 + ["strategy.micro_batches=2", f"hydra.run.dir={tmp_path / 'pipe'}"], tmp_path)
    expected, got = losses(tmp_path / "single"), losses(tmp_path / "pipe")
    assert sorted(got) == sorted(expected) == [0, 1, 2, 3]
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-3), step


def test_every_new_schedule_logs_the_same_losses_as_one_device(tmp_path, single_run):
    """One sweep over interleaved_1f1b, zb_h1, zb_h2, zbv and dualpipev with V=2 chunks per stage (4
    virtual stages of the 4 layers), global-norm clipping active: each job writes its summary
    and its every logged loss equals one device's."""
    sweep = tmp_path / "sweep"
    schedules = ["interleaved_1f1b", "zb_h1", "zb_h2", "zbv", "dualpipev"]
    run_train(["-m", f"strategy.schedule={','.join(schedules)}", "strategy.virtual_stages=2", *TINY, *PIPE2,
               "model.dropout=0", "strategy.micro_batches=4", "trainer.max_steps=20", "logger=csv",
               "callbacks=none", "trainer.gradient_clip_val=0.05", f"hydra.sweep.dir={sweep}"], tmp_path, timeout=900)
    for job, name in enumerate(schedules):
        assert f"strategy.schedule={name}" in (sweep / str(job) / ".hydra" / "overrides.yaml").read_text()
        summary = read_summary(sweep / str(job))
        assert summary["steps"] == 20 and summary["choices"]["strategy"] == "pipeline", name
        assert_same_losses(sweep / str(job), single_run, name)


def test_profiled_costs_rebuild_zbv_say_so_and_train_like_one_device(tmp_path, single_run):
    run_dir = tmp_path / "profiled"
    proc = run_train(TINY + PIPE2 + ["model.dropout=0", "strategy.micro_batches=4", "strategy.schedule=zbv",
                                     "strategy.virtual_stages=2", "strategy.schedule_costs=profiled",
                                     "trainer.max_steps=20", "logger=csv", "callbacks=none",
                                     "trainer.gradient_clip_val=0.05", f"hydra.run.dir={run_dir}"], tmp_path)
    assert "strategy.schedule_costs=profiled: zbv for F, B and W per micro-batch" in proc.stdout
    assert "stage 1 chunk 1: F " in proc.stdout and "predicted" in proc.stdout
    assert_same_losses(run_dir, single_run)  # profiling left no trace in training


def test_auto_schedule_profiles_chooses_says_why_and_trains_like_one_device(tmp_path, single_run):
    run_dir = tmp_path / "auto"
    proc = run_train(TINY + PIPE2 + ["model.dropout=0", "strategy.micro_batches=4", "strategy.schedule=auto",
                                     "strategy.memory_budget_mb=1000", "trainer.max_steps=20", "logger=csv",
                                     "callbacks=none", "trainer.gradient_clip_val=0.05", f"hydra.run.dir={run_dir}"],
                     tmp_path)
    assert "strategy.schedule=auto: predicted from the profiled steps" in proc.stdout
    assert "zbv V=2" in proc.stdout and "chose " in proc.stdout
    assert_same_losses(run_dir, single_run)  # profiling left no trace in training
