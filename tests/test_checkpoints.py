"""What a pipelined run leaves in `checkpoints/`, and checkpoints verified rather than trusted.

One 2-stage run: its directory holds `last.ckpt` (the final step) and the best `step{N}.ckpt` by
`val/loss`, each with its two shards, and nothing else (no `last-v1.ckpt`, no superseded
checkpoint or shard); the manifest records each shard's SHA-256. Then 64 bytes flipped in the
middle of stage 1's shard: giantpipe-export, a 2-stage resume and a one-device resume all fail
before training, naming the shard and the stage."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pytest
import torch

from conftest import PIPE2, TINY, run_cli, run_train

ARGS = TINY + ["trainer.max_steps=5", "trainer.val_check_interval=2", "logger=csv", "run_test=false"]
PIPE = PIPE2 + ["strategy.micro_batches=2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("ckpts")
    run_train(ARGS + PIPE + [f"hydra.run.dir={base / 'run'}"], base)
    return base / "run"


def val_losses(run_dir: Path) -> list[float]:
    rows = csv.DictReader((run_dir / "csv" / "metrics.csv").open())
    return [float(r["val/loss"]) for r in rows if r.get("val/loss")]


def test_a_run_keeps_one_last_checkpoint_and_the_best_one_each_with_its_shards(run_dir):
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 5  # the final step, though 5 is no multiple of the interval
    state = next(v for k, v in last["callbacks"].items() if k.startswith("RunCheckpoint"))
    validated = val_losses(run_dir)[:2]  # after steps 2 and 4 (a third: the final validation after fit)
    assert len(validated) == 2 and len(state["best_k_models"]) == 1
    assert float(state["best_model_score"]) == pytest.approx(min(validated), abs=1e-6)
    best = Path(state["best_model_path"]).name
    manifest = last["giantpipe_shards"]
    names = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert names == {"last.ckpt", *manifest["files"], best, f"{best}.stage0-of-2", f"{best}.stage1-of-2"}
    assert manifest["sha256"] == [hashlib.sha256((run_dir / "checkpoints" / f).read_bytes()).hexdigest()
                                  for f in manifest["files"]]


def flip_bytes(path: Path, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    path.write_bytes(bytes(data))


def test_a_corrupt_shard_fails_export_and_resume_before_training_naming_shard_and_stage(run_dir, tmp_path):
    last = run_dir / "checkpoints" / "last.ckpt"
    shard = torch.load(last, weights_only=False)["giantpipe_shards"]["files"][1]
    flip_bytes(last.parent / shard)
    named = [shard, "of stage 1 is corrupt"]

    export = run_cli("export", [str(last)], tmp_path, timeout=120, check=False)
    assert export.returncode == 2 and all(n in export.stderr for n in named), export.stderr
    assert not (run_dir / "checkpoints" / "last.consolidated.ckpt").exists()

    for strategy in (PIPE, ["strategy=single"]):
        again = tmp_path / strategy[0].split("=")[1]
        proc = run_train(ARGS + strategy + [f"ckpt_path={last}", f"hydra.run.dir={again}"], tmp_path, check=False)
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("giantpipe-train: error:")]
        assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
        assert all(n in errors[0] for n in named), errors[0]
        metrics = again / "csv" / "metrics.csv"
        assert not metrics.exists() or "train/loss" not in metrics.read_text()  # no step was trained
