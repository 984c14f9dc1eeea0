"""The pipeline engine is transparent: pipelined training equals plain training.

Each spawned job (one per world size; process start-up dominates) runs many configurations;
module-scoped fixtures share a job between the tests that read it. Every parameter's
gradient is compared at every step, not a sum of them.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from giantpipe.strategies.engine import PipelineEngine
from giantpipe.strategies.topology import Topology
from pipeline_harness import (
    BATCH,
    LR,
    SEED,
    ToyLoss,
    ToySeq2Seq,
    assert_transparent,
    close,
    config,
    make_batches,
    pipelined_run,
    reference,
    run_configs,
    spawn,
)

# -- 2 stages: the full grid of micro-batches × schedules × checkpoint modes, plus dropout ---------

# a representative grid: every M with both schedules, every mode with both schedules
GRID_2 = [
    config([5, 5], 1, "gpipe", "never"),
    config([5, 5], 1, "1f1b", "always"),
    config([5, 5], 2, "gpipe", "always"),
    config([5, 5], 2, "1f1b", "except_last"),
    config([5, 5], 4, "gpipe", "except_last"),
    config([5, 5], 4, "1f1b", "never"),
    config([5, 5], 8, "gpipe", "always"),
    config([5, 5], 8, "1f1b", "except_last"),
    config([3, 7], 4, "1f1b", "always"),
    # the fused backward (split_backward=False) where the split one would run
    config([5, 5], 4, "gpipe", "never", split=False),
    config([5, 5], 8, "1f1b", "never", split=False),
]
MODES = [
    config([4, 6], 4, s, c, dropout=0.3, batchnorm=True)
    for s, c in [
        ("gpipe", "always"),
        ("gpipe", "except_last"),
        ("gpipe", "never"),
        ("1f1b", "always"),
    ]
]


@pytest.fixture(scope="module")
def two_stage_job():
    results = spawn(run_configs, 2, GRID_2 + MODES)
    return [list(r) for r in zip(*results, strict=True)]  # per config: one result per rank


def test_two_stages_equal_plain_training(two_stage_job):
    for cfg, per_rank in zip(GRID_2, two_stage_job, strict=False):
        assert_transparent(cfg, per_rank)


def test_checkpoint_modes_agree_with_dropout_and_batchnorm(two_stage_job):
    runs = two_stage_job[len(GRID_2) :]
    no_dropout = reference(config([4, 6], 4, "gpipe", "never", batchnorm=True))
    for per_rank in runs:
        for base, res in zip(runs[0], per_rank, strict=True):
            for key in ("weights", "buffers"):
                for name, value in res[key].items():
                    assert close(value, base[key][name]), f"{key} {name}"
            for step, grads in enumerate(res["grads"]):
                for name, grad in grads.items():
                    assert close(grad, base["grads"][step][name]), f"grad {name} at step {step}"
            assert res["losses"] == pytest.approx(base["losses"], rel=1e-6)
    assert runs[0][1]["losses"] != pytest.approx(no_dropout["losses"], rel=1e-3), "dropout was off"
    assert any("running_mean" in name for res in runs[0] for name in res["buffers"]), "no BatchNorm"


def test_each_process_holds_only_its_stage(two_stage_job):
    for per_rank in two_stage_job:
        for res in per_rank:
            local = {f"layers.{i}." for i in res["layers"]}
            for name, is_meta in res["meta"].items():
                on_stage = any(name.startswith(prefix) for prefix in local)
                assert is_meta != on_stage, f"stage {res['stage']}: {name} meta={is_meta}"


# -- 3 stages ----------------------------------------------------------------------------------------

GRID_3 = [
    config([2, 3, 5], 1, "1f1b", "always"),
    config([2, 3, 5], 2, "gpipe", "except_last"),
    config([2, 3, 5], 8, "gpipe", "always"),
    config([4, 4, 2], 4, "1f1b", "never"),
    config([1, 8, 1], 4, "1f1b", "except_last"),
    config([2, 3, 5], 4, "gpipe", "never"),  # a middle stage with a split backward
]


def test_three_stages_equal_plain_training():
    results = spawn(run_configs, 3, GRID_3)
    for cfg, per_rank in zip(GRID_3, zip(*results, strict=True), strict=True):
        assert_transparent(cfg, list(per_rank))


# -- 4 processes: 4 stages, and 2 stages × 2 replicas ----------------------------------------------

GRID_4 = [
    config([3, 3, 2, 2], 1, "gpipe", "except_last"),
    config([3, 3, 2, 2], 2, "1f1b", "always"),  # fewer micro-batches than stages
    config([3, 3, 2, 2], 8, "1f1b", "never"),
    config([3, 3, 2, 2], 4, "gpipe", "never"),  # `enc` passes through stage 1's split backward
    config([2, 2, 3, 3], 4, "gpipe", "always"),
]
GRID_DP = [
    config([5, 5], 2, "gpipe", "except_last", replicas=2),
    config([5, 5], 4, "1f1b", "always", replicas=2),
    config([3, 7], 1, "1f1b", "never", replicas=2, placement=[[0, 2], [3, 1]]),
]


@pytest.fixture(scope="module")
def four_process_job():
    results = spawn(run_configs, 4, GRID_4 + GRID_DP)
    return [list(r) for r in zip(*results, strict=True)]


def test_four_stages_equal_plain_training(four_process_job):
    for cfg, per_rank in zip(GRID_4, four_process_job, strict=False):
        assert_transparent(cfg, per_rank)


def test_two_stages_by_two_replicas_equal_global_batch(four_process_job):
    for cfg, per_rank in zip(GRID_DP, four_process_job[len(GRID_4) :], strict=True):
        assert sorted((r["stage"], r["replica"]) for r in per_rank) == [
            (0, 0),
            (0, 1),
            (1, 0),
            (1, 1),
        ]
        assert_transparent(cfg, per_rank)


# -- a stage that fails mid-step -------------------------------------------------------------------

PG_TIMEOUT = 2.0


def fail_mid_step(rank: int, world_size: int) -> dict:
    """Stage 1 raises on its second micro-batch and then lingers, so its neighbours can only
    rely on the process group's timeout; they report what they raised and when."""
    with torch.device("meta"):
        model = ToySeq2Seq(boom_at=4)
    engine = PipelineEngine(
        model, ToyLoss(), [3, 3, 4], micro_batches=4, checkpoint="never", seed=SEED
    )
    batch = make_batches(1, BATCH, seed=5)[0]
    engine.train_step(batch)  # warm up: first calls are slow, and must not eat the timeout
    if engine.stage == 1:
        model.layers[4].arm(fail_on=2)
    dist.barrier()
    try:
        engine.train_step(batch)
    except RuntimeError as err:
        if "Boom" in str(err):
            time.sleep(PG_TIMEOUT + 1.5)  # alive past the timeout: neighbours must not need its exit
        return {"error": str(err)}
    return {"error": None}


def test_failed_stage_makes_others_raise_on_the_group_timeout():
    """The neighbours raise gloo's timeout while the failed stage still lives (it sleeps past
    the timeout), so they rely on the timeout, not on its exit (no clock is asserted)."""
    outcomes = spawn(fail_mid_step, 3, pg_timeout=PG_TIMEOUT, join_timeout=60)
    assert "Boom" in outcomes[1]["error"]
    for rank in (0, 2):
        assert "Timed out" in outcomes[rank]["error"], outcomes[rank]["error"]


# -- single process and validation ---------------------------------------------------------------


def test_single_stage_engine_without_distributed_equals_plain_training():
    cfg = config([10], 4, "gpipe", "except_last")
    with torch.device("meta"):
        model = ToySeq2Seq()
    engine = PipelineEngine(model, ToyLoss(), [10], micro_batches=4, seed=SEED)
    res = pipelined_run(engine, make_batches(**cfg["data"]), LR)
    res.update(
        stage=0, replica=0, eval_loss=engine.eval_step(make_batches(**cfg["data"])[0]).item()
    )
    res["logits"] = engine.forward(make_batches(**cfg["data"])[0])["logits"]
    assert_transparent(cfg, [res])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"balance": [4, 5]}, "covers 9 layers but the model has 10"),
        ({"balance": [10, 0]}, "empty stage"),
        ({"checkpoint": "sometimes"}, "unknown checkpoint mode"),
        ({"schedule": "zigzag"}, "unknown pipeline schedule"),
        ({"micro_batches": 0}, "at least 1"),
        ({"balance": [5, 5]}, "needs torch.distributed"),
    ],
)
def test_engine_rejects_bad_arguments(kwargs, message):
    args = {
        "balance": [10],
        "micro_batches": 2,
        "schedule": "gpipe",
        "checkpoint": "never",
        **kwargs,
    }
    with torch.device("meta"):
        model = ToySeq2Seq()
    with pytest.raises(ValueError, match=message):
        PipelineEngine(model, ToyLoss(), args.pop("balance"), **args)


def test_parameters_tied_across_stages_are_rejected():
    with torch.device("meta"):
        model = ToySeq2Seq()
    model.layers[7].lin.weight = model.layers[1].lin.weight
    with pytest.raises(
        ValueError, match="layers 1 and 7 share a parameter but sit on stages 0 and 1"
    ):
        PipelineEngine(model, ToyLoss(), [5, 5], micro_batches=2, topology=Topology(2), seed=SEED)


def test_batch_smaller_than_micro_batches_is_rejected():
    with torch.device("meta"):
        model = ToySeq2Seq()
    engine = PipelineEngine(model, ToyLoss(), [10], micro_batches=4, seed=SEED)
    with pytest.raises(ValueError, match="cannot be split into 4 micro-batches"):
        engine.train_step(make_batches(1, 3, seed=1)[0])


# -- topology ------------------------------------------------------------------------------------------


def test_topology_layout_is_pipeline_major():
    topo = Topology(num_stages=4, num_replicas=2)
    assert topo.mesh() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert topo.coords(6) == (2, 1)
    assert topo.stage_ranks(1) == [1, 5]
    assert topo.pipeline_ranks(1) == [4, 5, 6, 7]
    assert (topo.prev_rank(4), topo.next_rank(4)) == (None, 5)
    assert (topo.prev_rank(7), topo.next_rank(7)) == (6, None)
    assert Topology.for_world(2, 6).num_replicas == 3


def test_topology_explicit_placement():
    topo = Topology(2, 2, placement=[[0, 2], [3, 1]])
    assert topo.pipeline_ranks(0) == [0, 3] and topo.pipeline_ranks(1) == [2, 1]
    assert topo.coords(1) == (1, 1) and topo.next_rank(2) == 1


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Topology(0, 1), "at least one stage"),
        (lambda: Topology.for_world(3, 4), "multiple of the stage count"),
        (lambda: Topology(2, 2, placement=[[0, 1], [2]]), "must list 2 rank"),
        (lambda: Topology(2, 2, placement=[[0, 1], [1, 2]]), "exactly once"),
        (lambda: Topology(2, 2).check_world_size(3), "need 4 processes"),
        (lambda: Topology(2, 1).coords(5), "outside a world of 2"),
    ],
)
def test_topology_validation(make, message):
    with pytest.raises(ValueError, match=message):
        make()
