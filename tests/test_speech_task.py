"""Speech recognition end to end: configs, training with WER (one device and a 2-stage pipeline,
cross-entropy and MWER), local audio files, giantpipe-eval on a split and on a folder of audio."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import read_summary, run_cli, run_train
from giantpipe.platform.config import ConfigError
from giantpipe.platform.data.speech_synth import HELD_OUT_VOICES, TRAIN_VOICES, synthesize
from giantpipe.platform.preflight import check, compose_train
from giantpipe.platform.tasks.speech import SpeechTask, word_error_rate

# A LAS and corpus small enough to train, validate and decode in seconds.
TINY_LAS = [
    "model=las", "model.listener_hidden=16", "model.listener_layers=2", "model.pyramid_levels=1",
    "model.speller_hidden=24", "model.speller_layers=2", "model.dropout=0", "model.decode.beam_size=2",
    "model.decode.max_len=16", "model.decode.num_samples=3", "data.n_mels=20",
    "data.train_size=48", "data.val_size=12", "data.test_size=12", "data.batch_size=8",
    "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
    "lr_schedule.warmup_steps=1", "logger=csv",
]
PIPE2 = ["strategy=pipeline", "strategy.stages=2", "trainer.devices=2", "strategy.micro_batches=2"]


def losses(run_dir) -> dict[int, float]:
    rows = csv.DictReader((run_dir / "csv" / "metrics.csv").open())
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def test_las_configs_compose_and_pick_speech_data():
    cfg = compose_train(["model=las"])
    assert cfg.data.family == cfg.model.family == "speech" and cfg.data.source == "default"
    assert cfg.model.n_mels == cfg.data.n_mels == 80
    check(["model=las", "loss=mwer", f"init_from={__file__}"])
    with pytest.raises(ConfigError, match="init_from=PATH"):
        check(["model=las", "loss=mwer"])
    for name, source in (("speech_files", "files"), ("librispeech", "hf"), ("common_voice", "hf")):
        assert compose_train(["model=las", f"data={name}"]).data.source == source  # no download
    check(["experiment=las"])
    check(["experiment=las_mwer", f"init_from={__file__}"])
    assert compose_train(["experiment=las_mwer"]).loss.nbest == 4
    with pytest.raises(ConfigError, match="data="):
        check(["model=las", "data=translation_default"])
    with pytest.raises(ConfigError, match="data.spec_augment.freq_maks"):
        check(["model=las", "data.spec_augment.freq_maks=3"])


def test_word_error_rate_is_jiwers():
    refs, hyps = ["the cat sat", "on the mat", "a b c d"], ["the cat sat down", "on mat", ""]
    # 1 insertion + 1 deletion + 4 deletions over 10 words
    assert word_error_rate(refs, hyps) == pytest.approx(0.6)


def test_spec_augment_masks_depend_on_the_sample_key_not_the_batch():
    class Stub:
        augment_on, seed, global_step = True, 0, 5
        trainer = None

        def __init__(self):
            from giantpipe.platform.data.spec_augment import SpecAugment
            self.augment = SpecAugment(freq_masks=2, freq_width=5, time_masks=2, time_width=6)

        batch_items = SpeechTask.batch_items

    features = torch.randn(4, 30, 12)
    batch = {"features": features, "feat_len": torch.tensor([30, 25, 20, 15])}
    task = Stub()
    whole = SpeechTask.prepare_train_batch(task, batch, 0)["features"]
    assert not torch.equal(whole, features)  # something was masked
    assert (whole[1, 25:] == features[1, 25:]).all()  # padding frames untouched
    again = SpeechTask.prepare_train_batch(task, batch, 0)["features"]
    assert torch.equal(whole, again)  # the same step draws the same masks


@pytest.fixture(scope="module")
def single_ce(tmp_path_factory):
    base = tmp_path_factory.mktemp("las_single")
    run_train(TINY_LAS + [f"hydra.run.dir={base / 'run'}"], base)
    return base / "run"


def test_las_trains_and_reports_wer_with_samples(single_ce):
    summary = read_summary(single_ce)
    metrics = summary["metrics"]
    assert summary["steps"] == 3 and 0 <= metrics["test/wer"] and metrics["test/loss"] > 0
    samples = sorted((single_ce / "samples").glob("test_step*.md"))
    assert samples and "| utterance | reference | hypothesis |" in samples[-1].read_text()


def test_two_stage_pipeline_trains_las_like_one_device(tmp_path, single_ce):
    """Cross-entropy with SpecAugment on: the keyed masks make the pipeline's steps equal."""
    run_dir = tmp_path / "pipe"
    run_train(TINY_LAS + PIPE2 + [f"hydra.run.dir={run_dir}"], tmp_path)
    expected, got = losses(single_ce), losses(run_dir)
    assert len(got) == 3 and sorted(got) == sorted(expected)
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    single, pipe = read_summary(single_ce)["metrics"], read_summary(run_dir)["metrics"]
    assert pipe["test/loss"] == pytest.approx(single["test/loss"], rel=1e-4)
    assert pipe["test/wer"] == pytest.approx(single["test/wer"], abs=1e-6)


def test_mwer_fine_tuning_from_a_ce_checkpoint_pipelined_like_one_device(tmp_path, single_ce):
    ckpt = single_ce / "checkpoints" / "last.ckpt"
    mwer = ["loss=mwer", "loss.nbest=2", f"init_from={ckpt}", "optim.lr=1e-3"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_train(TINY_LAS + mwer + [f"hydra.run.dir={one}"], tmp_path)
    run_train(TINY_LAS + mwer + PIPE2 + [f"hydra.run.dir={two}"], tmp_path)
    expected, got = losses(one), losses(two)
    assert len(got) == 3 and sorted(got) == sorted(expected)
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    assert read_summary(two)["metrics"]["test/wer"] == pytest.approx(
        read_summary(one)["metrics"]["test/wer"], abs=1e-6)


def write_speech_files(folder, texts, voices):
    specs = [{"text": t, "voice": voices[i % len(voices)], "rate": 170, "pitch": 50, "gain": 0.8,
              "snr_db": None, "seed": i} for i, t in enumerate(texts)]
    folder.mkdir()
    lines = []
    for i, audio in enumerate(synthesize(specs, workers=1)):
        sf.write(folder / f"utt{i}.wav", audio, 16_000)
        lines.append(f"utt{i} {texts[i]}")
    sf.write(folder / "silent.wav", np.zeros(16_000, np.float32), 16_000)
    (folder / "broken.wav").write_bytes(b"RIFF not audio")
    lines += ["silent nothing to hear", "broken garbage"]
    (folder / "trans.txt").write_text("\n".join(lines) + "\n")
    return folder / "trans.txt"


def test_local_audio_files_train_and_a_folder_is_transcribed(tmp_path):
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
    texts = [" ".join(words[(i + k) % 8] for k in range(1 + i % 3)) for i in range(20)]
    train = write_speech_files(tmp_path / "train", texts[:16], TRAIN_VOICES)
    test = write_speech_files(tmp_path / "test", texts[16:], HELD_OUT_VOICES)
    run_dir = tmp_path / "run"
    proc = run_train(TINY_LAS + ["data=speech_files", f"data.train_paths=[{train}]",
                                 f"data.validation_paths=[{test}]", f"data.test_paths=[{test}]",
                                 "data.batch_size=4", f"hydra.run.dir={run_dir}"], tmp_path)
    assert "speech train: 16 utterances, skipped 2 (silent 1, unreadable 1)" in proc.stdout + proc.stderr
    assert read_summary(run_dir)["steps"] == 3

    out = run_cli("evaluate", [str(run_dir / "checkpoints" / "last.ckpt"), "--input", str(test.parent),
                               "--refs", str(test), "--out", str(tmp_path / "wer.json")], tmp_path, timeout=180,
                  check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    names = [line.split("\t")[0] for line in out.stdout.splitlines()]
    assert names == sorted(["broken.wav", "silent.wav"] + [f"utt{i}.wav" for i in range(4)])
    assert "skipping unreadable" in out.stderr and "WER" in out.stderr
    assert json.loads((tmp_path / "wer.json").read_text())["files"] == 6

    split = run_cli("evaluate", [str(run_dir / "checkpoints" / "last.ckpt"), "--split", "test"], tmp_path,
                    timeout=180, check=False)
    assert split.returncode == 0, split.stderr[-3000:]
    assert "test/wer" in json.loads(split.stdout)


def test_missing_speech_files_get_one_clean_error(tmp_path):
    proc = run_train(["model=las", "data=speech_files", f"data.train_paths=[{tmp_path / 'nope.txt'}]"],
                     tmp_path, check=False)
    assert proc.returncode != 0
    assert "speech transcript files not found" in proc.stderr and "Traceback" not in proc.stderr


def test_las_spells_wordpieces_too(tmp_path):
    run_dir = tmp_path / "wp"
    run_train(TINY_LAS + ["data.units=wordpieces", "data.vocab_size=60", f"hydra.run.dir={run_dir}"], tmp_path)
    summary = read_summary(run_dir)
    assert summary["steps"] == 3 and "test/wer" in summary["metrics"]
    config = (run_dir / ".hydra" / "config.yaml").read_text()
    assert "units: wordpieces" in config
