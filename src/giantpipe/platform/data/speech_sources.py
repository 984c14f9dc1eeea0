"""Where utterances come from: records in the Hugging Face speech schema, local audio files
listed in a transcript file, or the embedded eSpeak corpus; and which of them are usable.

Sources follow the schema `{"audio": {"array", "sampling_rate"}, "text"}` (undecoded
`{"bytes", "path"}` audio is decoded with soundfile) or list local audio files in a transcript
file. `usable` reads a source once, in order, and skips (counting by reason) silent, empty,
unreadable or overlong audio and empty transcripts: one pass, so a streamed hub dataset works
the same as a local one.
"""

from __future__ import annotations

import csv
import io
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from giantpipe.platform.data.audio import (
    AUDIO_SUFFIXES,
    SAMPLE_RATE,
    AudioReadError,
    decode_audio,
    to_mono_16k,
)
from giantpipe.platform.data.graphemes import normalize_transcript
from giantpipe.platform.data.skips import SkipCounts
from giantpipe.platform.data.translation_sources import is_unicode

SPLITS = ("train", "validation", "test")
PathSpec = str | Path


class SpeechSource(ABC):
    """Items (audio, transcript) in order; `items` counts unreadable ones and goes on."""

    @abstractmethod
    def items(self, counts: SkipCounts) -> Iterator[tuple[np.ndarray, str]]:
        """Yield (16 kHz mono audio, normalized transcript) pairs, counting what is skipped."""


class RecordSource(SpeechSource):
    """Records in the HF schema: audio `{"array", "sampling_rate"}`, `{"bytes", "path"}` or a
    path; any iterable of records (a list, a `datasets.Dataset`, a streamed IterableDataset)."""

    def __init__(self, records, audio_field: str = "audio", text_field: str = "text") -> None:
        self.records, self.audio_field, self.text_field = records, audio_field, text_field

    def items(self, counts: SkipCounts) -> Iterator[tuple[np.ndarray, str]]:
        for index, record in enumerate(self.records):
            try:
                yield self.load(index, record)
            except AudioReadError:
                counts.unreadable += 1

    def load(self, index: int, record) -> tuple[np.ndarray, str]:
        if not isinstance(record, Mapping):
            raise AudioReadError(f"item {index} is a {type(record).__name__}, not a record")
        audio, text = record.get(self.audio_field), record.get(self.text_field)
        text = text if isinstance(text, str) else ""  # no transcript: counted by `usable`
        if isinstance(audio, Mapping) and audio.get("array") is not None:
            if not audio.get("sampling_rate"):
                raise AudioReadError("audio array without a sampling_rate")
            return to_mono_16k(audio["array"], audio["sampling_rate"]), text
        if isinstance(audio, Mapping) and (audio.get("bytes") or audio.get("path")):
            return decode_audio(audio.get("bytes") or audio["path"]), text
        if isinstance(audio, (str, Path)):
            return decode_audio(audio), text
        raise AudioReadError(f"no audio in field {self.audio_field!r}")


class FileSource(RecordSource):
    """Local audio files and their transcripts: a list of (path, text); a None path is an
    item that cannot be read."""

    def __init__(self, items: Sequence[tuple[Path | None, str]]) -> None:
        super().__init__([{"audio": None if p is None else str(p), "text": t} for p, t in items])


class SynthSource(SpeechSource):
    """A split of the embedded eSpeak corpus (`speech_synth`), read from its memory map."""

    def __init__(self, folder: PathSpec, split: str) -> None:
        from giantpipe.platform.data.speech_synth import SynthSplit

        self.split = SynthSplit.load(folder, split)

    def items(self, counts: SkipCounts) -> Iterator[tuple[np.ndarray, str]]:
        for index in range(len(self.split)):
            audio, text = self.split[index]
            yield to_mono_16k(audio, self.split.sample_rate), text


def usable(source: SpeechSource, counts: SkipCounts, max_seconds: float | None = 30.0,
           silence_peak: float = 1e-3) -> Iterator[tuple[np.ndarray, str]]:
    """(audio, normalized transcript) of each usable item; skip (and count) unreadable (samples
    that are NaN or infinite included), empty, silent (peak below `silence_peak` of full scale)
    and overlong audio, and items without transcript text."""
    for audio, text in source.items(counts):
        if audio.size == 0:
            counts.empty += 1
        elif not np.isfinite(audio).all():
            counts.unreadable += 1
        elif float(np.abs(audio).max()) < silence_peak:
            counts.silent += 1
        elif max_seconds is not None and audio.size > max_seconds * SAMPLE_RATE:
            counts.too_long += 1
        elif not (text := normalize_transcript(text)):
            counts.no_text += 1
        else:
            yield audio, text


def read_transcripts(path: PathSpec, audio_dir: PathSpec | None = None,
                     text_field: str = "text") -> FileSource:
    """Audio files listed in `path`, resolved against `audio_dir` (default: the file's folder).

    Formats: `.jsonl` records and `.csv` with a header (HF audiofolder's `metadata.csv`), the
    file under `file_name`, `audio` or `path` and the transcript under `text_field`; any other
    file has one `name transcript` line per item (LibriSpeech `*.trans.txt`, Kaldi `text`),
    where a name without a suffix is tried with .wav, .flac, .ogg and .mp3. A line that cannot
    be an item (not UTF-8, bad JSON, not a record, no usable file name) stays in the source as
    an item without audio, so `scan` skips and counts it as unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"transcript file {path} does not exist" if not path.exists()
                         else f"transcript file {path} is not a file")
    root = Path(audio_dir) if audio_dir is not None else path.parent
    raw = path.read_bytes()
    if path.suffix == ".csv":
        items = [_item(root, r.get("file_name") or r.get("audio") or r.get("path"), r.get(text_field))
                 if r is not None else None for r in _csv_rows(raw)]
    else:
        items = []
        for line in raw.splitlines():
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError:
                items.append(None)
                continue
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError):
                    row = None
                items.append(_item(root, next((row.get(k) for k in ("file_name", "audio", "path") if row.get(k)),
                                              None), row.get(text_field))
                             if isinstance(row, dict) else None)
            else:
                parts = line.strip().split(None, 1)
                items.append(_item(root, parts[0], parts[1] if len(parts) > 1 else ""))
    return FileSource([it or (None, "") for it in items])


def _csv_rows(raw: bytes):
    """Rows of a CSV file with a header as dicts; None for a row the csv module rejects (an
    overlong field, say). Bytes that are not UTF-8 survive as surrogates, caught by `_item`."""
    reader = csv.DictReader(io.StringIO(raw.decode("utf-8", "surrogateescape"), newline=""))
    while True:
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error:
            yield None


def _item(root: Path, name: object, text: object) -> tuple[Path, str] | None:
    """(audio path, transcript) of a transcript row, or None if it names no usable file."""
    if not isinstance(name, str) or not name or "\0" in name or not is_unicode(name):
        return None
    try:
        path = _resolve(root, name)
    except (OSError, ValueError):  # a name too long for the file system
        return None
    return path, text if isinstance(text, str) and is_unicode(text) else ""


def _resolve(root: Path, name: str) -> Path:
    path = root / name
    if path.suffix.lower() in AUDIO_SUFFIXES or path.exists():
        return path
    return next((p for s in AUDIO_SUFFIXES if (p := path.with_name(path.name + s)).exists()), path)


def read_hf(name: str, config: str | None, split: str, audio_field: str = "audio",
            text_field: str = "text", streaming: bool = False, **load_kwargs) -> RecordSource:
    """A split of a Hugging Face speech dataset; audio stays encoded until an item is read."""
    import datasets

    from giantpipe.platform.data.hf import load_split

    ds = load_split(name, config, split, streaming, **load_kwargs)
    if isinstance((ds.features or {}).get(audio_field), datasets.Audio):
        ds = ds.cast_column(audio_field, datasets.Audio(decode=False))
    return RecordSource(ds, audio_field, text_field)


def load_sources(source: str = "default", *, files: PathSpec | Mapping[str, PathSpec] | None = None,
                 audio_dir: PathSpec | None = None, hf_name: str | None = None,
                 hf_config: str | None = None, hf_splits: Mapping[str, str] | None = None,
                 streaming: bool = False, audio_field: str = "audio", text_field: str = "text",
                 train_size: int = 4000,
                 val_size: int = 300, test_size: int = 300, seed: int = 0,
                 noise_prob: float = 0.5, cache_dir: PathSpec | None = None
                 ) -> dict[str, SpeechSource]:
    """One source per split from "default" (eSpeak corpus), "files" or "hf"."""
    if source == "default":
        from giantpipe.platform.data.cache import cache_root
        from giantpipe.platform.data.speech_synth import default_speech_corpus

        folder = default_speech_corpus(cache_root(cache_dir) / "speech", train_size, val_size, test_size, seed,
                                       noise_prob)
        return {s: SynthSource(folder, s) for s in SPLITS}
    if source == "files":
        if files is None:
            raise ValueError("source='files' needs `files`: a transcript file per split, e.g. "
                             "files={'train': 'train/trans.txt', 'test': 'test/trans.txt'}")
        files = files if isinstance(files, Mapping) else {"train": files}
        sources = {s: read_transcripts(p, audio_dir, text_field) for s, p in files.items()}
    elif source == "hf":
        if hf_name is None:
            raise ValueError("source='hf' needs `hf_name`, e.g. hf_name='openslr/librispeech_asr'")
        from giantpipe.platform.data.hf import HF_SPLITS

        sources = {s: read_hf(hf_name, hf_config, name, audio_field, text_field, streaming)
                   for s, name in (hf_splits or HF_SPLITS).items()}
    else:
        raise ValueError(f"unknown speech source {source!r}; use 'default', 'files' or 'hf'")
    unknown = set(sources) - set(SPLITS)
    if unknown or "train" not in sources:
        raise ValueError(f"speech splits must include 'train' and be among {SPLITS}, "
                         f"got {sorted(sources)}")
    return sources


