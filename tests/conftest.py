"""Shared fixtures: an offline environment, a shared data cache and a CLI runner for tiny runs."""

from __future__ import annotations

import csv
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, "-m", "giantpipe.platform.train"]

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


class TrainServer:
    """The client of this pytest worker's `train_server.py` (started at the first run)."""

    def __init__(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "train_server.py")], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert "ready" in self.answer(timeout=300), "the train server did not start"

    def answer(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise subprocess.TimeoutExpired("train_server", timeout)
        return json.loads(line)

    def run(self, args: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            request = {"args": args, "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err)}
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            pid = self.answer(timeout=60)["pid"]
            try:
                returncode = self.answer(timeout)["returncode"]
            except subprocess.TimeoutExpired:
                os.kill(pid, signal.SIGKILL)  # its workers die with it (platform/launch.py)
                self.answer(timeout=60)
                raise
            return subprocess.CompletedProcess(TRAIN + args, returncode, out.read_text(), err.read_text())


_server: TrainServer | None = None


def run_train(args: list[str], cwd: Path, timeout: int = 240, check: bool = True,
              fresh_interpreter: bool = False) -> subprocess.CompletedProcess:
    """Run `giantpipe-train` in a subprocess with its outputs under `cwd`: forked from this
    worker's train server (imports done once, tests/train_server.py), or with
    `fresh_interpreter=True` the real `python -m giantpipe.platform.train` from scratch."""
    global _server
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if fresh_interpreter:
        proc = subprocess.run(TRAIN + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    else:
        if _server is None or _server.proc.poll() is not None:
            _server = TrainServer()
        proc = _server.run(args, cwd, env, timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"giantpipe-train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())
