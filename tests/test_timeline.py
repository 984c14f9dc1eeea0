"""The engine's timeline: what each stage ran when, the bubble, the picture, the trace, the metrics."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from conftest import TINY, run_train
from giantpipe.platform import timeline_plot
from giantpipe.platform.pipeline_metrics import step_metrics
from giantpipe.strategies import timeline as tl
from giantpipe.strategies.engine import PipelineEngine
from giantpipe.strategies.timeline import Event, StepTimeline
from pipeline_harness import ToyLoss, ToySeq2Seq, make_batches, spawn

M = 4
CONFIGS = [("gpipe", "except_last"), ("1f1b", "always")]


def record_steps(rank: int, world_size: int) -> list:
    """Train one step per configuration with the timeline on; rank 0 returns every rank's."""
    out = []
    for schedule, mode in CONFIGS:
        with torch.device("meta"):
            model = ToySeq2Seq()
        engine = PipelineEngine(
            model, ToyLoss(), [5, 5], micro_batches=M, schedule=schedule, checkpoint=mode,
            seed=1, timeline=True,
        )  # fmt: skip
        engine.train_step(make_batches(1, 8, seed=2)[0])
        out.append(tl.gather(engine.last_timeline))
    with torch.device("meta"):
        model = ToySeq2Seq()
    engine = PipelineEngine(
        model, ToyLoss(), [3, 2, 2, 3], micro_batches=M, schedule="zbv", checkpoint="never",
        seed=1, timeline=True, virtual_stages=2,
    )  # fmt: skip
    engine.train_step(make_batches(1, 8, seed=2)[0])
    return out, tl.gather(engine.last_timeline)


@pytest.fixture(scope="module")
def recorded_all():
    return spawn(record_steps, 2)[0]  # rank 0: every rank's timelines


@pytest.fixture(scope="module")
def recorded(recorded_all):
    return recorded_all[0]  # per configuration, both ranks' timelines


def kinds_by_micro_batch(timeline: StepTimeline, kind: str) -> list[int]:
    return sorted(e.micro_batch for e in timeline.events if e.kind == kind)


def test_every_stage_records_every_micro_batch(recorded):
    for (schedule, mode), timelines in zip(CONFIGS, recorded, strict=True):
        assert [t.stage for t in timelines] == [0, 1]
        recomputed = list(range(M - 1)) if mode == "except_last" else list(range(M))
        for t in timelines:
            where = f"{schedule}/{mode} stage {t.stage}"
            assert (t.schedule, t.micro_batches, t.phase) == (schedule, M, "train"), where
            assert kinds_by_micro_batch(t, "forward") == list(range(M)), where
            assert kinds_by_micro_batch(t, "backward") == list(range(M)), where
            assert kinds_by_micro_batch(t, "recompute") == recomputed, where
            # stage 0 sends carries and receives gradients, stage 1 the other way round
            assert kinds_by_micro_batch(t, "send") == list(range(M)), where
            assert kinds_by_micro_batch(t, "recv") == list(range(M)), where
            assert all(0 <= e.start <= e.end for e in t.events), where
            assert t.compute_s > 0 and t.comm_s > 0, where
            if t.memory_kind is not None:
                assert t.peak_bytes >= t.base_bytes > 0, where


def test_events_follow_the_schedule(recorded):
    gpipe = recorded[0][0]  # stage 0: all forwards, then the backwards in reverse
    order = [(e.kind, e.micro_batch) for e in gpipe.events if e.kind in ("forward", "backward")]
    assert order == [("forward", i) for i in range(M)] + [
        ("backward", i) for i in reversed(range(M))
    ]
    for t in recorded[0]:  # a recompute runs inside its micro-batch's backward
        for r in (e for e in t.events if e.kind == "recompute"):
            (b,) = [e for e in t.events if e.kind == "backward" and e.micro_batch == r.micro_batch]
            assert b.start <= r.start <= r.end <= b.end


def test_v_shaped_chunks_record_f_b_w_of_every_micro_batch_and_chunk(recorded_all, tmp_path):
    timelines = recorded_all[1]
    for t in timelines:
        assert (t.schedule, t.virtual_stages) == ("zbv", 2)
        for kind in ("forward", "backward", "weight"):  # zbv splits every backward into B and W
            done = sorted((e.micro_batch, e.chunk) for e in t.events if e.kind == kind)
            assert done == [(i, c) for i in range(M) for c in (0, 1)], (t.stage, kind)
    assert timelines[0].bubble_theory == pytest.approx(0.04)  # schedule.bubble of zbv 2 x 4
    fig = timeline_plot.figure(timelines)
    labels = {t.get_text() for t in fig.axes[0].texts}
    assert "zbv (V=2)" in fig.axes[0].get_title() and labels <= {
        f"{k}{i}{p}" for k in "FBW" for i in range(M) for p in ("", "'")
    }


def test_picture_and_trace_are_written(recorded, tmp_path):
    timelines = recorded[0]
    picture = timeline_plot.plot(timelines, tmp_path / "timeline.png")
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trace = json.loads(timeline_plot.write_trace(timelines, tmp_path / "trace.json").read_text())
    boxes = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(boxes) == sum(len(t.events) for t in timelines)
    assert {e["tid"] for e in boxes} == {0, 1}
    assert {"F0", "B3", "R0"} <= {e["name"] for e in boxes}
    assert trace["otherData"]["bubble_theoretical"] == pytest.approx(1 / 5)
    assert 0.0 <= trace["otherData"]["bubble_measured"] < 1.0


def test_timeline_is_off_by_default():
    with torch.device("meta"):
        model = ToySeq2Seq()
    engine = PipelineEngine(model, ToyLoss(), [10], micro_batches=2, seed=1)
    assert not engine.timeline
    engine.train_step(make_batches(1, 4, seed=2)[0])
    assert engine.last_timeline is None
    engine.timeline = True
    engine.eval_step(make_batches(1, 4, seed=2)[0])
    assert engine.last_timeline.phase == "eval"
    assert kinds_by_micro_batch(engine.last_timeline, "forward") == [0, 1]


# -- the bubble on a synthetic timeline -----------------------------------------------------------


def synthetic_gpipe(shift: float = 0.0) -> list[StepTimeline]:
    """2 stages x 3 micro-batches, forward 1 s, backward 2 s, sends instantaneous:

        stage 0  F0 F1 F2 .  .  .  B2 B2 B1 B1 B0 B0
        stage 1  .  F0 F1 F2 B2 B2 B1 B1 B0 B0 .  .

    Span 12 s, each stage busy 9 s: bubble 2 * 3 / (2 * 12) = 0.25 = (N-1)/(M+N-1).
    Stage 1's clock starts `shift` seconds later (its events are earlier by as much)."""
    f = [("forward", i, i, i + 1.0) for i in range(3)]
    stage0 = f + [("backward", i, 6.0 + 2 * (2 - i), 8.0 + 2 * (2 - i)) for i in (2, 1, 0)]
    stage1 = [("forward", i, i + 1.0, i + 2.0) for i in range(3)]
    stage1 += [("backward", i, 4.0 + 2 * (2 - i), 6.0 + 2 * (2 - i)) for i in (2, 1, 0)]
    stage1 += [("recv", 0, 0.0, 1.0)]  # waiting is not compute
    out = []
    for stage, rows in enumerate((stage0, stage1)):
        origin = 1000.0 + (shift if stage else 0.0)
        offset = shift if stage else 0.0
        events = [Event(k, i, s - offset, e - offset) for k, i, s, e in rows]
        out.append(StepTimeline(stage, stage, 0, 2, 3, "gpipe", "train", origin, events))
    return out


@pytest.mark.parametrize("shift", [0.0, 0.37])
def test_measured_bubble_of_a_synthetic_gpipe_step(shift):
    timelines = synthetic_gpipe(shift)
    assert tl.bubble_fraction(timelines) == pytest.approx(0.25)
    assert tl.bubble_fraction(timelines, busiest=True) == pytest.approx(0.25)  # equal stages
    assert tl.theoretical_bubble(2, 3) == pytest.approx(0.25)
    assert [t.compute_s for t in timelines] == [9.0, 9.0]
    assert timelines[1].comm_s == 1.0


def test_measured_bubble_of_an_uneven_step():
    # stage 0 computes 2 s of [0, 10], stage 1 5 s of [3, 8]: 1 - 7 / (2 * 10)
    a = StepTimeline(
        0,
        0,
        0,
        2,
        1,
        "gpipe",
        "train",
        0.0,
        [Event("forward", 0, 0, 1), Event("backward", 0, 9, 10)],
    )
    b = StepTimeline(
        1,
        1,
        0,
        2,
        1,
        "gpipe",
        "train",
        0.0,
        [Event("forward", 0, 3, 5), Event("backward", 0, 5, 8)],
    )
    assert tl.bubble_fraction([a, b]) == pytest.approx(0.65)
    assert tl.bubble_from_spans([2.0, 5.0], [(0.0, 10.0), (3.0, 8.0)]) == pytest.approx(0.65)
    # the busiest stage (1: 5 s) idles 5 s of the 10 s span; stage 0's lighter load is left out
    assert tl.bubble_fraction([a, b], busiest=True) == pytest.approx(0.5)
    assert tl.bubble_from_spans([2.0, 5.0], [(0.0, 10.0), (3.0, 8.0)], busiest=True) == pytest.approx(0.5)


def test_logged_metrics_from_every_ranks_stats():
    stats = [
        {"stage": 0, "replica": 0, "compute_s": 9.0, "comm_s": 0.5, "span_start": 100.0,
         "span_end": 112.0, "peak": 3 * 2**20, "added": 2**20, "num_stages": 2, "micro_batches": 3},
        {"stage": 1, "replica": 0, "compute_s": 9.0, "comm_s": 1.5, "span_start": 101.0,
         "span_end": 110.0, "peak": 5 * 2**20, "added": 2 * 2**20, "num_stages": 2, "micro_batches": 3},
    ]  # fmt: skip
    metrics = step_metrics(stats)
    assert metrics["pipeline/bubble"] == pytest.approx(0.25)
    assert metrics["pipeline/bubble_busiest"] == pytest.approx(0.25)  # equal stages: the same
    assert metrics["pipeline/bubble_theory"] == pytest.approx(0.25)
    assert metrics["pipeline/step_s"] == pytest.approx(12.0)
    assert metrics["pipeline/stage1/comm_s"] == 1.5
    assert metrics["pipeline/stage0/peak_mem_mb"] == 3.0
    assert metrics["pipeline/stage1/step_mem_mb"] == 2.0


def test_picture_of_a_synthetic_step_has_a_row_per_stage_and_a_box_per_action(tmp_path):
    import matplotlib.pyplot as plt

    timelines = synthetic_gpipe()
    fig = timeline_plot.figure(timelines)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["stage 0", "stage 1"]
    bands = [c for c in ax.collections if len(c.get_paths()) == 1]
    heights = sorted({round(c.get_paths()[0].get_extents().height, 2) for c in bands})
    compute = [c for c in bands if c.get_paths()[0].get_extents().height == pytest.approx(0.76)]
    assert len(compute) == 12 and heights == [0.1, 0.76]  # 2 stages x (3 F + 3 B); 1 recv band
    rows = sorted(round(c.get_paths()[0].get_extents().y0 + 0.38) for c in compute)
    assert rows == [0] * 6 + [1] * 6
    labels = sorted(t.get_text() for t in ax.texts)
    assert labels == sorted(["F0", "F1", "F2", "B0", "B1", "B2"] * 2)
    assert "bubble 25.0% measured, 25.0% theoretical" in ax.get_title()
    plt.close(fig)
    assert timeline_plot.plot(timelines, tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


# -- the Lightning callback ---------------------------------------------------------------------


def test_pipeline_metrics_callback_logs_and_draws_once_when_registered_twice(tmp_path):
    """strategy.timeline=true registers the callback (build.py); a config adds a second one,
    which must stay silent: one set of metrics per step, one picture."""
    run_dir = tmp_path / "run"
    callback = (
        "+callbacks.pipeline_metrics._target_=giantpipe.platform.pipeline_metrics.PipelineMetrics"
    )
    run_train(TINY + ["strategy=pipeline", "strategy.stages=2", "trainer.devices=2", "strategy.timeline=true",
                      "trainer.max_steps=3", callback, f"hydra.run.dir={run_dir}"], tmp_path)  # fmt: skip
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    logged = [r for r in rows if r.get("pipeline/bubble")]
    assert len(logged) == 3
    for name in ("pipeline/bubble_theory", "pipeline/stage0/compute_s", "pipeline/stage1/comm_s",
                 "pipeline/stage1/peak_mem_mb", "pipeline/step_s", "train/samples_per_s"):  # fmt: skip
        assert logged[-1][name], name
    assert all(float(r["train/samples_per_s"]) > 0 for r in logged)  # every step, every logger
    assert float(logged[-1]["pipeline/bubble_theory"]) == pytest.approx(1 / 5)  # M=4 by default
    assert 0.0 <= float(logged[-1]["pipeline/bubble"]) < 1.0
    assert 0.0 <= float(logged[-1]["pipeline/bubble_busiest"]) <= float(logged[-1]["pipeline/bubble"])
    assert (run_dir / "pipeline" / "timeline.png").exists()
    trace = json.loads((run_dir / "pipeline" / "timeline.trace.json").read_text())
    assert {e["tid"] for e in trace["traceEvents"] if e["ph"] == "X"} == {0, 1}
