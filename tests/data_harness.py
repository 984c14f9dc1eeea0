"""Helpers the data tests share: run a streaming reader to a list, scan a speech source, and
read a corpus's splits into memory (small corpora only: production code never does)."""

from __future__ import annotations

from dataclasses import dataclass, field

from giantpipe.platform.data.skips import SkipCounts
from giantpipe.platform.data.speech_sources import SpeechSource, usable
from giantpipe.platform.data.translation_sources import SPLITS, open_corpus


def read(reader, *args, **kwargs) -> tuple[list, SkipCounts]:
    """(pairs, counts) of a streaming translation reader, e.g. read(read_tsv, path, max_words=5)."""
    kwargs.setdefault("max_words", 250)
    counts = SkipCounts()
    return list(reader(*args, counts=counts, **kwargs)), counts


@dataclass
class Splits:
    pairs: dict[str, list]
    skipped: dict[str, SkipCounts]


def load_splits(source: str = "default", **kwargs) -> Splits:
    """Every split's pairs and skip counts, in memory."""
    corpus = open_corpus(source, **kwargs)
    counts = {s: SkipCounts() for s in SPLITS}
    pairs = {s: [] for s in corpus.splits}
    for split, pair in corpus.pairs(counts):
        pairs[split].append(pair)
    for split in corpus.splits:
        if not pairs[split]:
            raise ValueError(f"no usable {split} pairs (skipped: {counts[split].as_dict()})")
    return Splits(pairs, {s: counts[s] for s in corpus.splits})


@dataclass
class Scan:
    """What `usable` keeps of a source: transcripts, sample counts, and the skip counts."""

    texts: list[str] = field(default_factory=list)
    num_samples: list[int] = field(default_factory=list)
    skipped: SkipCounts = field(default_factory=SkipCounts)


def scan(source: SpeechSource, max_seconds: float | None = 30.0) -> Scan:
    out = Scan()
    for audio, text in usable(source, out.skipped, max_seconds):
        out.texts.append(text)
        out.num_samples.append(int(audio.size))
    return out
