"""A campaign of generated malformed data: every bad line, record or audio file is skipped and
counted by kind, every good one kept -- and when nothing usable remains, one ValueError (or
ConfigError) names the problem. Never another exception.

The readers are called directly (no training), so hundreds of corpora take seconds.
"""

from __future__ import annotations

import io
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_harness import load_splits, read, scan
from giantpipe.platform.config import ConfigError
from giantpipe.platform.data.graphemes import normalize_transcript
from giantpipe.platform.data.speech import prepare_speech
from giantpipe.platform.data.speech_sources import RecordSource, read_transcripts
from giantpipe.platform.data.text import blocks, load_documents
from giantpipe.platform.data.translation import prepare_translation
from giantpipe.platform.data.translation_sources import clean
from giantpipe.platform.data.translation_sources import read_json as _read_json
from giantpipe.platform.data.translation_sources import read_parallel as _read_parallel
from giantpipe.platform.data.translation_sources import read_tsv as _read_tsv
from giantpipe.platform.preflight import compose_train

CAMPAIGN = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SR = 16_000

# Byte strings that are not UTF-8: a stray continuation byte, a truncated sequence, an encoded
# surrogate, an overlong encoding, bytes that never occur.
BAD_BYTES = st.sampled_from([b"\xff", b"\xfe\xff", b"\x80", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80",
                             b"\xc0\xaf", b"\xf8\x88\x80\x80\x80", b"caf\xe9"])
# Text that stays one line: no line breaks, no lone surrogates.
LINE_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=40)
WORDS = st.lists(st.text("abcdefghijklmnopqrstuvwxyzäöüß", min_size=1, max_size=8), min_size=1, max_size=6).map(" ".join)


def workdir():
    return tempfile.TemporaryDirectory(prefix="campaign")


# --- text for the language model -------------------------------------------------------------
text_line = st.one_of(
    LINE_TEXT.map(lambda t: ("ok", t.encode())),
    st.just(("ok", b"")),  # an empty line is text too
    st.tuples(LINE_TEXT, BAD_BYTES, LINE_TEXT).map(lambda t: ("bad", t[0].encode() + t[1] + t[2].encode())),
    st.integers(5_000, 20_000).map(lambda n: ("ok", b"x" * n)),  # overlong line
)
GOOD_TEXT = "".join(f"# {k:04d} " + "some text " * 40 + "\n" for k in range(400))  # 40 blocks of 4 kB
TEXT_FILES = compose_train(["data=text_files", "data.val_fraction=0.3", "data.test_fraction=0.3"]).data
text_file = st.tuples(st.lists(text_line, max_size=12), st.sampled_from([b"\n", b"\r\n", b"\r"]))


@CAMPAIGN
@given(st.lists(text_file, min_size=1, max_size=5), st.booleans())
def test_text_files_skip_and_count_undecodable_lines_and_empty_documents(files, with_good_file):
    with workdir() as tmp:
        expected_docs, bad_lines, empty_docs = [], 0, 0
        for i, (lines, newline) in enumerate(files):
            Path(tmp, f"{i}.txt").write_bytes(b"".join(raw + newline for _, raw in lines))
            kept = "".join(raw.decode() + "\n" for kind, raw in lines if kind == "ok")
            bad_lines += sum(kind == "bad" for kind, _ in lines)
            if kept.strip():
                expected_docs.append(kept)
            else:
                empty_docs += 1
        if with_good_file:  # enough text for every split, so the run can go on
            Path(tmp, "good.txt").write_text(GOOD_TEXT)
            expected_docs.append(GOOD_TEXT)
        cfg = TEXT_FILES.copy()
        cfg.paths = [f"{tmp}/*.txt"]
        try:
            docs, skipped = load_documents(cfg)
        except ConfigError as err:
            assert "every split needs text" in str(err) and "Traceback" not in str(err)
            assert not with_good_file
            return
        assert skipped.undecodable == bad_lines and skipped.empty == empty_docs
        kept_chars = sum(len(b) for split in docs.values() for b in split)
        assert kept_chars == sum(len(d) for d in expected_docs)  # every good character, once


def test_an_edited_text_file_is_read_again_not_served_from_the_cache(tmp_path):
    from giantpipe.platform.data.text import TextDataModule

    corpus = tmp_path / "notes.txt"
    corpus.write_text(GOOD_TEXT)
    cfg = TEXT_FILES.copy()
    cfg.paths, cfg.cache_dir = [str(corpus)], str(tmp_path / "cache")
    before = TextDataModule(cfg, 8, 0)
    before.prepare()
    corpus.write_text(GOOD_TEXT.replace("some text", "more words"))
    after = TextDataModule(cfg, 8, 0)
    after.prepare()
    assert after.stats["train_tokens"] != before.stats["train_tokens"]  # re-tokenized


def test_text_blocks_cover_a_document_exactly():
    text = "a" * 10_000 + "\n" + "b\n" * 5000 + "tail"
    assert "".join(blocks(text)) == text


# --- translation pairs -----------------------------------------------------------------------
MAX_WORDS = 12
# (kind, jsonl line as bytes, the pair it yields or None); kind is the SkipCounts field or "ok".
jsonl_record = st.one_of(
    st.tuples(WORDS, WORDS).map(lambda p: ("ok", json.dumps({"translation": {"en": p[0], "de": p[1]}}), p)),
    st.tuples(WORDS, WORDS).map(lambda p: ("ok", json.dumps({"en": p[0], "de": p[1]}), p)),  # flat schema
    WORDS.map(lambda s: ("malformed", json.dumps({"translation": {"en": s}}), None)),  # missing side
    WORDS.map(lambda s: ("malformed", json.dumps({"translation": {"de": s, "fr": s}}), None)),
    st.sampled_from([1, 2.5, None, [], ["a"], {"x": 1}, True]).map(
        lambda v: ("malformed", json.dumps({"translation": {"en": v, "de": "gut"}}), None)),  # wrong type
    st.sampled_from(["[1, 2]", '"text"', "3", "null", '{"translation": null}', '{"translation": "en-de"}']).map(
        lambda line: ("malformed", line, None)),  # valid JSON, not a record
    st.sampled_from(['{"en": "a", "de": ', "{not json", '{"en": "a" "de": "b"}', "[" * 50_000, "}"]).map(
        lambda line: ("malformed", line, None)),  # invalid JSON (one nested past the recursion limit)
    st.tuples(st.sampled_from(["", "   ", "\t", "\u00a0"]), WORDS).map(
        lambda p: ("empty", json.dumps({"translation": {"en": p[0], "de": p[1]}}), None)),  # empty side
    WORDS.map(lambda s: ("too_long", json.dumps({"en": " ".join([s] * (MAX_WORDS + 1)), "de": "kurz"}), None)),
    st.integers(MAX_WORDS * 40 + 1, 20_000).map(lambda n: ("too_long", json.dumps({"en": "x" * n, "de": "y"}), None)),
    WORDS.map(lambda s: ("undecodable", json.dumps({"en": s + "\ud800", "de": "x"}), None)),  # lone surrogate
    st.tuples(WORDS, BAD_BYTES).map(lambda p: ("undecodable", p[0].encode() + p[1], None)),  # not UTF-8
    st.just(("empty", "", None)),  # blank line
)


def encode_line(line: str | bytes) -> bytes:
    return line if isinstance(line, bytes) else line.encode()


def expected_counts(records) -> dict[str, int]:
    """The nonzero skip counts, by kind, of (kind, line, pair) rows."""
    counts: dict[str, int] = {}
    for kind, *_ in records:
        if kind != "ok":
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def read_json(path, *args, **kwargs):
    return read(_read_json, path, *args, **kwargs)


def read_tsv(path, **kwargs):
    return read(_read_tsv, path, **kwargs)


def read_parallel(src, tgt, **kwargs):
    return read(_read_parallel, src, tgt, **kwargs)


@CAMPAIGN
@given(st.lists(jsonl_record, max_size=25))
def test_jsonl_pairs_are_kept_or_skipped_and_counted_by_kind(records):
    with workdir() as tmp:
        path = Path(tmp, "pairs.jsonl")
        path.write_bytes(b"".join(encode_line(line) + b"\n" for _, line, _ in records))
        pairs, counts = read_json(path, "en", "de", max_words=MAX_WORDS)
        assert pairs == [(clean(s), clean(t)) for kind, _, (s, t) in
                         ((k, ln, p) for k, ln, p in records if k == "ok")]
        assert counts.as_dict() == expected_counts(records)
        # the same records as one JSON array (what JSON can hold of them)
        parsed = []
        for kind, line, _ in records:
            if kind != "ok" and isinstance(line, bytes) or kind == "malformed" and not _parses(line):
                continue
            if line:
                parsed.append(json.loads(line))
        array = Path(tmp, "pairs.json")
        array.write_text(json.dumps(parsed))
        pairs_from_array, _ = read_json(array, "en", "de", max_words=MAX_WORDS)
        assert pairs_from_array == pairs


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except (ValueError, RecursionError):
        return False
    return True


tsv_row = st.one_of(
    st.tuples(WORDS, WORDS).map(lambda p: ("ok", f"{p[0]}\t{p[1]}", p)),
    WORDS.map(lambda s: ("malformed", s, None)),  # one column
    st.tuples(WORDS, WORDS, WORDS).map(lambda p: ("malformed", "\t".join(p), None)),  # three
    WORDS.map(lambda s: ("empty", f"{s}\t  ", None)),
    WORDS.map(lambda s: ("too_long", f"{' '.join([s] * (MAX_WORDS + 1))}\tkurz", None)),
    st.tuples(WORDS, BAD_BYTES).map(lambda p: ("undecodable", p[0].encode() + b"\t" + p[1], None)),
)


@CAMPAIGN
@given(st.lists(tsv_row, max_size=25), st.lists(tsv_row, max_size=25))
def test_tsv_and_parallel_text_keep_good_pairs_and_count_the_rest(rows, more_rows):
    with workdir() as tmp:
        path = Path(tmp, "pairs.tsv")
        path.write_bytes(b"".join(encode_line(line) + b"\n" for _, line, _ in rows))
        pairs, counts = read_tsv(path, max_words=MAX_WORDS)
        assert pairs == [p for kind, _, p in rows if kind == "ok"]
        assert counts.as_dict() == expected_counts(rows)

        # parallel text: the same rows' sides, one file each (a one-column row: empty target)
        sides = [encode_line(line).split(b"\t") for _, line, _ in more_rows]
        src, tgt = Path(tmp, "x.en"), Path(tmp, "x.de")
        src.write_bytes(b"".join(s[0] + b"\n" for s in sides))
        tgt.write_bytes(b"".join((s[1] if len(s) > 1 else b"") + b"\n" for s in sides))
        parallel, counts = read_parallel(src, tgt, max_words=MAX_WORDS)
        assert sum(counts.as_dict().values()) + len(parallel) == len(more_rows)  # each kept or counted once

        # a split with nothing usable is one ValueError naming it
        files = {"train": path, "validation": path, "test": [src, tgt]}
        empty = "train" if not pairs else "test" if not parallel else None
        try:
            splits = load_splits("files", files=files, max_words=MAX_WORDS)
        except ValueError as err:
            assert f"no usable {empty} pairs" in str(err), err
        else:
            assert empty is None and splits.pairs["test"] == parallel


def test_unusable_translation_files_are_one_clean_error(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"en": "a", "de": "b"}, {"en": ')
    with pytest.raises(ValueError, match="broken.json is not a valid JSON array"):
        read_json(broken, "en", "de")
    broken.write_bytes(b'[{"en": "\xff"}]')
    with pytest.raises(ValueError, match="not a valid JSON array"):
        read_json(broken, "en", "de")
    with pytest.raises(ValueError, match="is not a file"):
        load_splits("files", files=str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        load_splits("files", files=[tmp_path / "a.en", tmp_path / "a.de"])
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"{oops\n\xff\xfe\n" + json.dumps({"en": "", "de": "x"}).encode() + b"\n")
    with pytest.raises(ValueError, match=r"no usable train pairs.*'empty': 1.*'undecodable': 1.*'malformed': 1"):
        load_splits("files", files={"train": bad, "validation": bad, "test": bad})


def test_a_corpus_with_every_kind_of_bad_line_prepares_and_counts_them(tmp_path):
    from giantpipe.platform.data.verbalization_corpus import generate_pairs

    good = [json.dumps({"translation": {"en": en, "de": de}}, ensure_ascii=False) for en, de in generate_pairs(200, 3)]
    bad = ["{not json", json.dumps({"en": "a"}), json.dumps({"en": 5, "de": "x"}), json.dumps({"en": "", "de": "x"}),
           json.dumps({"en": "x " * 300, "de": "y"}), json.dumps({"en": "\udc00", "de": "x"}), "[" * 10_000]
    path = tmp_path / "pairs.jsonl"
    path.write_bytes("\n".join(good[:100] + bad + good[100:]).encode() + b"\n\xff\xfe\n")
    data = prepare_translation(source="files", files=path, val_size=10, test_size=10, vocab_size=120,
                               cache_dir=tmp_path)
    assert sum(len(d) for d in data.datasets.values()) == 200
    assert data.skipped["train"] == {"empty": 1, "too_long": 1, "undecodable": 2, "malformed": 4}


# --- speech ----------------------------------------------------------------------------------
MAX_SECONDS = 0.5
RATES = [8000, 11025, 16000, 22050, 44100]


def tone(seconds: float, rate: int, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def wav_bytes(audio: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


good_audio = st.tuples(st.floats(0.05, MAX_SECONDS * 0.9), st.sampled_from(RATES), st.booleans(),
                       st.sampled_from(["WAV", "FLAC"])).map(
    lambda a: ("ok", wav_bytes(np.stack([tone(a[0], a[1])] * 2, 1) if a[2] else tone(a[0], a[1]), a[1], a[3]),
               a[3].lower(), math.ceil(int(round(a[0] * a[1])) * SR / a[1])))
audio_item = st.one_of(
    good_audio,
    st.sampled_from(RATES).map(lambda r: ("silent", wav_bytes(np.zeros(r // 4, np.float32), r), "wav", 0)),
    st.floats(0, 5e-4).map(lambda a: ("silent", wav_bytes(tone(0.2, SR, a), SR), "wav", 0)),
    st.just(("empty", wav_bytes(np.zeros(0, np.float32), SR), "wav", 0)),
    st.floats(MAX_SECONDS * 1.05, MAX_SECONDS * 2).map(lambda s: ("too_long", wav_bytes(tone(s, SR), SR), "wav", 0)),
    st.tuples(st.floats(0.1, 0.4), st.floats(0.0, 0.999)).map(  # cut anywhere: header or samples
        lambda p: ("unreadable", (lambda b: b[: int(p[1] * (len(b) - 1))])(wav_bytes(tone(p[0], SR), SR, subtype="PCM_16")),
                   "wav", 0)),
    st.binary(max_size=300).map(lambda b: ("unreadable", b, "wav", 0)),  # not audio at all
    st.binary(max_size=300).map(lambda b: ("unreadable", b"RIFF\x10\x00\x00\x00WAVEfmt " + b, "wav", 0)),
    st.just(("unreadable", None, "wav", 0)),  # listed in the transcript, missing on disk
)
transcript = st.one_of(WORDS.filter(lambda t: normalize_transcript(t) != ""),
                       st.sampled_from(["", "123 456", "?!", "   "]))


def expected_kind(kind: str, text: str) -> str:
    return "no_text" if kind == "ok" and not normalize_transcript(text) else kind


@CAMPAIGN
@given(st.lists(st.tuples(audio_item, transcript), max_size=8), st.sampled_from(["txt", "jsonl", "csv"]),
       st.lists(st.sampled_from([b"\xff\xfe bad line", b"{not json", b"[1, 2]", b'{"text": "no file"}',
                                 b'{"file_name": 7, "text": "x"}']), max_size=3))
def test_audio_files_and_transcripts_are_kept_or_skipped_and_counted(items, fmt, bad_lines):
    with workdir() as tmp:
        rows, expected = [], {}
        kept = []
        for i, ((kind, data, suffix, samples), text) in enumerate(items):
            name = f"u{i}.{suffix}"
            if data is not None:
                Path(tmp, name).write_bytes(data)
            rows.append((name, text))
            kind = expected_kind(kind, text)
            if kind == "ok":
                kept.append((normalize_transcript(text), samples))
            else:
                expected[kind] = expected.get(kind, 0) + 1
        path = Path(tmp, f"trans.{fmt}")
        if fmt == "txt":
            lines = [f"{name} {text}".encode() for name, text in rows]
        elif fmt == "jsonl":
            lines = [json.dumps({"file_name": name, "text": text}).encode() for name, text in rows] + bad_lines
            if bad_lines:
                expected["unreadable"] = expected.get("unreadable", 0) + len(bad_lines)
        else:
            lines = [b"file_name,text"] + [f'{name},"{text}"'.encode() for name, text in rows]
        path.write_bytes(b"\n".join(lines) + b"\n")
        scanned = scan(read_transcripts(path), max_seconds=MAX_SECONDS)
        assert scanned.skipped.as_dict() == expected
        assert list(zip(scanned.texts, scanned.num_samples)) == kept


record_item = st.one_of(
    st.sampled_from(RATES).map(lambda r: ("ok", {"audio": {"array": tone(0.2, r), "sampling_rate": r}, "text": "ja"})),
    st.just(("ok", {"audio": {"array": (tone(0.2, SR) * 30000).astype(np.int16), "sampling_rate": SR}, "text": "b"})),
    st.just(("ok", {"audio": {"array": tone(0.2, SR).astype(np.float64).tolist(), "sampling_rate": SR},
                    "text": "list"})),
    st.sampled_from([0, -16000, None, 1.5, float("nan"), "16k", True]).map(
        lambda r: ("unreadable", {"audio": {"array": tone(0.2, SR), "sampling_rate": r}, "text": "x"})),
    st.sampled_from([np.full(800, np.nan, np.float32), np.full(800, np.inf, np.float32), np.ones((2, 2, 400)),
                     np.array(["a", "b"]), [[1.0, 2.0], [3.0]], np.zeros((0, 2, 3))]).map(
        lambda a: ("unreadable", {"audio": {"array": a, "sampling_rate": SR}, "text": "x"})),
    st.sampled_from([None, 5, "missing.wav", {"bytes": b"not audio"}, {"path": None}, {}]).map(
        lambda a: ("unreadable", {"audio": a, "text": "x"})),
    st.sampled_from([5, "text", None, ["audio"]]).map(lambda r: ("unreadable", r)),  # not a record
    st.sampled_from([None, 5, ["a"], "", "12"]).map(
        lambda t: ("no_text", {"audio": {"array": tone(0.2, SR), "sampling_rate": SR}, "text": t})),
    st.just(("silent", {"audio": {"array": np.zeros(SR), "sampling_rate": SR}, "text": "x"})),
    st.just(("empty", {"audio": {"array": np.zeros(0), "sampling_rate": SR}, "text": "x"})),
    st.just(("too_long", {"audio": {"array": tone(1.0, SR), "sampling_rate": SR}, "text": "x"})),
)


@CAMPAIGN
@given(st.lists(record_item, max_size=10))
def test_hf_schema_records_are_kept_or_skipped_and_counted(records):
    scanned = scan(RecordSource([r for _, r in records]), max_seconds=MAX_SECONDS)
    assert scanned.skipped.as_dict() == expected_counts(records)
    assert len(scanned.texts) == sum(kind == "ok" for kind, _ in records)


def test_speech_with_no_usable_training_audio_is_one_clean_error(tmp_path):
    (tmp_path / "silent.wav").write_bytes(wav_bytes(np.zeros(SR // 2, np.float32), SR))
    (tmp_path / "cut.wav").write_bytes(wav_bytes(tone(0.3, SR), SR)[:100])
    (tmp_path / "trans.txt").write_bytes(b"silent hello\ncut world\nmissing gone\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"no usable training audio.*'silent': 1.*'unreadable': 3"):
        prepare_speech(source="files", files={"train": tmp_path / "trans.txt"}, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="is not a file"):
        read_transcripts(tmp_path)
