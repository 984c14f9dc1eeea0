"""Speech data: log-mel features, SpecAugment, the eSpeak corpus, local and HF-schema sources
with bad audio skipped and counted, graphemes and batches."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
import soundfile as sf
import torch

from data_harness import scan
from giantpipe.platform.data.buckets import BucketBatchSampler
from giantpipe.platform.data.features import LogMel, mel_filterbank, mel_frequencies
from giantpipe.platform.data.graphemes import GraphemeVocab, normalize_transcript
from giantpipe.platform.data.spec_augment import SpecAugment
from giantpipe.platform.data.speech import prepare_speech
from giantpipe.platform.data.speech_sources import RecordSource, read_hf
from giantpipe.platform.data.speech_synth import (
    HELD_OUT_VOICES,
    TRAIN_VOICES,
    SynthSplit,
    default_speech_corpus,
    spoken_english,
    synthesize,
)

torch.set_num_threads(1)
SR = 16_000


def tone(hz: float, seconds: float = 1.0, amplitude: float = 0.3) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * hz * np.arange(int(SR * seconds)) / SR)).astype(np.float32)


# --- features --------------------------------------------------------------------------------
@pytest.mark.parametrize("samples", [16000, 16159, 12345, 400, 1])
def test_log_mel_has_one_frame_per_10ms_and_80_channels(samples):
    feats = LogMel()(torch.randn(samples))
    assert feats.shape == (1 + samples // 160, 80)
    assert LogMel().num_frames(samples) == feats.shape[0]
    assert torch.isfinite(feats).all()


@pytest.mark.parametrize("k", [6, 20, 40, 72])
def test_a_pure_tone_lands_in_its_mel_bin(k):
    centres = mel_frequencies(80, 0.0, SR / 2)[1:-1]  # 260 Hz, 782 Hz, 2.2 kHz, 6 kHz
    energy = LogMel()(torch.from_numpy(tone(centres[k]))).mean(0)
    assert int(energy.argmax()) == k
    assert energy[k] - energy[k - 3] > 5 and energy[k] - energy[k + 3] > 5  # a narrow peak


@pytest.mark.parametrize("htk", [False, True])
def test_mel_filterbank_equals_librosa(htk):
    librosa = pytest.importorskip("librosa")
    ours = mel_filterbank(SR, 512, 80, htk=htk)
    theirs = librosa.filters.mel(sr=SR, n_fft=512, n_mels=80, htk=htk)
    assert torch.allclose(ours, torch.from_numpy(theirs).float(), atol=1e-6)


def test_spec_augment_masks_only_in_training():
    torch.manual_seed(0)
    feats = torch.randn(300, 80) + 5.0  # no zeros of its own
    augment = SpecAugment(freq_masks=2, freq_width=10, time_masks=2, time_width=20)
    masked = augment(feats)
    zero_channels = (masked == 0).all(0).sum()
    zero_frames = (masked == 0).all(1).sum()
    assert 0 < zero_channels <= 20 and 0 < zero_frames <= 40
    assert torch.equal(masked[masked != 0], feats[masked != 0])
    assert torch.equal(augment.eval()(feats), feats)


# --- the embedded eSpeak corpus --------------------------------------------------------------
def test_spoken_form_reads_numbers_dates_and_money_aloud():
    assert spoken_english("The pear costs £1,538.05.") == (
        "the pear costs one thousand five hundred and thirty eight pounds and five pence")
    assert spoken_english("The train leaves at 5:07 p.m..") == "the train leaves at five oh seven p m"
    assert spoken_english("We will arrive in Munich on 12 Oct 2021.") == (
        "we will arrive in munich on the twelfth of october twenty twenty one")
    assert spoken_english("Prices rose by 39% last year.") == (
        "prices rose by thirty nine percent last year")
    assert spoken_english("It was -5 degrees at 7 AM.") == "it was minus five degrees at seven a m"


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")  # prepare_speech looks in cache / "speech"
    return default_speech_corpus(cache / "speech", train_size=8, val_size=3, test_size=3, seed=1,
                                 workers=1)


def test_synthesis_is_deterministic_and_sounds_like_speech(tiny_corpus):
    splits = {s: SynthSplit.load(tiny_corpus, s) for s in ("train", "validation", "test")}
    assert [len(s) for s in splits.values()] == [8, 3, 3]
    val = splits["validation"]
    again = synthesize([{k: v for k, v in it.items() if k not in ("offset", "length")}
                        for it in val.items])
    assert all(np.array_equal(a, val[i][0]) for i, a in enumerate(again))
    for split in splits.values():
        for i in range(len(split)):
            audio, text = split[i]
            seconds, words = len(audio) / SR, len(text.split())
            assert 0.15 < seconds / words < 0.8, (text, seconds)
            assert np.abs(audio).max() > 0.2 * 32767 and audio.astype(np.float64).std() > 300
            assert text == normalize_transcript(text) and not any(c.isdigit() for c in text)
    texts = [t for s in splits.values() for t in (it["text"] for it in s.items)]
    assert len(set(texts)) == len(texts)  # no sentence in two splits
    shipped = pickle.dumps(val)  # to DataLoader workers: the memory map is reopened, not copied
    assert len(shipped) < 10_000 and np.array_equal(pickle.loads(shipped)[1][0], val[1][0])


def test_held_out_voices_never_speak_in_training(tiny_corpus):
    assert not set(TRAIN_VOICES) & set(HELD_OUT_VOICES)
    train_variants = {v.split("+")[1] for v in TRAIN_VOICES}
    assert not train_variants & {v.split("+")[1] for v in HELD_OUT_VOICES}
    assert {it["voice"] for it in SynthSplit.load(tiny_corpus, "train").items} <= set(TRAIN_VOICES)
    for split in ("validation", "test"):
        assert {it["voice"] for it in SynthSplit.load(tiny_corpus, split).items} <= set(HELD_OUT_VOICES)


def test_default_source_builds_datasets_and_batches(tiny_corpus):
    data = prepare_speech(source="default", cache_dir=tiny_corpus.parent.parent, train_size=8,
                          val_size=3, test_size=3, seed=1, normalization="global")
    train, test = data.datasets["train"], data.datasets["test"]
    assert data.skipped["train"] == {}
    items = [test[i] for i in range(3)]
    assert torch.equal(test[0]["features"], items[0]["features"])  # no masking outside training
    assert abs(float(torch.cat([it["features"] for it in items]).mean())) < 0.5
    assert data.vocab.decode(items[0]["tgt"]) == test.text(0)
    batch = data.collator()(items)
    frames = [it["features"].shape[0] for it in items]
    assert batch["features"].shape == (3, max(frames), 80)
    assert batch["feat_len"].tolist() == frames == [test.lengths[i] for i in range(3)]
    assert torch.all(batch["tgt_in"][:, 0] == data.vocab.bos_id)
    for b, it in enumerate(items):
        n = len(it["tgt"])
        assert batch["tgt_out"][b, :n + 1].tolist() == [*it["tgt"], data.vocab.eos_id]
        assert batch["tgt_len"][b] == n + 1
    sampler = BucketBatchSampler(train.lengths, 4, shuffle=False)  # the translation one fits
    order = [i for b in sampler for i in b]
    assert [train.lengths[i] for i in order] == sorted(train.lengths)


# --- local files and the HF schema -----------------------------------------------------------
def test_local_files_load_and_bad_audio_is_skipped_and_counted(tmp_path):
    sf.write(tmp_path / "good.wav", tone(440), SR)
    sf.write(tmp_path / "stereo8k.flac", np.stack([tone(300)[:8000]] * 2, axis=1), 8000)
    sf.write(tmp_path / "silent.wav", np.zeros(SR, np.float32), SR)
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), SR)
    (tmp_path / "broken.wav").write_bytes(b"RIFF....this is not audio")
    sf.write(tmp_path / "long.wav", tone(440, seconds=3.0), SR)
    sf.write(tmp_path / "untranscribed.wav", tone(500), SR)
    (tmp_path / "trans.txt").write_text(
        "good Hello, World!\nstereo8k.flac it's eight kHz\nsilent nothing here\nempty nothing\n"
        "broken garbage\nmissing no such file\nlong far too long\nuntranscribed\n")
    data = prepare_speech(source="files", files={"train": tmp_path / "trans.txt"},
                          max_seconds=2.0, cache_dir=tmp_path / "cache")
    train = data.datasets["train"]
    assert data.skipped["train"] == {"silent": 1, "empty": 1, "unreadable": 2, "too_long": 1,
                                     "no_text": 1}
    assert [train.text(i) for i in range(len(train))] == ["hello world", "it's eight khz"]
    assert [train[i]["features"].shape[0] for i in range(2)] == [101, 101]  # 8 kHz resampled


def test_hf_schema_records_and_an_hf_dataset_load_without_decoding_backends(tmp_path):
    records = [{"audio": {"array": tone(440), "sampling_rate": SR}, "text": "A"},
               {"audio": {"array": np.zeros(SR), "sampling_rate": SR}, "text": "b"},
               {"audio": {"array": (np.sin(np.arange(11025) * 0.1) * 9000).astype(np.int16),
                          "sampling_rate": 22050}, "text": "c"},
               {"audio": None, "text": "d"}]
    scanned = scan(RecordSource(records))
    assert scanned.texts == ["a", "c"]
    assert scanned.num_samples == [SR, 8000]  # 0.5 s at 22.05 kHz -> 16 kHz
    assert (scanned.skipped.silent, scanned.skipped.unreadable) == (1, 1)

    datasets = pytest.importorskip("datasets")
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")

    def wav_bytes(x):
        buf = io.BytesIO()
        sf.write(buf, x, SR, format="WAV")
        return buf.getvalue()

    features = datasets.Features({"audio": datasets.Audio(), "text": datasets.Value("string")})
    table = pa.Table.from_pydict({
        "audio": [{"bytes": wav_bytes(tone(440)), "path": "a.wav"},
                  {"bytes": b"not audio", "path": "b.wav"}],
        "text": ["HELLO", "x"]}, schema=features.arrow_schema)
    pq.write_table(table, tmp_path / "train.parquet")
    source = read_hf("parquet", None, "train", data_files=str(tmp_path / "train.parquet"),
                     cache_dir=str(tmp_path / "hf"))
    scanned = scan(source)
    assert scanned.texts == ["hello"] and scanned.skipped.unreadable == 1


def test_grapheme_vocabulary_round_trips_and_marks_unknowns():
    vocab = GraphemeVocab.from_texts(["Hello world", "it's"])
    assert vocab.vocab_size == 4 + len(set("helo wrdit's"))
    ids = vocab.encode("HELLO,  World!")
    assert vocab.decode(ids) == "hello world"
    assert vocab.decode([*vocab.encode("hi"), vocab.eos_id, *vocab.encode("x")]) == "hi"
    assert vocab.encode("z") == [vocab.unk_id] and vocab.decode([vocab.unk_id]) == "?"
    assert json.loads(json.dumps(vocab.chars)) == vocab.chars
