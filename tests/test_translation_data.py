"""Translation data: the embedded corpus, readers that skip and count bad lines, wordpieces,
batches, length buckets and BLEU. Nothing is downloaded."""

from __future__ import annotations

import datetime as dt
import json
import random

import pytest
import sacrebleu
import torch

from data_harness import load_splits, read
from giantpipe.platform.data import translation_sources as sources
from giantpipe.platform.data.buckets import BucketBatchSampler
from giantpipe.platform.data.skips import SkipCounts
from giantpipe.platform.data.translation import (
    SplitWriter,
    TranslationCollator,
    TranslationDataset,
    build_vocabularies,
    corpus_bleu,
    prepare_translation,
)
from giantpipe.platform.data.verbalization import NOUNS, de_count, de_date
from giantpipe.platform.data.verbalization_corpus import generate_pairs
from giantpipe.platform.data.wordpieces import KINDS, train_wordpieces

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pairs():
    return generate_pairs(3000, seed=0)


# --- the embedded corpus -------------------------------------------------------------------
def test_corpus_is_deterministic_sized_and_distinct(pairs):
    assert len(pairs) == 3000
    assert generate_pairs(3000, seed=0) == pairs
    assert generate_pairs(3000, seed=1) != pairs
    assert len({en for en, _ in pairs}) == 3000
    words = [len(s.split()) for p in pairs for s in p]
    assert min(words) >= 4 and max(words) <= 25


def test_corpus_speaks_german():
    assert de_date(dt.date(2021, 5, 3), True) == "dritten Mai zweitausendeinundzwanzig"
    assert de_date(dt.date(1998, 12, 21), False, ending="") == "einundzwanzigste Dezember"
    apple = next(n for n in NOUNS if n.en == "apple")
    assert de_count(1, apple) == "einen Apfel" and de_count(1, apple, "nom") == "ein Apfel"
    assert de_count(21, apple) == "einundzwanzig Äpfel"
    text = "\n".join(de for _, de in generate_pairs(2000, seed=5))
    for phrase in ("Uhr", "Euro", "Prozent", "Jahrhundert", "zweitausend", "neunzehnhundert"):
        assert phrase in text


def test_default_corpus_writes_disjoint_hf_schema_splits(tmp_path):
    paths = sources.default_corpus(tmp_path, size=1200, seed=3, val_size=100, test_size=50)
    lines = {s: p.read_text(encoding="utf-8").splitlines() for s, p in paths.items()}
    assert [len(lines[s]) for s in ("train", "validation", "test")] == [1050, 100, 50]
    records = {s: [json.loads(x)["translation"] for x in v] for s, v in lines.items()}
    srcs = {s: {r["en"] for r in v} for s, v in records.items()}
    assert not srcs["train"] & srcs["validation"] and not srcs["train"] & srcs["test"]
    assert not srcs["validation"] & srcs["test"]
    mtime = paths["train"].stat().st_mtime_ns
    assert sources.default_corpus(tmp_path, 1200, 3, 100, 50) == paths  # cached, not rewritten
    assert paths["train"].stat().st_mtime_ns == mtime


# --- readers -------------------------------------------------------------------------------
def write_bytes(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def rec(en, de):
    return json.dumps({"translation": {"en": en, "de": de}}, ensure_ascii=False).encode()


def test_jsonl_reader_skips_and_counts(tmp_path):
    path = write_bytes(tmp_path / "c.jsonl", [
        rec("Hello there.", "Hallo."),
        rec("  spaced   out ", "weit\tauseinander"),
        json.dumps({"en": "flat", "de": "flach"}).encode(),
        rec("", "leer"), b"",  # two empty
        rec("one two three four five six", "eins"),  # too long (max_words=5)
        b'{"translation": {"en": "caf\xe9", "de": "x"}}',  # Latin-1 byte: undecodable
        b"{not json", rec("no german", "x").replace(b'"de"', b'"fr"'),  # two malformed
        json.dumps({"translation": {"en": 3, "de": "drei"}}).encode(),  # malformed (not text)
    ])
    pairs, counts = read(sources.read_json, path, "en", "de", max_words=5)
    assert pairs == [("Hello there.", "Hallo."), ("spaced out", "weit auseinander"),
                     ("flat", "flach")]
    assert counts.as_dict() == {"empty": 2, "too_long": 1, "undecodable": 1, "malformed": 3}
    assert counts.total == 7


def test_json_array_tsv_and_parallel_readers(tmp_path):
    arr = tmp_path / "c.json"
    arr.write_text(json.dumps([{"translation": {"en": "a b", "de": "c d"}},
                               {"translation": {"en": "x"}}]), encoding="utf-8")
    pairs, counts = read(sources.read_files, arr, "en", "de")
    assert pairs == [("a b", "c d")] and counts.malformed == 1

    tsv = write_bytes(tmp_path / "c.tsv", [b"one\teins", b"two", b"a\tb\tc", b"\t", b"\xff\tx",
                                           b"three\tdrei"])
    pairs, counts = read(sources.read_files, tsv, "en", "de")
    assert pairs == [("one", "eins"), ("three", "drei")]
    assert counts.as_dict() == {"empty": 1, "undecodable": 1, "malformed": 2}

    src = write_bytes(tmp_path / "s.txt", [b"one", b"", b"\xc3\x28", b"four", b"a " * 300])
    tgt = write_bytes(tmp_path / "t.txt", [b"eins", b"zwei", b"drei", b"vier", b"b"])
    pairs, counts = read(sources.read_files, [src, tgt], "en", "de")
    assert pairs == [("one", "eins"), ("four", "vier")]
    assert counts.as_dict() == {"empty": 1, "too_long": 1, "undecodable": 1}

    short = write_bytes(tmp_path / "short.txt", [b"eins"])
    with pytest.raises(ValueError, match="line by line"):
        read(sources.read_parallel, src, short)
    with pytest.raises(ValueError, match="cannot tell the format"):
        read(sources.read_files, src, "en", "de")


def test_hugging_face_source_without_download(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, config, split, streaming=False):
        calls.append((name, config, split))
        rows = [{"translation": {"de": f"Satz {i}", "en": f"sentence {i}"}} for i in range(30)]
        return datasets.Dataset.from_list(rows + [{"translation": {"de": "", "en": "empty"}}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    splits = load_splits("hf", hf_name="wmt16", hf_config="de-en",
                                     hf_splits={"train": "train"}, val_size=5, test_size=5)
    assert set(calls) == {("wmt16", "de-en", "train")}  # one pass to cut splits, one to read
    assert [len(splits.pairs[s]) for s in ("train", "validation", "test")] == [20, 5, 5]
    assert splits.skipped["train"].empty == 1


def test_split_pairs_keeps_equal_sources_together():
    pairs = [(f"s{i % 40}", f"t{i}") for i in range(100)]
    splits = sources.split_pairs(pairs, val_size=5, test_size=5, seed=1)
    seen = {s: {p[0] for p in v} for s, v in splits.items()}
    assert len(seen["validation"]) == len(seen["test"]) == 5
    assert not seen["train"] & (seen["validation"] | seen["test"])
    assert sum(len(v) for v in splits.values()) == 100
    assert sources.split_pairs(pairs, 5, 5, seed=1) == splits


# --- wordpieces ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_wordpieces_round_trip(pairs, kind):
    texts = [s for p in pairs[:1500] for s in p]
    vocab = train_wordpieces(texts, vocab_size=600, kind=kind)
    assert (vocab.pad_id, vocab.bos_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2, 3)
    assert vocab.vocab_size <= 600
    for text in [s for p in pairs[1500:1700] for s in p]:
        ids = vocab.encode(text)
        assert vocab.decode(ids) == text
        assert vocab.decode([vocab.bos_id, *ids, vocab.eos_id, 5, 6, vocab.pad_id]) == text
    assert all(t.isdigit() or not any(c.isdigit() for c in t)
               for t in vocab.tokenizer.encode("On 12/05/2021 I paid $1,234.50.", add_special_tokens=False).tokens)


def test_wordpieces_shared_or_separate(pairs):
    shared_src, shared_tgt = build_vocabularies(pairs, 500)
    assert shared_src is shared_tgt
    src, tgt = build_vocabularies(pairs, 500, shared=False)
    assert "▁Uhr" in tgt.tokenizer.get_vocab() and "▁Uhr" not in src.tokenizer.get_vocab()


# --- batches and buckets -------------------------------------------------------------------
def test_collator_builds_padded_teacher_forcing_batch():
    batch = TranslationCollator(pad_id=0, bos_id=1, eos_id=2)(
        [{"src": [5, 6, 7], "tgt": [8, 9], "index": 4}, {"src": [5], "tgt": [8, 9, 10], "index": 0}])
    assert batch["src"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["src_len"].tolist() == [3, 1]
    assert batch["tgt_in"].tolist() == [[1, 8, 9, 0], [1, 8, 9, 10]]
    assert batch["tgt_out"].tolist() == [[8, 9, 2, 0], [8, 9, 10, 2]]
    assert batch["tgt_len"].tolist() == [3, 4] and batch["index"].tolist() == [4, 0]


def test_bucket_sampler_groups_lengths_and_covers_every_item():
    rng = random.Random(0)
    lengths = [rng.randint(1, 60) for _ in range(1000)]
    sampler = BucketBatchSampler(lengths, 16, seed=2, drop_last=False, pool_batches=10)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert len(batches) == len(sampler) == 63
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / 63
    assert spread < 10  # random batches of 16 would spread ~50
    assert list(BucketBatchSampler(lengths, 16, seed=2, drop_last=False, pool_batches=10)) == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches
    halves = [list(BucketBatchSampler(lengths, 16, seed=2, num_replicas=2, replica=r))
              for r in (0, 1)]
    for a, b, whole in zip(*halves, BucketBatchSampler(lengths, 16, seed=2).global_batches()):
        assert a + b == whole and len(a) == len(b) == 8
    evaluation = list(BucketBatchSampler(lengths, 16, shuffle=False, drop_last=False))
    flat = [lengths[i] for b in evaluation for i in b]
    assert flat == sorted(lengths)


# --- end to end, and BLEU ------------------------------------------------------------------
def test_prepare_default_translation_data(tmp_path):
    data = prepare_translation(size=1500, val_size=100, test_size=100, vocab_size=400,
                               cache_dir=tmp_path, max_tokens=30)
    sizes = {s: len(d) for s, d in data.datasets.items()}
    assert sizes["validation"] <= 100 and sizes["test"] <= 100
    assert sum(sizes.values()) + sum(c.get("too_long", 0) for c in data.skipped.values()) == 1500
    train = data.datasets["train"]
    assert max(train.lengths) <= 30
    item = train[0]
    assert data.tgt_vocab.decode(item["tgt"]) == train.references[0]
    batch = data.collator()([train[i] for i in range(4)])
    assert batch["src"].shape[0] == 4 and batch["tgt_in"][:, 0].eq(1).all()


def bleu_from_ids(hypothesis_ids, references, vocab):
    """Detokenize hypotheses (cut at EOS) and score them against reference texts."""
    return corpus_bleu(vocab.decode_batch(hypothesis_ids), references)


def test_bleu_helper_matches_sacrebleu(pairs, tmp_path):
    refs = [de for _, de in pairs[:50]]
    hyps = [r if i % 3 else " ".join(r.split()[:-2] + ["falsch"]) for i, r in enumerate(refs)]
    ours = corpus_bleu(hyps, refs)
    theirs = sacrebleu.corpus_bleu(hyps, [refs])
    assert ours.score == pytest.approx(theirs.score) and 0 < ours.score < 100
    assert "13a" in ours.signature
    vocab = train_wordpieces([s for p in pairs for s in p], 500)
    ids = [vocab.encode(h) + [vocab.eos_id, vocab.pad_id] for h in hyps]
    assert bleu_from_ids(ids, refs, vocab).score == pytest.approx(theirs.score)
    writer = SplitWriter(tmp_path, ["test"], vocab, vocab, {"test": None}, {"test": SkipCounts()})
    for pair in pairs[:50]:
        writer.add("test", pair)
    writer.close()
    dataset = TranslationDataset(tmp_path, "test")
    assert list(dataset.references) == refs
    assert bleu_from_ids(dataset.tgt_ids, dataset.references, vocab).score == pytest.approx(100.0)
