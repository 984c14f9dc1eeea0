"""The pipeline benchmark's summaries on hand-computed rows: the bound against the 2-thread
process, and the best confirmed in fresh rounds."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
from bench_results import collect, summarize, threads_bound  # noqa: E402


def _zb_h1_run(m: int, bubble: float, weight_s: float) -> dict:
    """A 2-stage zb_h1 row at M=m: 0.9 s a step, F, B, W = 1 : 2 - W : W per stage."""
    return {
        "impl": "giantpipe", "stages": 2, "label": "zb_h1", "micro_batches": m,
        "checkpoint": "never", "step_s": 0.9, "bubble_measured": bubble,
        "baseline_threads_s": 0.6, "speedup_vs_threads": 0.6 / 0.9, "forward_s": [0.1, 0.1],
        "backward_s": [0.2 - weight_s, 0.2 - weight_s], "weight_s": [weight_s, weight_s],
    }  # fmt: skip


def test_one_micro_batch_runs_the_stages_one_after_the_other():
    # each rank computes 0.9 s x (1 - 0.5) = 0.45 s; with one micro-batch and nothing for W the
    # stages cannot overlap: 0.9 s a step, against 0.6 s for the 2-thread process
    (bound,) = threads_bound([_zb_h1_run(1, 0.5, 0.0)])
    assert bound["rank_s"] == pytest.approx(0.45)
    assert bound["predicted_step_s"] == pytest.approx(0.9)
    assert bound["predicted_bubble"] == pytest.approx(0.5)
    assert bound["bound_vs_threads"] == pytest.approx(0.6 / 0.9)


def test_more_micro_batches_pick_the_schedule_with_the_least_bubble():
    # M=2, no W: interleaved 1F1B with two chunks a rank idles 1/5 of the step (schedule.py's
    # clocks), the least of the candidates; each rank computes 0.9 s x 0.7 = 0.63 s
    (bound,) = threads_bound([_zb_h1_run(2, 0.3, 0.0)])
    assert bound["schedule"] == "interleaved_1f1b V=2"
    assert bound["predicted_bubble"] == pytest.approx(0.2)
    assert bound["predicted_step_s"] == pytest.approx(0.63 / 0.8)
    assert bound["bound_vs_threads"] == pytest.approx(0.6 * 0.8 / 0.63)
    # weight products that W may take fill the bubble: the bound rises
    (with_w,) = threads_bound([_zb_h1_run(2, 0.3, 0.1)])
    assert with_w["shares"]["weight"] == pytest.approx(1 / 3)
    assert with_w["bound_vs_threads"] > bound["bound_vs_threads"]


def test_the_fastest_configuration_sets_the_compute_and_zb_h1_the_shares():
    # a 1f1b run at 0.8 s with 25% bubble computes 0.6 s a rank: the bound starts from it
    faster = {**_zb_h1_run(2, 0.25, 0.0), "label": "1f1b", "step_s": 0.8, "weight_s": [0.0, 0.0],
              "backward_s": [0.3, 0.3], "speedup_vs_threads": 0.75}  # fmt: skip
    (bound,) = threads_bound([_zb_h1_run(2, 0.3, 0.1), faster])
    assert bound["measured"] == "1f1b" and bound["measured_vs_threads"] == 0.75
    assert bound["rank_s"] == pytest.approx(0.6)
    assert bound["shares"]["weight"] == pytest.approx(1 / 3)  # zb_h1's, not the fused run's 0


def test_no_bound_without_a_split_run_and_the_2_thread_rounds():
    assert threads_bound([{**_zb_h1_run(2, 0.3, 0.0), "label": "1f1b"}]) == []
    assert threads_bound([{**_zb_h1_run(2, 0.3, 0.0), "baseline_threads_s": None}]) == []


def _row(schedule: str, m: int, steps: list[float], again: list[float] | None = None) -> dict:
    cfg = {"impl": "giantpipe", "stages": 2, "micro_batches": m, "schedule": schedule,
           "checkpoint": "never", "virtual_stages": 1, "costs": "equal", "backward": "split"}  # fmt: skip
    return {"cfg": cfg, "steps_s": steps, "cpu_s": 1.0, "error": None,
            **({"confirm_steps_s": again} if again else {})}  # fmt: skip


def test_the_confirmed_best_is_the_fastest_of_the_fresh_rounds_not_the_grids():
    # the grid ranks gpipe first (0.50 s) but its fresh rounds run 0.62 s; 1f1b's 0.55 s; the
    # fresh rounds' baselines: 1.0 s with 1 thread, 0.6 s with 2
    part = {
        "baseline_steps_s": [0.9, 0.9, 0.9], "baseline_cpu_s": 0.9,
        "baseline_threads_steps_s": [0.5, 0.5, 0.5], "baseline_pair_steps_s": [1.0, 1.0, 1.0],
        "confirm_baseline_steps_s": [1.1, 1.0, 0.9], "confirm_baseline_threads_steps_s": [0.6, 0.6, 0.7],
        "rows": [_row("gpipe", 4, [0.5, 0.5, 0.6], [0.62, 0.61, 0.7]),
                 _row("1f1b", 4, [0.52, 0.52, 0.5], [0.55, 0.56, 0.5]),
                 _row("zb_h1", 2, [0.8, 0.8, 0.8])],
    }  # fmt: skip
    runs, _ = collect(SimpleNamespace(name="mlp", mean_tokens=None, samples=8), [part])
    assert "confirm_step_s" not in runs[2]  # not among the contenders
    assert runs[1]["confirm_step_s"] == 0.55 and runs[1]["confirm_speedup"] == pytest.approx(1.0 / 0.55)
    summary = summarize("mlp", runs)
    assert summary["best_n2_speedup"]["label"] == "gpipe"  # the grid's: 0.9 / 0.5
    confirmed = summary["confirmed_best"]
    assert (confirmed["label"], confirmed["micro_batches"], confirmed["contenders"]) == ("1f1b", 4, 2)
    assert confirmed["speedup"] == pytest.approx(1.0 / 0.55)
    assert confirmed["speedup_vs_threads"] == pytest.approx(0.6 / 0.55)
    assert confirmed["grid_speedup"] == pytest.approx(0.9 / 0.52)
    assert confirmed["target_met"] is True  # 1.82 >= 1.75
