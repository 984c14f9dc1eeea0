"""Corpora at scale: prepared once to memory-mapped arrays, opened (not rebuilt) by every later
process, streamed from a hub-style dataset with the same result, and read column by column."""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

from giantpipe.platform.data import translation as translation_module
from giantpipe.platform.data.buckets import BucketBatchSampler
from giantpipe.platform.data.ragged import Ragged, RaggedWriter
from giantpipe.platform.data.sampling import stage_of
from giantpipe.platform.data.speech import prepare_speech
from giantpipe.platform.data.translation import prepare_translation
from giantpipe.platform.data.verbalization_corpus import generate_pairs

torch.set_num_threads(1)
SPLITS = ("train", "validation", "test")


def hub_style_folder(root, rows_by_split) -> str:
    """A local dataset folder as the hub serves one: a parquet file per split."""
    import datasets

    root.mkdir()
    for split, rows in rows_by_split.items():
        datasets.Dataset.from_list(rows).to_parquet(str(root / f"{split}.parquet"))
    return str(root)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))


def test_ragged_rows_round_trip_through_a_memory_map(tmp_path):
    writer = RaggedWriter(tmp_path, "x", np.float16, (3,))
    rows = [np.arange(6).reshape(2, 3), np.zeros((0, 3)), np.ones((1, 3))]
    writer.extend(rows[:2])
    writer.extend(rows[2:])
    writer.close()
    ragged = Ragged(tmp_path, "x")
    assert not ragged.flat.flags.owndata and not ragged.flat.flags.writeable and len(ragged) == 3
    assert all(np.array_equal(ragged[i], r) for i, r in enumerate(rows))
    assert np.diff(ragged.offsets).tolist() == [2, 0, 1] and np.array_equal(ragged[-1], rows[2])
    with pytest.raises(IndexError):
        ragged[3]
    RaggedWriter(tmp_path, "empty", np.int32).close()
    assert len(Ragged(tmp_path, "empty")) == 0


def test_translation_is_prepared_once_and_then_only_opened(tmp_path, monkeypatch):
    builds = []
    build = translation_module._build
    monkeypatch.setattr(translation_module, "_build", lambda *a, **k: (builds.append(1), build(*a, **k)))
    settings = dict(size=600, val_size=50, test_size=50, vocab_size=200, cache_dir=tmp_path)
    results = []
    threads = [threading.Thread(target=lambda: results.append(prepare_translation(**settings)))
               for _ in range(3)]  # three processes' worth of callers at once: one builds
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len({r.folder for r in results}) == 1
    data = results[0]
    train = data.datasets["train"]
    assert not train.src_ids.flat.flags.owndata and isinstance(train.lengths, np.memmap)
    assert train.src_ids.flat.dtype == np.uint16  # 200 pieces fit two bytes
    assert sum(len(d) for d in data.datasets.values()) == 600
    lengths = [max(len(train.src_ids[i]), len(train.tgt_ids[i]) + 1) for i in range(len(train))]
    assert train.lengths.tolist() == lengths
    assert prepare_translation(**{**settings, "max_tokens": 20}).folder != data.folder  # new key


def test_one_corpus_file_is_cut_by_source_sentence_in_one_streaming_pass(tmp_path):
    pairs = [(f"sentence {i % 150}", f"Satz {i}") for i in range(400)]  # sources repeat
    path = tmp_path / "pairs.tsv"
    path.write_text("".join(f"{s}\t{t}\n" for s, t in pairs))
    data = prepare_translation(source="files", files=path, val_size=20, test_size=10,
                               vocab_size=100, cache_dir=tmp_path)
    sources = {s: {data.src_vocab.decode(ids) for ids in d.src_ids} for s, d in data.datasets.items()}
    assert (len(sources["validation"]), len(sources["test"])) == (20, 10)
    assert not sources["train"] & sources["validation"] and not sources["train"] & sources["test"]
    assert sum(len(d) for d in data.datasets.values()) == 400


def test_wordpieces_train_on_a_bounded_sample(tmp_path, monkeypatch):
    seen = []
    vocabularies = translation_module.build_vocabularies
    monkeypatch.setattr(translation_module, "build_vocabularies",
                        lambda pairs, *a: (seen.append(len(pairs)), vocabularies(pairs, *a))[1])
    data = prepare_translation(size=800, val_size=50, test_size=50, vocab_size=150,
                               tokenizer_sample=120, cache_dir=tmp_path)
    assert seen == [120] and len(data.datasets["train"]) > 600  # all of it tokenized
    assert translation_module.sample_pairs(iter(range(5)), 10) == list(range(5))
    sample = translation_module.sample_pairs(iter(range(10_000)), 100)
    assert len(set(sample)) == 100 and max(sample) > 5000  # uniform, not the first 100


def test_streaming_from_a_hub_style_dataset_prepares_the_same_tokens(tmp_path, hf_cache, monkeypatch):
    import datasets

    rows = {s: [{"translation": {"en": en, "de": de}} for en, de in generate_pairs(n, seed=k)]
            for k, (s, n) in enumerate(zip(SPLITS, (300, 40, 40)))}
    folder = hub_style_folder(tmp_path / "hub", rows)
    kinds = []
    load = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *a, **k: (kinds.append(k["streaming"]), load(*a, **k))[1])
    settings = dict(source="hf", hf_name=folder, vocab_size=150)
    streamed = prepare_translation(streaming=True, cache_dir=tmp_path / "a", **settings)
    assert set(kinds) == {True}
    assert isinstance(load(folder, split="train", streaming=True), datasets.IterableDataset)
    downloaded = prepare_translation(streaming=False, cache_dir=tmp_path / "b", **settings)
    assert streamed.folder.name == downloaded.folder.name  # one key: the same prepared cache
    for split in SPLITS:
        a, b = streamed.datasets[split], downloaded.datasets[split]
        assert np.array_equal(a.src_ids.flat, b.src_ids.flat) and list(a.references) == list(b.references)


def test_speech_streams_from_a_hub_style_dataset_into_feature_shards(tmp_path, hf_cache):
    import io

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    def wav(seconds, hz):
        buf = io.BytesIO()
        t = np.arange(int(16_000 * seconds)) / 16_000
        sf.write(buf, (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32), 16_000, format="WAV")
        return buf.getvalue()

    features = datasets.Features({"audio": datasets.Audio(), "text": datasets.Value("string")})
    root = tmp_path / "hub"
    root.mkdir()
    for split in SPLITS:
        rows = {"audio": [{"bytes": wav(0.2 + 0.1 * i, 300 + 50 * i), "path": f"{i}.wav"} for i in range(4)]
                + [{"bytes": b"not audio", "path": "bad.wav"}],
                "text": [f"word {chr(97 + i)}" for i in range(4)] + ["bad"]}
        pq.write_table(pa.Table.from_pydict(rows, schema=features.arrow_schema), root / f"{split}.parquet")
    data = prepare_speech(source="hf", hf_name=str(root), streaming=True, cache_dir=tmp_path / "c")
    train = data.datasets["train"]
    assert data.skipped["train"] == {"unreadable": 1} and len(train) == 4
    assert not train.rows.flat.flags.owndata and train.rows.flat.dtype == np.float16
    assert train.lengths.tolist() == [1 + int(16_000 * (0.2 + 0.1 * i)) // 160 for i in range(4)]
    assert [train.text(i) for i in range(4)] == [f"word {chr(97 + i)}" for i in range(4)]
    on_the_fly = prepare_speech(source="hf", hf_name=str(root), precompute=False, cache_dir=tmp_path / "c")
    item, again = train[2], on_the_fly.datasets["train"][2]
    assert torch.allclose(item["features"], again["features"], atol=0.05)  # float16 shards


def test_a_stage_after_the_first_reads_no_source_column(tmp_path):
    data = prepare_translation(size=300, val_size=20, test_size=20, vocab_size=120, cache_dir=tmp_path)
    train, collate = data.datasets["train"], data.collator()
    full = collate([train[i] for i in range(4)])
    later = collate([train.with_source(False)[i] for i in range(4)])
    assert later["src"].shape == (4, 0) and torch.equal(later["src_len"], full["src_len"])
    assert all(torch.equal(later[k], full[k]) for k in full if k != "src")

    def trainer(rank, stages):
        topology = SimpleNamespace(stage_of=lambda r: r % stages)
        return SimpleNamespace(strategy=SimpleNamespace(topology=topology), global_rank=rank)

    assert [stage_of(trainer(r, 2)) for r in range(4)] == [0, 1, 0, 1]
    assert stage_of(None) == 0 and stage_of(SimpleNamespace(strategy=object())) == 0


def test_bucketing_reads_a_memory_mapped_lengths_column(tmp_path):
    lengths = np.random.default_rng(0).integers(1, 60, 1000).astype(np.int32)
    np.save(tmp_path / "lengths.npy", lengths)
    mapped = np.load(tmp_path / "lengths.npy", mmap_mode="r")
    a = list(BucketBatchSampler(mapped, 16, seed=3, drop_last=False))
    b = list(BucketBatchSampler(lengths.tolist(), 16, seed=3, drop_last=False))
    assert a == b and sorted(i for batch in a for i in batch) == list(range(1000))
    assert json.dumps(a[0])  # plain ints for the collator


def test_datasets_go_to_loader_workers_as_file_names_not_data(tmp_path):
    import pickle

    data = prepare_translation(size=300, val_size=20, test_size=20, vocab_size=120, cache_dir=tmp_path)
    train = data.datasets["train"]
    shipped = pickle.loads(pickle.dumps(train))
    assert len(pickle.dumps(train)) < 5_000 and not shipped.src_ids.flat.flags.owndata
    assert all(np.array_equal(shipped[i]["tgt"], train[i]["tgt"]) for i in range(len(train)))
    view = train.with_source(False)
    assert view.lengths is train.lengths and train.read_source and not view.read_source
