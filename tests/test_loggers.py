"""One wandb run and one TensorBoard writer per Hydra job, whatever the stage and replica count.

Only the global rank 0 creates a logger's experiment; the other ranks' figures reach it through
Lightning (pipeline/stage{s}/* are all-gathered first). Read from the files the loggers wrote:
the offline wandb run's protobuf log and the TensorBoard event files. One device:
test_train_cli.py's local-files run.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import TINY, read_summary, run_train
from offline_wandb import read_run

LOGGED = TINY + ["model.n_layers=2", "trainer.max_steps=2", "trainer.val_check_interval=2", "logger=all",
                 "callbacks=none", "strategy=pipeline", "strategy.micro_batches=2", "strategy.timeline=true"]


def wandb_runs(job: Path) -> list[Path]:
    return sorted((job / "wandb").glob("offline-run-*/run-*.wandb"))


def tensorboard_writers(job: Path) -> set[str]:
    """The processes that wrote TensorBoard event files (events.out.tfevents.<time>.<host>.<pid>.<n>);
    one process may write several files (a fresh file after fit closes the writer)."""
    return {p.name.split(".")[-2] for p in job.rglob("events.out.tfevents.*")}


def check_one_run(job: Path, stages: int, group: str | None = None) -> None:
    runs = wandb_runs(job)
    assert len(runs) == 1, [str(r.relative_to(job)) for r in runs]
    assert len(list((job / "wandb").glob("*run-*"))) == 1, list((job / "wandb").iterdir())
    assert len(tensorboard_writers(job)) == 1, tensorboard_writers(job)
    assert len(list(job.rglob("metrics.csv"))) == 1
    run = read_run(runs[0])
    assert run.config["data"]["seq_len"] == 32 and run.config["strategy"]["stages"] == stages
    assert "${" not in json.dumps(run.config)  # resolved
    assert {"train/loss", "val/loss", "test/loss", "pipeline/bubble"} <= run.metrics
    per_stage = {m.split("/")[1] for m in run.metrics if m.startswith("pipeline/stage")}
    assert per_stage == {f"stage{s}" for s in range(stages)}  # every stage's figures, in rank 0's run
    assert "pipeline/timeline/_type" in run.metrics
    assert list((job / "wandb").rglob("media/images/pipeline/timeline_*.png"))
    if group is not None:
        assert run.group == group
    assert read_summary(job)["steps"] == 2


def test_one_run_per_job_for_two_and_four_stages(tmp_path):
    sweep = tmp_path / "sweep"
    run_train(["-m", *LOGGED, "strategy.stages=2,4", "trainer.devices=${strategy.stages}",
               f"hydra.sweep.dir={sweep}"], tmp_path, timeout=600)
    for job, stages in zip(("0", "1"), (2, 4), strict=True):
        check_one_run(sweep / job, stages, group=sweep.name)


def test_one_run_per_job_for_two_stages_by_two_replicas(tmp_path):
    job = tmp_path / "run"
    run_train([*LOGGED, "strategy.stages=2", "strategy.replicas=2", "trainer.devices=4", f"hydra.run.dir={job}"],
              tmp_path, timeout=400)
    check_one_run(job, stages=2)
