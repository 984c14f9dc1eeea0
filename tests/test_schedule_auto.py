"""`strategy.schedule=auto`: the prediction from profiled F, B, W times and activation memory."""

from __future__ import annotations

import pytest

from giantpipe.strategies.schedule import bubble, make_schedule, one_f_one_b
from giantpipe.strategies.schedule_auto import StageProfile, choose, explain, predict

EQUAL = [StageProfile(0.01, 0.01, 0.01, 10.0) for _ in range(2)]


def test_with_equal_f_b_w_the_prediction_is_the_clock_picture():
    one_f = predict("1f1b", 1, EQUAL, 8)
    assert one_f.bubble == pytest.approx(bubble(one_f_one_b(2, 8)))
    assert one_f.step_s == pytest.approx(0.01 * 3 * (8 + 1))  # 3(M+N-1) clocks of 10 ms
    assert one_f.memory_mb == pytest.approx(2 * 10.0)  # stage 0 holds N micro-batches
    zbv = predict("zbv", 2, EQUAL, 8)
    assert zbv.bubble == pytest.approx(bubble(make_schedule("zbv", 2, 8, 2), "vshape"))
    assert zbv.memory_mb == pytest.approx(4 * 10.0 / 2)  # 2N chunks of half a stage


def test_auto_picks_a_zero_bubble_schedule_and_says_why():
    best, predictions = choose(EQUAL, 8)
    assert best.schedule in ("zb_h1", "zb_h2", "zbv", "dualpipev") and best.bubble < 0.05
    assert best.step_s == min(p.step_s for p in predictions if p.step_s is not None)
    text = explain(best, predictions)
    assert f"chose {best.label}" in text and "1f1b" in text and "chosen" in text


def test_the_memory_budget_excludes_schedules_that_hold_more():
    best, predictions = choose(EQUAL, 8, memory_budget_mb=20.0)
    excluded = {p.label for p in predictions if p.excluded}
    assert "gpipe" in excluded and "zb_h2" in excluded  # 8 and 4 micro-batches of 10 MB
    assert best.memory_mb <= 20.0 and "memory_budget_mb=20" in explain(best, predictions)
    with pytest.raises(ValueError, match="no schedule fits strategy.memory_budget_mb=5"):
        choose(EQUAL, 8, memory_budget_mb=5.0)


def test_a_fused_weight_time_makes_splitting_worthless():
    """LSTM-like stages: W's products stay in B (W ~ 0), so zero-bubble schedules cannot fill
    the bubble with W; their advantage over 1F1B shrinks to B's earlier send."""
    lstm = [StageProfile(0.01, 0.02, 0.0, 10.0) for _ in range(2)]
    gain_lstm = predict("1f1b", 1, lstm, 4).step_s / predict("zb_h1", 1, lstm, 4).step_s
    gain_linear = predict("1f1b", 1, EQUAL, 4).step_s / predict("zb_h1", 1, EQUAL, 4).step_s
    assert gain_lstm < gain_linear


def test_undefined_candidates_are_listed_with_the_reason():
    _, predictions = choose(EQUAL, 3)  # interleaved needs M a multiple of N, dualpipev M >= 2N
    (interleaved,) = [p for p in predictions if p.schedule == "interleaved_1f1b"]
    assert "multiple of the 2 stages" in interleaved.excluded
    (dualpipev,) = [p for p in predictions if p.schedule == "dualpipev"]
    assert "micro_batches >= 2 x the 2 stages" in dualpipev.excluded
