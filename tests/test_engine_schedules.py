"""Every schedule equals one device: interleaved, zero-bubble and V-shaped ones, V chunks.

The grid: every schedule x V in {1, 2} (where defined) x N in {2, 3, 4} x M in {1, 2, 4, 8}
(where defined), float64, variable lengths, every parameter's gradient at every step, the
losses and the weights after 3 steps. Re-materialization modes rotate over the grid (each
(schedule, V, N) meets every mode), so one launch per world size runs it all.
"""

from __future__ import annotations

import itertools

import pytest

from giantpipe.strategies.schedule import SCHEDULES, make_schedule
from giantpipe.strategies.schedule_auto import MeasuredCost
from pipeline_harness import (
    assert_transparent,
    close,
    config,
    reference,
    run_configs,
    spawn,
)
from test_schedule import GIANT_ZBV_S

LAYERS = 10  # the toy's
MODES = ("never", "always", "except_last")
NEW_SCHEDULES = ("interleaved_1f1b", "zb_h1", "zb_h2", "zbv", "dualpipev")


def even(parts: int) -> list[int]:
    return [LAYERS // parts + (1 if p < LAYERS % parts else 0) for p in range(parts)]


def defined(name: str, chunks: int, stages: int, micro_batches: int) -> bool:
    """Whether the schedule exists there (its own rules; test_schedule.py checks them)."""
    try:
        make_schedule(name, stages, micro_batches, chunks)
    except ValueError:
        return False
    return True


def grid(stages: int) -> list[dict]:
    out, turn = [], itertools.count()
    for name, chunks, m in itertools.product(NEW_SCHEDULES, (1, 2), (1, 2, 4, 8)):
        if defined(name, chunks, stages, m):
            mode = MODES[next(turn) % len(MODES)]
            out.append(config(even(stages * chunks), m, name, mode, virtual_stages=chunks))
    return out


GRIDS = {n: grid(n) for n in (2, 3, 4)}
# dropout and BatchNorm through V-shaped chunks: every mode gives the same numbers
ZBV_MODES = [
    config(even(4), 4, "zbv", mode, virtual_stages=2, dropout=0.3, batchnorm=True)
    for mode in MODES
]
# deferred BatchNorm: the mini-batch's running statistics whatever the schedule and chunks
DEFERRED_BN = [
    {**config(even(2), 4, "gpipe", "never", batchnorm=True), "deferred_batch_norm": True},
    {**config(even(4), 4, "zbv", "always", virtual_stages=2, batchnorm=True), "deferred_batch_norm": True},
    {**config(even(4), 4, "interleaved_1f1b", "except_last", virtual_stages=2, batchnorm=True),
     "deferred_batch_norm": True},
    {**config(even(4), 4, "dualpipev", "never", virtual_stages=2, batchnorm=True), "deferred_batch_norm": True},
]
# rebuilt for measured costs (strategy.schedule_costs=profiled): the giant net's zbv chunks
# (test_schedule.py's), and a zb_h1 whose stages differ in F and W
UNEQUAL_S = {(0, 0): (4e-3, 4e-3, 1e-3), (1, 0): (1e-3, 4e-3, 3e-3)}
PROFILED = [
    config(even(4), 4, "zbv", "never", virtual_stages=2, costs=GIANT_ZBV_S),
    config(even(4), 8, "zbv", "except_last", virtual_stages=2, costs=GIANT_ZBV_S),
    config(even(2), 8, "zb_h1", "never", costs=UNEQUAL_S),
]
# replicas of V-shaped and looped chunks (world 4: 2 stages x 2 replicas)
DP = [
    config(even(4), 4, "zbv", "never", replicas=2, virtual_stages=2),
    config(even(4), 2, "zb_h1", "always", replicas=2, virtual_stages=2),
    config(even(4), 4, "dualpipev", "except_last", replicas=2, virtual_stages=2),
]


def per_config(results: list) -> list[list[dict]]:
    return [list(r) for r in zip(*results, strict=True)]


@pytest.fixture(scope="module")
def jobs():
    return {
        2: per_config(spawn(run_configs, 2, GRIDS[2] + ZBV_MODES + DEFERRED_BN + PROFILED, join_timeout=300)),
        3: per_config(spawn(run_configs, 3, GRIDS[3], join_timeout=300)),
        4: per_config(spawn(run_configs, 4, GRIDS[4] + DP, join_timeout=300)),
    }


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_every_schedule_equals_one_device(jobs, stages):
    for cfg, per_rank in zip(GRIDS[stages], jobs[stages], strict=False):
        assert_transparent(cfg, per_rank)


def test_grid_covers_every_schedule_chunk_count_and_mode():
    seen = {(c["schedule"], c["virtual_stages"]) for g in GRIDS.values() for c in g}
    for name, spec in SCHEDULES.items():
        if name in NEW_SCHEDULES:
            assert {(name, v) for v in spec.chunks or (1, 2)} <= seen, name
    for name in NEW_SCHEDULES:
        modes = {c["checkpoint"] for g in GRIDS.values() for c in g if c["schedule"] == name}
        assert modes == set(MODES), name


def test_replicas_of_chunked_stages_equal_the_global_batch(jobs):
    for cfg, per_rank in zip(DP, jobs[4][len(GRIDS[4]) :], strict=True):
        assert sorted((r["stage"], r["replica"]) for r in per_rank) == [
            (0, 0), (0, 1), (1, 0), (1, 1),
        ]  # fmt: skip
        assert_transparent(cfg, per_rank)


def test_v_shape_modes_agree_with_dropout_and_batchnorm(jobs):
    runs = jobs[2][len(GRIDS[2]) : len(GRIDS[2]) + len(ZBV_MODES)]
    no_dropout = reference(config(even(4), 4, "gpipe", "never", batchnorm=True))
    for per_rank in runs[1:]:
        for base, res in zip(runs[0], per_rank, strict=True):
            for key in ("weights", "buffers"):
                for name, value in res[key].items():
                    assert close(value, base[key][name]), f"{key} {name}"
            assert res["losses"] == pytest.approx(base["losses"], rel=1e-6)
    assert runs[0][0]["losses"] != pytest.approx(no_dropout["losses"], rel=1e-3), "dropout was off"


def test_deferred_batch_norm_keeps_mini_batch_statistics_through_chunks(jobs):
    start = len(GRIDS[2]) + len(ZBV_MODES)
    runs = jobs[2][start : start + len(DEFERRED_BN)]
    buffers = [{n: b for r in per_rank for n, b in r["buffers"].items()} for per_rank in runs]
    stats = [n for n in buffers[0] if n.endswith(("running_mean", "running_var"))]
    assert stats, "no BatchNorm statistics compared"
    weights = [{n: w for r in per_rank for n, w in r["weights"].items()} for per_rank in runs]
    for cfg, other, other_weights in zip(DEFERRED_BN[1:], buffers[1:], weights[1:], strict=True):
        for name in stats:
            assert close(other[name], buffers[0][name]), f"{cfg['schedule']}: {name}"
        for name, w in other_weights.items():  # micro-batch statistics in the forward: the same
            assert close(w, weights[0][name]), f"{cfg['schedule']}: weight {name}"


def test_schedules_rebuilt_for_measured_costs_equal_one_device(jobs):
    """The rebuilt lists differ from the equal-cost ones and still give one device's numbers."""
    for cfg in PROFILED:
        n, v = len(cfg["balance"]) // cfg["virtual_stages"], cfg["virtual_stages"]
        rebuilt = make_schedule(cfg["schedule"], n, cfg["micro_batches"], v, MeasuredCost.of(cfg["costs"]))
        assert rebuilt != make_schedule(cfg["schedule"], n, cfg["micro_batches"], v), cfg["schedule"]
    for cfg, per_rank in zip(PROFILED, jobs[2][-len(PROFILED) :], strict=True):
        assert_transparent(cfg, per_rank)
