"""Schedules: every stage forwards and backwards each micro-batch once, in a feasible order."""

from __future__ import annotations

import inspect
from collections import Counter

import pytest

from giantpipe.strategies import schedule as sched
from giantpipe.strategies import zero_bubble
from giantpipe.strategies.schedule import (
    Action,
    Phase,
    gpipe,
    make_schedule,
    makespan,
    one_f_one_b,
    render,
    simulate,
    validate,
)
from giantpipe.strategies.schedule_auto import MeasuredCost

SIZES = [(n, m) for n in range(1, 6) for m in range(1, 10)]


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize(("num_stages", "micro_batches"), SIZES)
def test_each_micro_batch_forwarded_and_backwarded_once_without_deadlock(
    name, num_stages, micro_batches
):
    schedule = make_schedule(name, num_stages, micro_batches)
    validate(schedule, micro_batches)  # raises on a missing/duplicate action or a deadlock
    for actions in schedule:
        assert len(actions) == 2 * micro_batches
        for i in range(micro_batches):
            assert actions.index(Action(Phase.FORWARD, i)) < actions.index(
                Action(Phase.BACKWARD, i)
            )
    # with one clock per forward and two per fused backward, both take 3(M + N - 1) clocks:
    # the same bubble
    assert makespan(schedule) == 3 * (micro_batches + num_stages - 1)


def test_gpipe_is_all_forwards_then_all_backwards_in_reverse():
    F, B = Phase.FORWARD, Phase.BACKWARD
    for actions in gpipe(3, 3):
        assert actions == [
            Action(F, 0),
            Action(F, 1),
            Action(F, 2),
            Action(B, 2),
            Action(B, 1),
            Action(B, 0),
        ]


@pytest.mark.parametrize(("num_stages", "micro_batches"), SIZES)
def test_1f1b_bounds_micro_batches_in_flight(num_stages, micro_batches):
    for stage, actions in enumerate(one_f_one_b(num_stages, micro_batches)):
        in_flight = peak = 0
        for action in actions:
            in_flight += 1 if action.phase is Phase.FORWARD else -1
            peak = max(peak, in_flight)
        assert peak == min(num_stages - stage, micro_batches)


def test_infeasible_schedules_are_rejected():
    F, B = Phase.FORWARD, Phase.BACKWARD
    with pytest.raises(ValueError, match="deadlocks"):
        simulate([[Action(F, 0), Action(B, 0)], [Action(B, 0), Action(F, 0)]])
    with pytest.raises(ValueError, match="different orders"):
        validate([[Action(F, 0), Action(F, 1), Action(B, 0), Action(B, 1)],
                  [Action(F, 1), Action(F, 0), Action(B, 0), Action(B, 1)]], 2)  # fmt: skip
    with pytest.raises(ValueError, match=r"backward on \[1\]"):
        validate([[Action(F, 0), Action(F, 1), Action(B, 1)]], 2)


def test_unknown_schedule_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match=r"unknown pipeline schedule 'zigzag'.*1f1b.*gpipe"):
        make_schedule("zigzag", 2, 2)


def test_pictures_in_the_source_match_the_schedules():
    source = inspect.getsource(sched) + inspect.getsource(zero_bubble)
    pictures = [
        (gpipe(3, 4), "looped"),
        (one_f_one_b(3, 4), "looped"),
        (make_schedule("interleaved_1f1b", 2, 4, 2), "looped"),
        (make_schedule("zb_h1", 3, 4), "looped"),
        (make_schedule("zb_h2", 3, 4), "looped"),
        (make_schedule("zbv", 2, 4, 2), "vshape"),
        (make_schedule("dualpipev", 2, 4, 2), "vshape"),
    ]
    for schedule, placement in pictures:
        drawn = render(schedule, placement).splitlines()
        picture = "\n".join(("#   " + line).rstrip() for line in drawn)
        assert picture in source


# -- the zero-bubble and interleaved schedules, V chunks per rank ---------------------------------

CHUNKED = [
    (name, n, m, v)
    for name, spec in sched.SCHEDULES.items()
    for v in (spec.chunks or (1, 2, 3))
    for n in range(1, 6)
    for m in range(1, 10)
    if not (name == "interleaved_1f1b" and v > 1 and m % n)
    and not (name == "dualpipev" and m < 2 * n)
]


@pytest.mark.parametrize("name", sorted(sched.SCHEDULES))
def test_every_schedule_runs_each_action_once_in_order_without_deadlock(name):
    placement = sched.SCHEDULES[name].placement
    for _, n, m, v in (c for c in CHUNKED if c[0] == name):
        schedule = make_schedule(name, n, m, v)
        validate(schedule, m, placement=placement)  # orders, W after B, no deadlock
        for actions in schedule:
            phases = Counter(a.phase for a in actions)
            assert phases[Phase.FORWARD] == m * v, (n, m, v)
            assert phases[Phase.BACKWARD] + phases[Phase.INPUT] == m * v, (n, m, v)
            assert phases[Phase.WEIGHT] == phases[Phase.INPUT], (n, m, v)


@pytest.mark.parametrize(("num_stages", "micro_batches"), [(2, 4), (2, 8), (3, 6), (4, 8), (4, 16)])
def test_zero_bubble_schedules_shrink_the_bubble_at_bounded_memory(num_stages, micro_batches):
    n, m = num_stages, micro_batches
    one_f = sched.bubble(one_f_one_b(n, m))
    h1, h2 = make_schedule("zb_h1", n, m), make_schedule("zb_h2", n, m)
    zbv = make_schedule("zbv", n, m, 2)
    assert sched.bubble(h1) < one_f
    if n == 2:
        assert sched.bubble(h1) <= one_f / 2  # the target for zb_h1 at 2 stages
    assert sched.bubble(h2) <= sched.bubble(h1)
    assert sched.bubble(zbv, "vshape") < one_f / 2
    assert max(sched.peak_in_flight(h1)) == max(sched.peak_in_flight(one_f_one_b(n, m)))
    assert max(sched.peak_in_flight(h2)) <= 2 * n
    assert max(sched.peak_in_flight(zbv)) <= 2 * n  # chunks of half a stage: 1F1B's memory
    dualpipev = make_schedule("dualpipev", n, m, 2)
    assert sched.bubble(dualpipev, "vshape") <= sched.bubble(zbv, "vshape")
    assert max(sched.peak_in_flight(dualpipev)) == 2 * n + 1  # one chunk more than zbv
    if m % n == 0:
        interleaved = make_schedule("interleaved_1f1b", n, m, 2)
        assert sched.bubble(interleaved) < one_f


@pytest.mark.parametrize("num_stages", [2, 3, 4, 6, 8])
def test_zb_h1_reaches_the_papers_step_at_1f1b_memory(num_stages):
    """Qi et al. 2024, ZB-H1 with F = B = W = one clock: a step of 3M + N - 1 clocks (a bubble
    of N - 1, a third of 1F1B's 3(N - 1)) while no rank holds more than N micro-batches."""
    n = num_stages
    for m in (n, 2 * n, 4 * n):
        h1 = make_schedule("zb_h1", n, m)
        assert sched.makespan(h1) == 3 * m + n - 1, (n, m)
        assert sched.makespan(one_f_one_b(n, m)) == 3 * m + 3 * (n - 1)
        assert max(sched.peak_in_flight(h1)) == n


def test_placements_are_inverse_and_v_shape_turns_on_the_last_rank():
    for placement in ("looped", "vshape"):
        for n in range(1, 5):
            for k in range(2 * n):
                assert sched.virtual_stage(*sched.owner(k, n, placement), n, placement) == k
    assert [sched.owner(k, 3, "vshape") for k in range(6)] == [
        (0, 0), (1, 0), (2, 0), (2, 1), (1, 1), (0, 1),
    ]  # fmt: skip
    assert [sched.owner(k, 3) for k in range(6)] == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]


@pytest.mark.parametrize(
    ("name", "chunks", "micro_batches", "message"),
    [
        ("zbv", 1, 4, r"not defined for virtual_stages=1: it takes V in \[2\]"),
        ("gpipe", 2, 4, "not defined for virtual_stages=2"),
        ("interleaved_1f1b", 2, 3, "multiple of the 2 stages"),
        ("zb_h1", 0, 4, "not defined for virtual_stages=0"),
        ("dualpipev", 2, 3, r"micro_batches >= 2 x the 2 stages.*raise strategy.micro_batches to 4"),
    ],
)
def test_schedules_outside_their_definition_are_refused(name, chunks, micro_batches, message):
    with pytest.raises(ValueError, match=message):
        make_schedule(name, 2, micro_batches, chunks)


def test_a_w_before_its_b_or_a_missing_w_is_refused():
    F, B, W = Phase.FORWARD, Phase.INPUT, Phase.WEIGHT
    with pytest.raises(ValueError, match="runs W for"):
        validate([[Action(F, 0), Action(B, 0)]], 1)
    with pytest.raises(ValueError, match="deadlocks"):
        validate([[Action(F, 0), Action(W, 0), Action(B, 0)]], 1)


def test_split_ends_takes_w_off_the_fill_and_drain():
    actions = sched.split_ends(one_f_one_b(2, 3)[1])
    assert [str(a) for a in actions] == ["F0", "B0", "F1", "BW1", "F2", "B2", "W0", "W2"]


def test_schedules_import_without_torch():
    """Configs validate schedule names and V before torch is imported (platform/config.py)."""
    import subprocess
    import sys

    code = ("import sys, giantpipe.strategies.schedule, giantpipe.strategies.schedule_auto; "
            "sys.exit('torch' in sys.modules)")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


@pytest.mark.parametrize("num_stages", [1, 2, 3, 4])
def test_dualpipev_runs_the_peers_order(num_stages):
    """The same actions, in the same order, as torch's ScheduleDualPipeV (after
    deepseek-ai/DualPipe): its overlapped F+B pairs are our F then BW."""
    peer = pytest.importorskip("torch.distributed.pipelining.schedules")
    order = getattr(getattr(peer, "ScheduleDualPipeV", None), "_calculate_single_rank_operations", None)
    if order is None:  # a private method: other torch versions may not have it
        pytest.skip("this torch has no ScheduleDualPipeV._calculate_single_rank_operations")
    kinds = {"FORWARD": Phase.FORWARD, "FULL_BACKWARD": Phase.BACKWARD,
             "BACKWARD_INPUT": Phase.INPUT, "BACKWARD_WEIGHT": Phase.WEIGHT}  # fmt: skip
    for m in (2 * num_stages, 2 * num_stages + 1, 4 * num_stages):
        shape = type("Shape", (), {"pp_group_size": num_stages, "_n_microbatches": m})()
        for rank in range(num_stages):
            theirs = []
            for a in order(shape, rank):
                for sub in a.sub_actions or (a,):
                    chunk = 0 if sub.stage_index == rank else 1
                    theirs.append(Action(kinds[sub.computation_type.name], sub.microbatch_index, chunk))
            assert make_schedule("dualpipev", num_stages, m, 2)[rank] == theirs, (rank, m)


# F, B, W seconds per micro-batch of the giant net's zbv chunks (2 ranks), profiled on this
# machine: each rank's chunk 1 costs about twice its chunk 0
GIANT_ZBV_S = {(0, 0): (1.42e-3, 1.61e-3, 0.79e-3), (0, 1): (2.83e-3, 3.10e-3, 1.58e-3),
               (1, 0): (1.28e-3, 1.59e-3, 0.78e-3), (1, 1): (2.59e-3, 2.80e-3, 1.50e-3)}  # fmt: skip


@pytest.mark.parametrize(("name", "chunks"), [("zb_h1", 1), ("zb_h1", 2), ("zb_h2", 1), ("zbv", 2)])
def test_equal_measured_costs_give_the_clock_lists(name, chunks):
    """In seconds or in clocks, equal costs list the same actions (the pictures hold); the
    measured choice, which may also take a slot more room, is never slower."""
    same = MeasuredCost.of({(r, c): (3.0, 3.0, 3.0) for r in range(3) for c in range(chunks)})
    placement = sched.SCHEDULES[name].placement
    for m in (1, 4, 7):
        clock = make_schedule(name, 3, m, chunks)
        assert zero_bubble.list_schedule(zero_bubble.POLICIES[name], 3, m, chunks, same) == clock
        assert makespan(make_schedule(name, 3, m, chunks, same), placement, same) <= makespan(clock, placement, same)


def test_measured_costs_reshape_zbv_and_shorten_its_step():
    cost = MeasuredCost.of(GIANT_ZBV_S)
    for m in (4, 8, 16):
        equal, rebuilt = make_schedule("zbv", 2, m, 2), make_schedule("zbv", 2, m, 2, cost)
        validate(rebuilt, m, placement="vshape")
        assert makespan(rebuilt, "vshape", cost) < 0.97 * makespan(equal, "vshape", cost), m


@pytest.mark.parametrize(("name", "chunks"), [("zb_h1", 1), ("zb_h1", 2), ("zb_h2", 1), ("zb_h2", 2), ("zbv", 2)])
def test_any_measured_costs_give_a_valid_schedule_no_slower_than_the_clock_one(name, chunks):
    """Random costs (1 to 12 units, each rank, chunk and phase apart): the lists never
    deadlock, and the simulation never prefers them over the equal-cost ones wrongly."""
    import random

    placement = sched.SCHEDULES[name].placement
    rng = random.Random(0)
    for n in (2, 3, 4):
        for m in (1, 2, 5, 8):
            ms = {(r, c): tuple(rng.uniform(1, 12) for _ in range(3)) for r in range(n) for c in range(chunks)}
            cost = MeasuredCost.of(ms)
            rebuilt = make_schedule(name, n, m, chunks, cost)
            validate(rebuilt, m, placement=placement)
            assert makespan(rebuilt, placement, cost) <= makespan(make_schedule(name, n, m, chunks), placement, cost)


def test_a_cost_that_is_not_positive_is_refused():
    with pytest.raises(ValueError, match="positive cost"):
        make_schedule("zb_h1", 2, 4, 1, lambda rank, action: 0.0)
