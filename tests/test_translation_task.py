"""Translation end to end: configs, local files, training with BLEU (one device and a 2-stage
pipeline), giantpipe-eval on a split and on stdin."""

from __future__ import annotations

import csv
import json
import re

import pytest
from omegaconf import OmegaConf

from conftest import TINY_GNMT, read_summary, run_cli, run_train
from giantpipe.platform.config import ConfigError
from giantpipe.platform.data.buckets import EvalBucketSampler
from giantpipe.platform.data.translation_module import TranslationDataModule
from giantpipe.platform.data.verbalization_corpus import generate_pairs
from giantpipe.platform.preflight import check, compose_train

# A GNMT and corpus small enough to train, validate and decode in seconds.


def test_gnmt_configs_compose_and_pick_translation_data():
    cfg = compose_train(["model=gnmt"])
    assert cfg.data.family == cfg.model.family == "translation" and cfg.data.source == "default"
    assert cfg.model.decode.beam_size == 5 and cfg.model.decode.alpha == 0.6
    check(["model=gnmt", "loss=mwer", f"init_from={__file__}"])  # a valid combination
    for name, source in (("wmt16_de_en", "hf"), ("multi30k", "hf"), ("translation_files", "files")):
        assert compose_train(["model=gnmt", f"data={name}"]).data.source == source  # no download
    for experiment in ("gnmt", "gnmt_v2_large"):
        check([f"experiment={experiment}"])
    with pytest.raises(ConfigError, match="data="):
        check(["model=gnmt", "data=stdlib_text"])
    with pytest.raises(ConfigError, match="model.decode.beem_size"):
        check(["model=gnmt", "model.decode.beem_size=3"])


def write_corpus(tmp_path, n: int = 300):
    """A jsonl file in the Hugging Face translation schema, with three bad lines."""
    lines = [json.dumps({"translation": {"en": en, "de": de}}, ensure_ascii=False)
             for en, de in generate_pairs(n, seed=4)]
    lines[5] = json.dumps({"translation": {"en": "", "de": "leer"}})  # empty
    lines[9] = "{not json"  # malformed
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe broken\n")  # undecodable
    return path


def data_config(tmp_path, **overrides):
    cfg = compose_train(["model=gnmt", "data=translation_files"]).data
    cfg.merge_with(dict(cache_dir=str(tmp_path / "cache"), vocab_size=200, batch_size=8, **overrides))
    return cfg


def test_data_module_reads_local_files_counts_skips_and_caches(tmp_path, caplog):
    path = write_corpus(tmp_path)
    tsv = tmp_path / "dev.tsv"
    tsv.write_text("".join(f"{en}\t{de}\n" for en, de in generate_pairs(30, seed=5)) + "one column\n")
    en, de = tmp_path / "test.en", tmp_path / "test.de"
    pairs = generate_pairs(20, seed=6)
    en.write_text("".join(p[0] + "\n" for p in pairs))
    de.write_text("".join(p[1] + "\n" for p in pairs))
    cfg = data_config(tmp_path, train_paths=[str(path)], validation_paths=[str(tsv)],
                      test_paths=[str(en), str(de)])
    with caplog.at_level("INFO"):
        data = TranslationDataModule(cfg, batch_size=8, seed=0).prepare()
    assert {s: len(d) for s, d in data.datasets.items()} == {"train": 298, "validation": 30, "test": 20}
    assert data.skipped["train"] == {"empty": 1, "undecodable": 1, "malformed": 1}
    assert data.skipped["validation"]["malformed"] == 1
    assert "skipped 3 (empty 1, undecodable 1, malformed 1)" in caplog.text
    again = TranslationDataModule(cfg, batch_size=8, seed=0)
    assert list(again.references("val")) == list(data.datasets["validation"].references)
    assert again.prepare().folder == data.folder  # opened from the prepared cache, not rebuilt

    one_file = data_config(tmp_path, paths=[str(path)], val_size=10, test_size=10)
    sizes = {s: len(d) for s, d in TranslationDataModule(one_file, 8, 0).prepare().datasets.items()}
    assert sizes["validation"] >= 10 and sizes["test"] >= 10 and sum(sizes.values()) == 298
    with pytest.raises(ConfigError, match="not found"):
        TranslationDataModule(data_config(tmp_path, paths=["missing.jsonl"]), 8, 0).prepare()


def test_evaluation_batches_are_never_smaller_than_the_micro_batches():
    lengths = list(range(37))
    batches = list(EvalBucketSampler(lengths, 16, min_batch=8))
    assert [len(b) for b in batches] == [16, 21]
    assert sorted(i for b in batches for i in b) == lengths
    assert [len(b) for b in EvalBucketSampler(lengths, 16, min_batch=4)] == [16, 16, 5]


def test_local_files_train_and_translate_from_stdin(tmp_path):
    path = write_corpus(tmp_path)
    run_dir = tmp_path / "run"
    proc = run_train(TINY_GNMT + ["data=translation_files", f"data.paths=[{path}]", "data.val_size=20",
                                  "data.test_size=20", f"hydra.run.dir={run_dir}"], tmp_path)
    assert "skipped 3" in proc.stdout + proc.stderr
    summary = read_summary(run_dir)
    assert summary["choices"]["data"] == "translation_files" and summary["steps"] == 4
    assert {"train/loss", "val/loss", "val/bleu", "test/bleu"} <= set(summary["metrics"])
    assert "tok:13a" in summary["metrics"]["bleu_signature"] and summary["tokens_per_s"] > 0
    samples = (run_dir / "samples" / "test_step000004.md").read_text()
    assert samples.count("\n|") == 5  # header, rule, three samples

    pairs = generate_pairs(5, seed=8)
    refs = tmp_path / "refs.de"
    refs.write_text("".join(de + "\n" for _, de in pairs))
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    proc = run_cli("evaluate", [str(ckpt), "--input", "-", "--refs", str(refs), "model.decode.beam_size=1"],
                   tmp_path, timeout=120, input="".join(en + "\n" for en, _ in pairs))
    assert len(proc.stdout.splitlines()) == 5
    assert "BLEU" in proc.stderr


@pytest.fixture(scope="module")
def single_ce(tmp_path_factory):
    """A tiny GNMT cross-entropy run on one device (also the start of risk training)."""
    base = tmp_path_factory.mktemp("gnmt_single")
    run_train(TINY_GNMT + ["logger=none", f"hydra.run.dir={base / 'run'}"], base)
    return base / "run"


def test_two_stage_pipeline_reports_bleu_like_one_device(tmp_path, single_ce):
    pipe = ["strategy=pipeline", "strategy.stages=2", "trainer.devices=2", "strategy.micro_batches=4"]
    run_train(TINY_GNMT + pipe + ["logger=none", f"hydra.run.dir={tmp_path / 'pipe'}"], tmp_path)
    runs = {"single": read_summary(single_ce)["metrics"],
            "pipe": read_summary(tmp_path / "pipe")["metrics"]}
    for key in ("val/bleu", "test/bleu", "test/loss", "val/loss"):
        assert runs["pipe"][key] == pytest.approx(runs["single"][key], rel=1e-4, abs=1e-4), key
    out = tmp_path / "eval.json"
    run_cli("evaluate", [str(tmp_path / "pipe" / "checkpoints" / "last.ckpt"), "--split", "test", "--out", str(out)],
            tmp_path, timeout=120)
    assert json.loads(out.read_text())["test/bleu"] == pytest.approx(runs["pipe"]["test/bleu"], abs=1e-4)


def test_decode_settings_reach_the_task():
    cfg = compose_train(["model=gnmt", "model.decode.beam_size=3", "model.decode.beta=0.0"])
    assert OmegaConf.to_container(cfg.model.decode)["beam_size"] == 3


def train_losses(run_dir) -> dict[int, float]:
    rows = csv.DictReader((run_dir / "csv" / "metrics.csv").open())
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def test_risk_training_configs_compose_and_bad_choices_fail_early():
    cfg = compose_train(["experiment=gnmt_mwer"])
    assert (cfg.loss.name, cfg.loss.risk, cfg.loss.candidates, cfg.loss.ce_weight) == (
        "mwer", "gleu", "beam", 0.017)
    start = f"init_from={__file__}"
    check(["experiment=gnmt_mwer", start])
    for risk in ("word_errors", "char_errors", "gleu", "sentence_bleu", "chrf"):
        check(["model=gnmt", "loss=mwer", f"loss.risk={risk}", "loss.candidates=sample", start])
    for bad, says in (("loss.risk=bleu", "loss.risk='bleu': choose one of word_errors"),
                      ("loss.candidates=nbest", "loss.candidates='nbest': choose beam"),
                      ("loss.sample_temperature=0", "must be positive"),
                      ("loss.nbest=0", "must be positive")):
        with pytest.raises(ConfigError, match=re.escape(says)):
            check(["model=gnmt", "loss=mwer", bad, start])
    with pytest.raises(ConfigError, match="init_from=PATH"):
        check(["experiment=gnmt_mwer"])


def test_sampled_gleu_risk_training_pipelined_like_one_device(tmp_path, single_ce):
    """giantpipe-train: risk training from a CE run (1 - GLEU over 3 sampled candidates, keyed
    by step and position in the batch) on one device and on 2 stages."""
    risk = ["loss=mwer", "loss.risk=gleu", "loss.candidates=sample", "loss.nbest=3",
            "loss.sample_temperature=1.5", "logger=csv",
            f"init_from={single_ce / 'checkpoints' / 'last.ckpt'}"]
    pipe = ["strategy=pipeline", "strategy.stages=2", "trainer.devices=2", "strategy.micro_batches=4"]
    for name, extra in (("one", []), ("two", pipe)):
        run_train(TINY_GNMT + risk + extra + [f"hydra.run.dir={tmp_path / name}"], tmp_path)
    expected, got = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert len(got) == 4 and sorted(got) == sorted(expected)
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    one, two = read_summary(tmp_path / "one"), read_summary(tmp_path / "two")
    assert one["choices"]["loss"] == "mwer"
    for key in ("test/bleu", "test/loss", "val/loss"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-4, abs=1e-4), key
