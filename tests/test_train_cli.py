"""The real entry point on tiny configs: train/validate/test, summaries, multirun, loggers, resume."""

import csv
import json

from conftest import TINY, read_summary, run_cli, run_train
from offline_wandb import read_run


def per_step_losses(run_dir) -> dict[int, float]:
    rows = csv.DictReader((run_dir / "csv" / "metrics.csv").open())
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def test_bad_key_choice_and_value_fail_with_one_line_naming_the_fix(tmp_path):
    """How fast is scripts/bench_config_latency.py's (a benchmark, not a test): here, that the
    process says the fix in one line, exit code 2, and never got to Lightning."""
    for args, words in ((["model.nme=3"], ["model.nme", "n_layers"]), (["model=gnmtt"], ["model=gnmtt", "giant_net"]),
                        (["trainer.max_steps=-5"], ["trainer.max_steps=-5", "-1 for no limit"])):
        proc = run_train(args, tmp_path, check=False)
        assert proc.returncode == 2
        assert all(w in proc.stderr for w in words), proc.stderr
        assert "Traceback" not in proc.stderr and "lightning" not in proc.stderr.lower()
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    # the suite's served runs (tests/cli_server.py) behave as a fresh interpreter does
    fresh = run_train(["model.nme=3"], tmp_path, check=False, fresh_interpreter=True)
    served = run_train(["model.nme=3"], tmp_path, check=False)
    assert (served.returncode, served.stdout, served.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)


def test_tiny_run_trains_validates_tests_and_summarizes(tmp_path):
    run_dir = tmp_path / "run"
    run_train(TINY + [f"hydra.run.dir={run_dir}"], tmp_path, fresh_interpreter=True)  # the real entry point
    summary = read_summary(run_dir)
    assert summary["choices"]["model"] == "giant_net" and summary["choices"]["strategy"] == "single"
    assert summary["steps"] == 6
    for name in ("train/loss", "val/loss", "val/bpb", "test/loss", "test/bpb", "data/unigram_bpb"):
        assert name in summary["metrics"], name
    assert summary["samples_per_s"] > 0 and summary["tokens_per_s"] > 0
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert len(per_step_losses(run_dir)) == 6
    rows = [r for r in csv.DictReader((run_dir / "csv" / "metrics.csv").open()) if r.get("train/loss")]
    assert all(float(r["train/samples_per_s"]) > 0 and float(r["train/tokens_per_s"]) > 0 for r in rows)
    peaks = [float(r["memory/peak_mb"]) for r in rows]  # the process's VmHWM so far: torch included
    assert peaks == sorted(peaks) and 300 < peaks[-1] == summary["metrics"]["memory/peak_mb"] < 4000
    # giantpipe-eval on the final checkpoint reproduces the run's own test metrics
    out = tmp_path / "eval.json"
    run_cli("evaluate", [str(run_dir / "checkpoints" / "last.ckpt"), "--split", "test", "--out", str(out)],
            tmp_path, timeout=120)
    metrics = json.loads(out.read_text())
    assert abs(metrics["test/loss"] - summary["metrics"]["test/loss"]) < 1e-5


def test_multirun_writes_one_summary_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    run_train(["-m", "seed=1,2", f"hydra.sweep.dir={sweep}", *TINY, "trainer.max_steps=2", "callbacks=none"], tmp_path)
    first, second = read_summary(sweep / "0"), read_summary(sweep / "1")
    assert first["steps"] == second["steps"] == 2
    assert first["metrics"]["train/loss"] != second["metrics"]["train/loss"]


def test_resume_continues_with_the_same_next_losses(tmp_path):
    full = tmp_path / "full"
    keep_all = ["callbacks.model_checkpoint.save_top_k=-1"]
    run_train(TINY + keep_all + [f"hydra.run.dir={full}"], tmp_path)
    resumed = tmp_path / "resumed"
    run_train(TINY + [f"hydra.run.dir={resumed}", f"ckpt_path={full / 'checkpoints' / 'step3.ckpt'}"], tmp_path)
    expected, got = per_step_losses(full), per_step_losses(resumed)
    assert sorted(got) == [3, 4, 5]  # Lightning's step column counts from 0: steps 4..6
    for step in got:
        assert abs(got[step] - expected[step]) < 1e-6, (step, got[step], expected[step])


def test_local_text_files_train_and_every_logger_writes_one_run(tmp_path):
    corpus = tmp_path / "notes"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"{i}.txt").write_text(f"Note {i}: pipelines split models into stages.\n" * 80)
    run_dir = tmp_path / "run"
    run_train(TINY + ["data=text_files", f"data.paths=[{corpus}/*.txt]", "data.val_fraction=0.2",
                      "data.test_fraction=0.2", "trainer.max_steps=2", "logger=all", "callbacks=none",
                      f"hydra.run.dir={run_dir}"], tmp_path)
    assert read_summary(run_dir)["steps"] == 2
    assert (run_dir / "csv" / "metrics.csv").exists()
    # one wandb run and one TensorBoard writer (test_loggers.py: the same for pipelines)
    assert len({p.name.split(".")[-2] for p in (run_dir / "tensorboard").rglob("events.out.tfevents.*")}) == 1
    runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, list(run_dir.rglob("*"))[:20]
    config = read_run(runs[0]).config  # the resolved config
    assert config["data"]["seq_len"] == 32 and config["lr_schedule"]["name"] == "cosine"
    assert "${" not in json.dumps(config)


def test_missing_data_files_fail_with_one_line(tmp_path):
    proc = run_train(["data=text_files", "data.paths=[/nonexistent/*.txt]"], tmp_path, check=False)
    assert proc.returncode == 2
    assert "data.paths" in proc.stderr and "Traceback" not in proc.stderr
