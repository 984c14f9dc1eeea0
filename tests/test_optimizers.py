"""The `optim` group is a real choice: each option trains, and its state reshards by parameter
name, so a run saved on 2 stages resumes on 1 device with the losses of an uninterrupted run."""

from __future__ import annotations

import csv

import hydra
import pytest
import torch

from conftest import TINY, run_train
from giantpipe.platform.preflight import compose_train
from giantpipe.strategies.stage_checkpoint import (
    merge_optimizer_states,
    optimizer_param_names,
    select_optimizer_state,
)

OPTIMIZERS = ["adamw", "adam", "sgd", "adafactor"]


def build(option: str, named: list[tuple[str, torch.nn.Parameter]], extra: list[str] = ()) -> torch.optim.Optimizer:
    """The task's grouping (decay on matrices, none on vectors) with the composed `optim` option."""
    cfg = compose_train([f"optim={option}", *extra]).optim
    make = hydra.utils.instantiate(cfg, _convert_="all")
    return make([{"params": [p for _, p in named if p.ndim >= 2]},
                 {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0}])


@pytest.mark.parametrize("option, extra", [
    ("adamw", []), ("adam", ["optim.weight_decay=0.01"]), ("sgd", ["optim.nesterov=true"]), ("adafactor", []),
])
def test_each_optimizer_state_merges_and_splits_by_parameter_name(option, extra):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 3 if i % 2 else 4) for i in range(2)], torch.nn.Linear(3, 3))
    named = list(model.named_parameters())
    whole = build(option, named, extra)
    assert type(whole).__name__.lower() == option
    parts = [build(option, [(n, p) for n, p in named if n.split(".")[0] in layers], extra)
             for layers in ({"0"}, {"1", "2"})]
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        whole.step()  # the same gradients, separate states: each part must hold the whole's share
        for part in parts:
            part.step()
    shards = [{"optimizer_states": [p.state_dict()], "optimizer_param_names": optimizer_param_names([p], model)}
              for p in parts]
    (merged,), (names,) = merge_optimizer_states(shards, [n for n, _ in named])
    torch.testing.assert_close(merged, whole.state_dict())
    resplit = build(option, [(n, p) for n, p in named if n.split(".")[0] in {"0", "1"}], extra)
    local = optimizer_param_names([resplit], model)[0]
    resplit.load_state_dict(select_optimizer_state(merged, names, local))
    by_name = dict(named)
    for group in local:
        for name in group:
            torch.testing.assert_close(resplit.state[by_name[name]], whole.state[by_name[name]])


def losses(run_dir) -> dict[int, float]:
    rows = csv.DictReader((run_dir / "csv" / "metrics.csv").open())
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


# AdamW's resharding end to end is tests/test_reshard.py's (Adam keeps the same state); here the
# two whose state differs: SGD's momentum buffer and Adafactor's factored moments. A constant
# schedule with a warmup longer than the run: the resumed LR depends on the restored step count.
SWEEP = ["optim=sgd,adafactor"]
ARGS = TINY + ["model.dropout=0", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
               "trainer.limit_test_batches=0", "callbacks.model_checkpoint.save_top_k=-1", "logger=csv",
               "lr_schedule=constant", "lr_schedule.warmup_steps=6", "optim.lr=0.01"]


def test_two_stage_checkpoints_of_each_optimizer_resume_on_one_device_as_if_uninterrupted(tmp_path):
    whole, pipe, resumed = tmp_path / "whole", tmp_path / "pipe", tmp_path / "resumed"
    run_train(["-m", *ARGS, *SWEEP, "trainer.max_steps=4", f"hydra.sweep.dir={whole}"], tmp_path)
    run_train(["-m", *ARGS, *SWEEP, "trainer.max_steps=2", "strategy=pipeline", "strategy.stages=2",
               "trainer.devices=2", "strategy.micro_batches=2", f"hydra.sweep.dir={pipe}"], tmp_path, timeout=500)
    run_train(["-m", *ARGS, *SWEEP, "trainer.max_steps=4", f"hydra.sweep.dir={resumed}",
               f"ckpt_path={pipe}/${{hydra:job.num}}/checkpoints/step2.ckpt"], tmp_path)
    for job, option in enumerate(["sgd", "adafactor"]):
        expected = losses(whole / str(job))
        assert sorted(expected) == [0, 1, 2, 3], option
        first, rest = losses(pipe / str(job)), losses(resumed / str(job))
        assert sorted(first) == [0, 1] and sorted(rest) == [2, 3], (option, first, rest)
        for step, loss in {**first, **rest}.items():
            assert loss == pytest.approx(expected[step], rel=1e-5, abs=1e-6), (option, step)
        assert expected[3] != pytest.approx(expected[0], rel=1e-3), option  # it trains
