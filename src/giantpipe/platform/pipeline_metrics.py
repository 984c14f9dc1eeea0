"""Pipeline metrics for every logger, and the schedule picture of the run.

Under the pipeline strategy, `PipelineMetrics` turns on the engine's timeline recorder
(strategies/timeline.py) and, every `every_n_steps` training steps, logs through Lightning
(so every configured logger gets them, at `trainer.log_every_n_steps`):

    pipeline/bubble                 measured: idle / total stage-time in the step
    pipeline/bubble_busiest         the busiest stage's idle share: the bubble without imbalance
    pipeline/bubble_theory          the schedule's: (N-1)/(M+N-1) for gpipe and 1f1b
    pipeline/step_s                 the step's span, first to last compute over all stages
    pipeline/stage{s}/compute_s     forward + backward + weight (recompute included) of stage s
    pipeline/stage{s}/comm_s        sends, receives (waiting included) and all-reduces
    pipeline/stage{s}/peak_mem_mb   peak memory in the step: CUDA allocator, or on CPU the
                                    glibc heap bytes in use (see timeline.py's MemoryProbe)
    pipeline/stage{s}/step_mem_mb   what the step added on top of what it started with

Replicas of a stage are averaged (times) or maxed (memory). Each logged step costs one
small all-gather. At the end of training, with `save_timeline`, rank 0 writes the last
training step's picture and Chrome/Perfetto trace to `<run dir>/pipeline/timeline.png` and
`timeline.trace.json`, and logs the picture to wandb when wandb is a logger. Under any
other strategy the callback does nothing; registered twice, the second instance does nothing.

build.py adds it when `strategy=pipeline strategy.timeline=true`; off, the engine records
nothing and costs nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from giantpipe.platform import timeline_plot
from giantpipe.strategies import timeline as tl

log = logging.getLogger(__name__)

_FIELDS = ("stage", "replica", "compute_s", "comm_s", "span_start", "span_end", "peak", "added")


def pipeline_engine(trainer: pl.Trainer):
    """The strategy's PipelineEngine on this rank, or None outside the pipeline strategy."""
    runner = getattr(trainer.strategy, "runner", None)
    return getattr(runner, "engine", None)


class PipelineMetrics(pl.Callback):
    def __init__(
        self, every_n_steps: int = 1, save_timeline: bool = True, dirname: str = "pipeline"
    ):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.save_timeline = save_timeline
        self.dirname = dirname
        self.last_train_timeline: tl.StepTimeline | None = None
        self.active = True

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Registered twice (build.py and a config), only the first instance works."""
        first = next(c for c in trainer.callbacks if isinstance(c, PipelineMetrics))
        self.active = first is self

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        engine = pipeline_engine(trainer) if self.active else None
        if engine is not None and not engine.timeline:
            engine.timeline = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        engine = pipeline_engine(trainer) if self.active else None
        timeline = getattr(engine, "last_timeline", None)
        if timeline is None or timeline.phase != "train":
            return
        self.last_train_timeline = timeline
        if trainer.global_step % self.every_n_steps:  # the same on every rank
            return
        metrics = step_metrics(gather_stats(timeline, engine.device))
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def on_train_end(self, trainer, pl_module) -> None:
        if not (self.active and self.save_timeline) or pipeline_engine(trainer) is None:
            return
        if self.last_train_timeline is None:
            return
        timelines = tl.gather(self.last_train_timeline)
        if timelines is None:  # not rank 0
            return
        out = Path(trainer.default_root_dir) / self.dirname
        picture = timeline_plot.plot(timelines, out / "timeline.png")
        timeline_plot.write_trace(timelines, out / "timeline.trace.json")
        log.info("pipeline timeline: %s (and timeline.trace.json for ui.perfetto.dev)", picture)
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_image(key="pipeline/timeline", images=[str(picture)])


def local_stats(timeline: tl.StepTimeline) -> list[float]:
    """This rank's numbers for the step, in `_FIELDS` order (-1: not measured)."""
    span = timeline.compute_span() or (timeline.wall_origin, timeline.wall_origin)
    peak, added = timeline.peak_bytes, timeline.peak_step_bytes
    return [
        timeline.stage, timeline.replica, timeline.compute_s, timeline.comm_s, *span,
        -1.0 if peak is None else float(peak), -1.0 if added is None else float(added),
    ]  # fmt: skip


def gather_stats(timeline: tl.StepTimeline, device: torch.device) -> list[dict]:
    """Every rank's `local_stats`, as dicts, on every rank (one all-gather)."""
    mine = torch.tensor(local_stats(timeline), dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            mine = mine.to(device)
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, mine)
    else:
        parts = [mine]
    stats = [dict(zip(_FIELDS, p.tolist(), strict=True)) for p in parts]
    for s in stats:
        s["num_stages"], s["micro_batches"] = timeline.num_stages, timeline.micro_batches
        s["schedule"], s["virtual_stages"] = timeline.schedule, timeline.virtual_stages
    return stats


def step_metrics(stats: list[dict]) -> dict[str, float]:
    """The logged metrics from every rank's stats (see the module docstring)."""
    spans = [(s["span_start"], s["span_end"]) for s in stats]
    first = stats[0]
    busy = [s["compute_s"] for s in stats]
    metrics = {
        "pipeline/bubble": tl.bubble_from_spans(busy, spans),
        "pipeline/bubble_busiest": tl.bubble_from_spans(busy, spans, busiest=True),
        "pipeline/bubble_theory": tl.theoretical_bubble(
            first["num_stages"], first["micro_batches"], first.get("schedule", "gpipe"),
            first.get("virtual_stages", 1),
        ),
        "pipeline/step_s": max(e for _, e in spans) - min(s for s, _ in spans),
    }
    for stage in sorted({int(s["stage"]) for s in stats}):
        rows = [s for s in stats if int(s["stage"]) == stage]
        prefix = f"pipeline/stage{stage}"
        metrics[f"{prefix}/compute_s"] = sum(r["compute_s"] for r in rows) / len(rows)
        metrics[f"{prefix}/comm_s"] = sum(r["comm_s"] for r in rows) / len(rows)
        if all(r["peak"] >= 0 for r in rows):
            metrics[f"{prefix}/peak_mem_mb"] = max(r["peak"] for r in rows) / 2**20
            metrics[f"{prefix}/step_mem_mb"] = max(r["added"] for r in rows) / 2**20
    return metrics
