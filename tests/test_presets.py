"""Every preset is run, not only composed (as lightning-hydra-template's sweep tests do): each
`experiment=*` and `hparams_search=*` trains a few steps on a shrunk config through the real
entry point, on one device and pipelined where the preset allows. Sizes shrink; the preset's
structure (model family, losses, strategy, optimizer, schedule, sweep) stays."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import yaml

from conftest import read_summary, run_train
from giantpipe.platform.preflight import conf_dir
from offline_wandb import read_run

COMMON = ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
          "trainer.limit_test_batches=1", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
          "lr_schedule.warmup_steps=1"]
SHRINK = {
    "language_model": ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64",
                       "model.max_len=32", "data.seq_len=32", "data.batch_size=8", "data.max_bytes=300000"],
    "translation": ["data=translation_default", "model.hidden_size=16", "model.num_encoder_layers=2",
                    "model.num_decoder_layers=2", "model.decode.beam_size=2", "model.decode.max_len=12",
                    "model.decode.num_samples=2", "data.size=2000", "data.val_size=40", "data.test_size=40",
                    "data.vocab_size=200", "data.batch_size=16", "data.max_tokens=64"],
    "speech": ["model.listener_hidden=16", "model.listener_layers=2", "model.pyramid_levels=1",
               "model.speller_hidden=24", "model.speller_layers=2", "model.embedding_size=16",
               "model.decode.beam_size=2", "model.decode.max_len=16", "model.decode.num_samples=2",
               "data.n_mels=20", "data.train_size=48", "data.val_size=12", "data.test_size=12",
               "data.batch_size=8"],
}
SINGLE = ["strategy=single", "trainer.devices=1"]
PIPE2 = ["strategy=pipeline", "strategy.stages=2", "strategy.replicas=1", "trainer.devices=2",
         "strategy.micro_batches=2"]
# preset -> (model family, the layouts it runs in). Every family trains pipelined here once:
# giant_net_deep and gnmt_v2_large are pipeline presets and las runs both ways; the giant net
# pipelined also in pipeline_throughput's sweep, GNMT in gnmt_mwer's fine-tuning below.
EXPERIMENTS = {
    "giant_net_cpu": ("language_model", [SINGLE]),
    "giant_net_deep": ("language_model", [PIPE2]),  # sets strategy.stages: pipelined only
    "gnmt": ("translation", [SINGLE]),
    "gnmt_v2_large": ("translation", [PIPE2]),  # WMT16 needs a download: the embedded corpus stands in
    "las": ("speech", [SINGLE, PIPE2]),
}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def test_every_preset_is_covered_here():
    covered = set(EXPERIMENTS) | {"las_mwer", "gnmt_mwer", "pipeline_throughput"}
    assert set(options("experiment")) == covered
    assert options("hparams_search") == ["giant_net_optuna"]


def check_trained(run_dir: Path) -> dict:
    summary = read_summary(run_dir)
    assert summary["steps"] == 2
    loss = summary["metrics"]["train/loss"]
    assert math.isfinite(loss) and loss > 0
    return summary


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`trained(name, layout)`: the run directory of a preset trained shrunk, once for every test
    that reads it (a risk preset fine-tunes the checkpoint of its start's one-device run)."""
    runs: dict[tuple[str, int], Path] = {}

    def train(name: str, layout: int) -> Path:
        if (name, layout) not in runs:
            family, layouts = EXPERIMENTS[name]
            base = tmp_path_factory.mktemp(f"{name}-{layout}")
            logger = "logger=csv" if family == "language_model" else "logger=wandb"
            run_train([f"experiment={name}", *SHRINK[family], *COMMON, logger, *layouts[layout],
                       f"hydra.run.dir={base / 'run'}"], base, timeout=400)
            runs[name, layout] = base / "run"
        return runs[name, layout]

    return train


@pytest.mark.parametrize("name, layout", [(n, i) for n, (_, ls) in EXPERIMENTS.items() for i in range(len(ls))])
def test_experiment_trains_shrunk(trained, name, layout):
    run_dir = trained(name, layout)
    summary = check_trained(run_dir)
    assert summary["choices"]["experiment"] == name
    assert "test/loss" in summary["metrics"] and "val/loss" in summary["metrics"]
    if EXPERIMENTS[name][0] != "language_model":  # one wandb run, holding the sample tables, whatever the layout
        (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
        metrics = read_run(run_file).metrics
        assert {"val/samples/_type", "test/samples/_type"} <= metrics, sorted(metrics)


@pytest.mark.parametrize("start, name, family, metric", [
    ("las", "las_mwer", "speech", "test/wer"), ("gnmt", "gnmt_mwer", "translation", "test/bleu"),
])
def test_risk_training_preset_fine_tunes_its_start_pipelined(tmp_path, trained, start, name, family, metric):
    """On 2 stages; that the pipelined risk training equals one device's is
    test_speech_task.py's (MWER) and test_translation_task.py's (sampled GLEU)."""
    run_dir = tmp_path / "pipe"
    run_train([f"experiment={name}", *SHRINK[family], *COMMON, "logger=csv", "loss.nbest=2",
               f"init_from={trained(start, 0) / 'checkpoints' / 'last.ckpt'}", *PIPE2,
               f"hydra.run.dir={run_dir}"], tmp_path, timeout=400)
    summary = check_trained(run_dir)
    assert metric in summary["metrics"]


def test_pipeline_throughput_sweeps_stage_counts(tmp_path):
    sweep = tmp_path / "sweep"
    run_train(["experiment=pipeline_throughput", *SHRINK["language_model"], *COMMON, "logger=csv", "callbacks=none",
               "strategy.micro_batches=2", f"hydra.sweep.dir={sweep}"], tmp_path, timeout=400)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    swept = [[o for o in yaml.safe_load((j / ".hydra" / "overrides.yaml").read_text()) if "stages=" in o] for j in jobs]
    assert swept == [["strategy.stages=1"], ["strategy.stages=2"]]  # at the one micro-batch count given
    for job in jobs:
        check_trained(job)


def test_optuna_search_runs_two_trials_and_reports_the_best(tmp_path):
    """The Optuna sweeper end to end, with a persistent (sqlite) study: two trials, each a
    training job, and the best value and parameters written to optimization_results.yaml."""
    sweep = tmp_path / "opt"
    searched = ("model.d_model=", "lr_schedule.warmup_steps=")  # left to the search, not shrunk
    shrunk = [o for o in SHRINK["language_model"] + COMMON if not o.startswith(searched)]
    run_train(["hparams_search=giant_net_optuna", "hydra.sweeper.n_trials=2", *shrunk, "logger=csv", "callbacks=none",
               f"hydra.sweeper.storage=sqlite:///{tmp_path / 'study.db'}", f"hydra.sweep.dir={sweep}"],
              tmp_path, timeout=400)
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    val_losses = [read_summary(sweep / str(j))["metrics"]["val/loss"] for j in (0, 1)]
    assert results["best_value"] == pytest.approx(min(val_losses))
    assert set(results["best_params"]) == {"optim.lr", "model.d_model", "lr_schedule.warmup_steps"}
    assert (tmp_path / "study.db").stat().st_size > 0


def test_validation_counts_training_steps_across_epochs_shorter_than_the_interval(tmp_path):
    """A preset's val_check_interval is steps of training: on a corpus whose epoch is shorter
    (here 2 batches against an interval of 4), Lightning would refuse to start with
    check_val_every_n_epoch=1 ("val_check_interval (4) must be less than or equal to the number
    of the training batches (2)"); the presets validate at steps 4 and 8 instead."""
    corpus = tmp_path / "notes"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"{i}.txt").write_text(f"Note {i}: a pipeline splits a model into stages.\n" * 2)
    run_dir = tmp_path / "run"
    run_train(["experiment=giant_net_cpu", *SHRINK["language_model"], *COMMON, "logger=csv", "callbacks=none",
               "data=text_files", f"data.paths=[{corpus}/*.txt]", "data.val_fraction=0.2", "data.test_fraction=0.2",
               "data.batch_size=4", "trainer.max_steps=8", "trainer.val_check_interval=4",
               f"hydra.run.dir={run_dir}"], tmp_path)
    summary = read_summary(run_dir)
    assert summary["steps"] == 8
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    epochs = {int(r["epoch"]) for r in rows if r.get("epoch")}
    validated = sorted(int(r["step"]) for r in rows if r.get("val/loss"))
    assert max(epochs) >= 2, epochs  # the epoch is shorter than the interval
    assert validated == [3, 7], validated  # Lightning's step column counts from 0
