"""Run summaries: throughput measured by a callback, and `summary.json` in the run directory."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from giantpipe.strategies.memory_model import peak_memory_mb


class ThroughputMonitor(pl.Callback):
    """Training wall time and samples/tokens per second (validation time excluded), for the
    summary, and each step's rates logged as `train/samples_per_s` and `train/tokens_per_s`
    (sequence models): one data-parallel replica's batch over the step's time from batch start
    to batch end (forward, backward, optimizer; data loading excluded). Also `memory/peak_mb`,
    the training process's peak so far (`peak_memory_mb`; in a pipelined run, stage 0's)."""

    def __init__(self):
        self.peak_mb = 0.0
        self.train_time = 0.0
        self.last_val_step = -1
        self._t0 = None
        self._seen = (0, 0)  # samples and tokens counted before this batch

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.last_val_step = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()
        self._seen = (pl_module.samples_seen, pl_module.tokens_seen)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._t0 is None:
            return
        step_s = time.perf_counter() - self._t0
        self.train_time += step_s
        self._t0 = None
        samples, tokens = pl_module.samples_seen - self._seen[0], pl_module.tokens_seen - self._seen[1]
        rates = per_second(samples, tokens, step_s)
        self.peak_mb = max(self.peak_mb, peak_memory_mb(pl_module.device))
        metrics = {**{f"train/{k}": v for k, v in rates.items()}, "memory/peak_mb": self.peak_mb}
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def rates(self, pl_module) -> dict[str, float]:
        if self.train_time <= 0:
            return {}
        return per_second(pl_module.samples_seen, pl_module.tokens_seen, self.train_time)


def per_second(samples: int, tokens: int, seconds: float) -> dict[str, float]:
    """samples_per_s, and tokens_per_s where tokens are counted (token models)."""
    out = {"samples_per_s": samples / seconds}
    if tokens:
        out["tokens_per_s"] = tokens / seconds
    return out


def to_number(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    return float(value) if isinstance(value, (int, float)) else value


def write_summary(path: Path, choices: dict, metrics: dict, steps: int, wall_time_s: float, rates: dict) -> dict:
    summary = {
        "choices": choices,
        "metrics": {k: to_number(v) for k, v in sorted(metrics.items())},
        "steps": steps,
        "wall_time_s": wall_time_s,
        **rates,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(path)
    return summary
