"""The pipeline benchmark's smoke mode runs end to end and writes the JSON its docstring documents."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

RUN_FIELDS = {
    "model", "impl", "stages", "micro_batches", "schedule", "checkpoint", "step_s", "steps_s",
    "baseline_s", "speedup", "speedup_of_fastest", "ideal_speedup", "samples_per_s",
    "tokens_per_s", "baseline_threads_s", "speedup_vs_threads", "bubble_theoretical", "cpu_s",
    "cpu_ratio", "error", "virtual_stages", "costs", "backward", "label",
}  # fmt: skip


def test_quick_benchmark_writes_valid_json(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_pipeline.py"), "--quick", "--out", str(out),
         "--pictures", str(tmp_path / "pictures")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["meta"]["quick"] is True and result["meta"]["threads_per_process"] == 1
    assert result["meta"]["split_backward"] is True
    assert set(result["models"]) == {"mlp", "giant", "seq", "gnmt"}
    for model in result["models"].values():
        assert model["baseline_s"] > 0 and model["params"] > 0
        # both ranks ran the plain step at once: the bound of any 2-process configuration
        assert model["baseline_pair_s"] > 0 and model["two_process_ceiling"] > 0
    runs = result["runs"]
    for run in runs:
        assert RUN_FIELDS <= set(run), RUN_FIELDS - set(run)
        if run["error"] is None:
            assert (
                run["step_s"] > 0
                and run["speedup"] > 0
                and len(run["steps_s"]) == result["meta"]["reps"]
            )
    ours = [r for r in runs if r["impl"] == "giantpipe" and r["stages"] == 2]
    assert {r["checkpoint"] for r in ours} == {"never", "except_last", "always"}
    assert all(0.0 <= r["bubble_measured"] <= 1.0 and len(r["compute_s"]) == 2 for r in ours)
    # the busiest stage idles no more than the stages do on average
    assert all(0.0 <= r["bubble_busiest"] <= r["bubble_measured"] for r in ours)
    profiled = [r for r in ours if r["costs"] == "profiled"]  # rebuilt for measured costs
    assert {r["label"] for r in profiled} == {"zb_h1/V2 profiled", "zbv/V2 profiled"}
    assert all(r["step_s"] > 0 for r in profiled)
    textbook = [r for r in ours if r["backward"] == "fused"]  # 1F1B with every backward whole
    assert textbook and all(r["label"] == "1f1b fused" and r["step_s"] > 0 for r in textbook)
    peers = [r for r in runs if r["impl"] == "peer"]
    assert {r["model"] for r in peers} == {"mlp", "giant"}  # the seq model changes shape: no peer
    assert any(r["error"] for r in peers if r["schedule"] == "1f1b" and r["micro_batches"] == 1)
    assert "vs_peer" in result["summary"]["mlp"] and "target_met" in result["summary"]["mlp"]
    for name in ("mlp", "giant"):  # each side's fastest schedule, at both M
        best = result["summary"][name]["best_vs_peer_best"]
        assert [b["micro_batches"] for b in best] == [1, 4] and all(b["peer_s"] > 0 for b in best)
    efficiency = result["summary"]["mlp"]["efficiency_by_m"]
    assert [e["micro_batches"] for e in efficiency] == [1, 4]
    for e in efficiency:  # the fastest 2-stage step against the 1-stage engine's, same M
        same_m = [r for r in runs if r["model"] == "mlp" and r["impl"] == "giantpipe"
                  and r["micro_batches"] == e["micro_batches"] and r["checkpoint"] == "never"]  # fmt: skip
        one = next(r for r in same_m if r["stages"] == 1)
        two = min((r for r in same_m if r["stages"] == 2 and r["step_s"]), key=lambda r: r["step_s"])
        assert e["efficiency"] == pytest.approx(two["speedup"] / one["speedup"])  # each over its own rounds
        assert e["step_ratio"] == pytest.approx(one["step_s"] / two["step_s"])
    assert "two independent 1-thread processes reach" in proc.stdout
    for name in ("mlp", "gnmt"):
        assert "k1_engine_overhead" in result["summary"][name]
        assert result["summary"][name]["best_n2_speedup_vs_threads"]["speedup_vs_threads"] > 0
    for name in ("mlp", "gnmt"):  # the most any schedule could do against the 2-thread process
        bound = result["summary"][name]["threads_bound"]
        assert [b["micro_batches"] for b in bound] == [4]  # the quick run has zb_h1 at M=4 only
        # no schedule beats each rank computing its half without a break
        assert all(b["predicted_step_s"] >= b["rank_s"] > 0 and b["bound_vs_threads"] > 0 for b in bound)
        assert sum(bound[0]["shares"].values()) == pytest.approx(1.0)
    assert "the most a 2-stage pipeline could reach" in proc.stdout
    for name in result["models"]:  # the fastest 3 timed again, in fresh rounds
        again = [r for r in runs if r["model"] == name and "confirm_steps_s" in r]
        assert len(again) == 3 and all(r["impl"] == "giantpipe" and r["stages"] == 2 for r in again)
        assert all(len(r["confirm_steps_s"]) == result["meta"]["reps"] and r["confirm_speedup"] > 0 for r in again)
        best = result["summary"][name]["confirmed_best"]
        assert best["speedup"] == max(r["confirm_speedup"] for r in again) and best["contenders"] == 3
    assert "timed again in fresh rounds" in proc.stdout
    # GNMT (#5): single vs 2-stage tokens/s at each M
    gnmt = result["summary"]["gnmt"]["tokens_per_s"]
    assert gnmt["single"] > 0
    assert [r["micro_batches"] for r in gnmt["by_micro_batches"]] == [1, 4]
    assert all(r["n2_tokens_per_s"] > 0 and r["n2_over_single"] > 0 for r in gnmt["by_micro_batches"])
    assert {r["checkpoint"] for r in runs if r["model"] == "gnmt" and r["stages"] == 2} == {
        "never", "always",
    }  # fmt: skip
    assert list((tmp_path / "pictures").glob("timeline_mlp_N2_gpipe_V1_M4.png"))
    assert list((tmp_path / "pictures").glob("timeline_mlp_N2_zbv_V2_M4.png"))
    # the new schedules beside the peer's: run, or the peer's error recorded
    labels = {r["label"] for r in ours}
    assert {"interleaved_1f1b/V2", "zb_h1", "zb_h1/V2", "zb_h2", "zbv/V2", "dualpipev/V2"} <= labels
    assert all(r["error"] is None for r in ours if r["micro_batches"] == 4)
    peer_labels = {r["label"] for r in peers}
    assert {"interleaved_1f1b/V2", "zb_h1/V2", "zbv/V2", "dualpipev/V2"} <= peer_labels
    for r in peers:
        assert r["error"] is not None or r["step_s"] > 0, r
    assert "speedup over 1 process" in proc.stdout and "gnmt: tokens/s" in proc.stdout
