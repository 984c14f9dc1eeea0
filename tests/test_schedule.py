"""Schedules: every stage forwards and backwards each micro-batch once, in a feasible order."""

from __future__ import annotations

import inspect

import pytest

from giantpipe.strategies import schedule as sched
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
    source = inspect.getsource(sched)
    pictures = [
        (gpipe(3, 4), "looped"),
        (one_f_one_b(3, 4), "looped"),
        (make_schedule("interleaved_1f1b", 2, 4, 2), "looped"),
        (make_schedule("zb_h1", 3, 4), "looped"),
        (make_schedule("zb_h2", 3, 4), "looped"),
        (make_schedule("zbv", 2, 4, 2), "vshape"),
    ]
    for schedule, placement in pictures:
        drawn = render(schedule, placement).splitlines()
        picture = "\n".join(("#   " + line).rstrip() for line in drawn)
        assert picture in source
