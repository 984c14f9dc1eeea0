"""Shared fixtures: an offline environment, a shared data cache and a CLI runner for tiny runs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cli_server

REPO = Path(__file__).resolve().parents[1]

# Small enough to train in seconds on 2 CPU cores.
TINY = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64", "model.max_len=32",
    "data.seq_len=32", "data.batch_size=8", "data.max_bytes=300000",
    "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
    "lr_schedule.warmup_steps=2",
]


# Tiny GNMT: trains, validates and decodes in seconds.
TINY_GNMT = [
    "model=gnmt", "model.hidden_size=16", "model.num_encoder_layers=2", "model.num_decoder_layers=2",
    "model.dropout=0", "model.decode.beam_size=2", "model.decode.max_len=12", "model.decode.num_samples=3",
    "data.size=2000", "data.val_size=40", "data.test_size=40", "data.vocab_size=200", "data.batch_size=16",
    "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
    "lr_schedule.warmup_steps=2",
]

PIPE2 = ["strategy=pipeline", "strategy.stages=2", "trainer.devices=2"]


def shard_files(manifest) -> list[str]:
    """The stage shard files a pipelined checkpoint's manifest lists."""
    import torch

    from giantpipe.strategies.stage_checkpoint import MANIFEST

    return torch.load(manifest, weights_only=False)[MANIFEST]["files"]


def losses(run_dir) -> dict[int, float]:
    rows = csv.DictReader((run_dir / "csv" / "metrics.csv").open())
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


@pytest.fixture(scope="session", autouse=True)
def offline_env(tmp_path_factory):
    cache = os.environ.get("GIANTPIPE_CACHE") or str(tmp_path_factory.mktemp("cache"))
    os.environ.update(GIANTPIPE_CACHE=cache, WANDB_MODE="offline", WANDB_SILENT="true",
                      HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    yield


def run_cli(command: str, args: list[str], cwd: Path, timeout: int = 240, check: bool = True,
            input: str | None = None, fresh_interpreter: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m giantpipe.platform.<command> ARGS` in `cwd` (train, evaluate, export, plan):
    forked from this worker's CLI server (imports done once, tests/cli_server.py), or with
    `fresh_interpreter=True` in a fresh interpreter, as a user starts it."""
    module = f"giantpipe.platform.{command}"
    if fresh_interpreter:
        proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=cli_server.run_env(), input=input,
                              capture_output=True, text=True, timeout=timeout)
    else:
        proc = cli_server.run(module, args, cwd, timeout, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(f"{command} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def run_train(args: list[str], cwd: Path, timeout: int = 240, check: bool = True,
              fresh_interpreter: bool = False) -> subprocess.CompletedProcess:
    """`giantpipe-train ARGS` with its outputs under `cwd` (`run_cli`)."""
    return run_cli("train", args, cwd, timeout, check, fresh_interpreter=fresh_interpreter)


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())
