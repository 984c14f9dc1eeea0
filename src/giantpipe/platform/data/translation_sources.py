"""Where translation pairs come from: the embedded default corpus, Hugging Face, local files.

Every reader is a generator of pairs that counts what it skips in a `SkipCounts` it is given:
lines that are empty, longer than `max_words` (or `MAX_CHARS_PER_WORD` characters a word), not
valid UTF-8 (lone surrogates from JSON escapes included), or malformed (bad JSON, missing
language, not a string, wrong column count). Readers stream: a corpus is never held in memory.
What cannot be skipped line by line (a .json array that is not valid JSON, a missing file,
parallel files of different lengths) is a ValueError naming the file. Local formats: json (an
array of records, read whole) and jsonl in the Hugging Face translation schema
`{"translation": {"en": ..., "de": ...}}` (flat `{"en": ..., "de": ...}` is accepted too),
tsv (`src<TAB>tgt`) and parallel text (a source file and a target file, line by line).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import zip_longest
from pathlib import Path

from giantpipe.platform.data.skips import SkipCounts
from giantpipe.platform.data.verbalization_corpus import CORPUS_VERSION, generate_pairs

Pair = tuple[str, str]
PathSpec = str | Path | Sequence[str | Path]
SPLITS = ("train", "validation", "test")
MAX_CHARS_PER_WORD = 40  # with max_words: a "sentence" of one 100k-character token is too long
PairStream = Callable[[SkipCounts], Iterator[Pair]]  # a fresh pass over a split, counting skips


def clean(text: str) -> str:
    """Collapse runs of whitespace (tabs, newlines, no-break spaces) into single spaces."""
    return " ".join(text.split())


class _Filter:
    """Applies the type / empty / undecodable / too-long checks and counts what it drops."""

    def __init__(self, max_words: int | None, counts: SkipCounts) -> None:
        self.max_words, self.counts = max_words, counts

    def __call__(self, src: object, tgt: object) -> Pair | None:
        if not isinstance(src, str) or not isinstance(tgt, str):
            self.counts.malformed += 1
            return None
        src, tgt = clean(src), clean(tgt)
        if not src or not tgt:
            self.counts.empty += 1
            return None
        if not is_unicode(src) or not is_unicode(tgt):
            self.counts.undecodable += 1
            return None
        if self.max_words is not None and (
            max(len(src.split()), len(tgt.split())) > self.max_words
            or max(len(src), len(tgt)) > self.max_words * MAX_CHARS_PER_WORD
        ):
            self.counts.too_long += 1
            return None
        return src, tgt


def is_unicode(text: str) -> bool:
    """False for strings holding lone surrogates (JSON's "\\ud800", or bytes kept by
    surrogateescape): no tokenizer takes them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def decoded_lines(path: Path, counts: SkipCounts) -> Iterator[str | None]:
    """Lines of a file as text; None (counted as undecodable) for a line that is not UTF-8."""
    with open(path, "rb") as f:
        for raw in f:
            try:
                yield raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                counts.undecodable += 1
                yield None


def _from_record(record: object, src_lang: str, tgt_lang: str) -> tuple[object, object] | None:
    if not isinstance(record, dict):
        return None
    inner = record.get("translation", record)
    if not isinstance(inner, dict) or src_lang not in inner or tgt_lang not in inner:
        return None
    return inner[src_lang], inner[tgt_lang]


def read_records(records: Iterable[object], src_lang: str, tgt_lang: str, max_words: int | None,
                 counts: SkipCounts) -> Iterator[Pair]:
    """Pairs from already-parsed records (dicts), e.g. a Hugging Face dataset."""
    keep = _Filter(max_words, counts)
    for record in records:
        fields = _from_record(record, src_lang, tgt_lang)
        if fields is None:
            counts.malformed += 1
        elif (pair := keep(*fields)) is not None:
            yield pair


def read_json(path: str | Path, src_lang: str, tgt_lang: str, max_words: int | None,
              counts: SkipCounts) -> Iterator[Pair]:
    """A .jsonl file (one record a line) or a .json file holding a list of records."""
    path = Path(path)
    if path.suffix == ".json" and _first_char(path) == "[":
        try:
            records = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise ValueError(f"translation file {path} is not a valid JSON array of records ({err}); "
                             "fix it, or write one record a line as .jsonl so bad lines are skipped") from None
        yield from read_records(records, src_lang, tgt_lang, max_words, counts)
        return
    keep = _Filter(max_words, counts)
    for line in decoded_lines(path, counts):
        if line is None:
            continue
        if not line.strip():
            counts.empty += 1
            continue
        try:
            fields = _from_record(json.loads(line), src_lang, tgt_lang)
        except (json.JSONDecodeError, RecursionError):  # bad JSON, or nested too deep
            fields = None
        if fields is None:
            counts.malformed += 1
        elif (pair := keep(*fields)) is not None:
            yield pair


def read_tsv(path: str | Path, max_words: int | None, counts: SkipCounts) -> Iterator[Pair]:
    """`source<TAB>target` lines; any other column count is malformed."""
    keep = _Filter(max_words, counts)
    for line in decoded_lines(Path(path), counts):
        if line is None:
            continue
        if not line.strip():
            counts.empty += 1
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            counts.malformed += 1
        elif (pair := keep(*fields)) is not None:
            yield pair


def read_parallel(src_path: str | Path, tgt_path: str | Path, max_words: int | None,
                  counts: SkipCounts) -> Iterator[Pair]:
    """Line i of the source file translates to line i of the target file; files of different
    lengths are a ValueError once the shorter one ends (before any training)."""
    for path in (src_path, tgt_path):
        check_file(Path(path))
    keep, lines = _Filter(max_words, counts), [0, 0]
    missing = object()
    sides = (decoded_lines(Path(src_path), SkipCounts()), decoded_lines(Path(tgt_path), SkipCounts()))
    for src, tgt in zip_longest(*sides, fillvalue=missing):
        lines[0] += src is not missing
        lines[1] += tgt is not missing
        if src is missing or tgt is missing:
            continue
        if src is None or tgt is None:  # a line that is not UTF-8 on either side counts once
            counts.undecodable += 1
        elif (pair := keep(src, tgt)) is not None:
            yield pair
    if lines[0] != lines[1]:
        raise ValueError(f"parallel files differ in length: {src_path} has {lines[0]} lines, "
                         f"{tgt_path} has {lines[1]}; they must align line by line")


def read_files(paths: PathSpec, src_lang: str, tgt_lang: str, max_words: int | None,
               counts: SkipCounts) -> Iterator[Pair]:
    """Dispatch on the path: [src, tgt] -> parallel text; .json/.jsonl -> records; .tsv -> tsv."""
    if not isinstance(paths, (str, Path)):
        if len(paths) != 2:
            raise ValueError(f"give one json/jsonl/tsv file or a [source, target] pair, got {paths}")
        return read_parallel(paths[0], paths[1], max_words, counts)
    path = Path(paths)
    check_file(path)
    if path.suffix in (".json", ".jsonl"):
        return read_json(path, src_lang, tgt_lang, max_words, counts)
    if path.suffix == ".tsv":
        return read_tsv(path, max_words, counts)
    raise ValueError(f"cannot tell the format of {path}: use .json, .jsonl, .tsv, or a "
                     f"[source, target] pair of parallel text files")


def read_hf(name: str, config: str | None, split: str, src_lang: str, tgt_lang: str,
            max_words: int | None, counts: SkipCounts, streaming: bool = False) -> Iterator[Pair]:
    """A split of a Hugging Face translation dataset (e.g. "wmt16", "de-en", "train")."""
    from giantpipe.platform.data.hf import load_split

    yield from read_records(load_split(name, config, split, streaming), src_lang, tgt_lang,
                            max_words, counts)


class Corpus:
    """The pairs of every split, one pass at a time (`pairs`), counting skips per split.

    `readers` maps a split to a fresh pass over its own source; a corpus read from one source
    that is cut into splits (`held_out` maps source-sentence hashes to "validation"/"test") has
    the single reader "all", whose pairs are routed by their source sentence."""

    def __init__(self, readers: Mapping[str, PairStream], held_out: dict[int, str] | None = None):
        self.readers, self.held_out = dict(readers), held_out

    @property
    def splits(self) -> tuple[str, ...]:
        return SPLITS if self.held_out is not None else tuple(s for s in SPLITS if s in self.readers)

    def pairs(self, counts: dict[str, SkipCounts]) -> Iterator[tuple[str, Pair]]:
        """(split, pair) for every kept pair; reader skips of a cut source count to train."""
        if self.held_out is None:
            for split, read in self.readers.items():
                yield from ((split, pair) for pair in read(counts[split]))
            return
        for pair in self.readers["all"](counts["train"]):
            yield self.held_out.get(_hash(pair[0]), "train"), pair

    def train_pairs(self, counts: SkipCounts) -> Iterator[Pair]:
        if self.held_out is None:
            yield from self.readers["train"](counts)
            return
        yield from (pair for split, pair in self.pairs({"train": counts}) if split == "train")

    @classmethod
    def cut(cls, read: PairStream, val_size: int, test_size: int, seed: int = 0) -> Corpus:
        """One source cut into splits: `test_size` and `val_size` distinct source sentences,
        drawn by `seed`, go to test and validation with every pair that has them (equal sources
        never straddle two splits). One pass hashes the sources (8 bytes each, not the text)."""
        import numpy as np

        hashes = np.unique(np.fromiter((_hash(s) for s, _ in read(SkipCounts())), np.uint64))
        if val_size + test_size >= len(hashes):
            raise ValueError(f"val_size + test_size = {val_size + test_size} leaves no training data "
                             f"from {len(hashes)} distinct source sentences")
        picked = np.random.default_rng(seed).permutation(hashes)[:test_size + val_size].tolist()
        return cls({"all": read}, {h: "test" if i < test_size else "validation"
                                   for i, h in enumerate(picked)})


def _hash(text: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def split_pairs(pairs: Sequence[Pair], val_size: int, test_size: int,
                seed: int = 0) -> dict[str, list[Pair]]:
    """In memory (the embedded corpus): shuffle by `seed`, cut off `test_size` and `val_size`
    distinct source sentences for test and validation; equal sources never straddle two splits."""
    by_src: dict[str, list[Pair]] = {}
    for pair in pairs:
        by_src.setdefault(pair[0], []).append(pair)
    groups = list(by_src.values())
    if val_size + test_size >= len(groups):
        raise ValueError(f"val_size + test_size = {val_size + test_size} leaves no training data "
                         f"from {len(groups)} distinct source sentences")
    random.Random(seed).shuffle(groups)
    parts = {"test": groups[:test_size], "validation": groups[test_size:test_size + val_size],
             "train": groups[test_size + val_size:]}
    return {name: [p for g in parts[name] for p in g] for name in SPLITS}


def default_corpus(cache_dir: str | Path, size: int = 40_000, seed: int = 0, val_size: int = 1000,
                   test_size: int = 1000) -> dict[str, Path]:
    """Generate (once) and cache the embedded En->De corpus as HF-schema JSONL, one file a split."""
    folder = Path(cache_dir) / f"verbalization-v{CORPUS_VERSION}-n{size}-s{seed}-v{val_size}-t{test_size}"
    paths = {split: folder / f"{split}.jsonl" for split in SPLITS}
    if all(p.exists() for p in paths.values()):
        return paths
    splits = split_pairs(generate_pairs(size, seed), val_size, test_size, seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, path in paths.items():
        lines = (json.dumps({"translation": {"en": en, "de": de}}, ensure_ascii=False)
                 for en, de in splits[split])
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        os.replace(tmp, path)  # atomic: concurrent ranks write identical files
    return paths


def open_corpus(source: str = "default", *, src_lang: str = "en", tgt_lang: str = "de",
                   files: PathSpec | Mapping[str, PathSpec] | None = None,
                   hf_name: str | None = None, hf_config: str | None = None,
                   hf_splits: Mapping[str, str] | None = None, streaming: bool = False,
                   size: int = 40_000, seed: int = 0, val_size: int = 1000, test_size: int = 1000,
                   max_words: int | None = 250, cache_dir: Path | None = None
                   ) -> Corpus:
    """The pairs of each split from `source` ("default", "files" or "hf").

    `files`: a mapping split -> path (json/jsonl/tsv, or [src, tgt] parallel text), or one such
    path that is cut into splits by `seed`, `val_size` and `test_size` (as is a Hugging Face
    dataset whose `hf_splits` name only "train")."""
    from giantpipe.platform.data.cache import cache_root
    from giantpipe.platform.data.hf import HF_SPLITS

    if source == "default":
        paths = default_corpus(cache_root(cache_dir) / "translation", size, seed, val_size, test_size)
        # English and German on both sides: src_lang="de", tgt_lang="en" reverses the task
        per_split = {s: (lambda c, p=p: read_json(p, src_lang, tgt_lang, max_words, c))
                     for s, p in paths.items()}
    elif source == "files":
        if files is None:
            raise ValueError("source='files' needs `files`: a path or a mapping split -> path")
        specs = files if isinstance(files, Mapping) else {"train": files}
        per_split = {s: (lambda c, p=p: read_files(p, src_lang, tgt_lang, max_words, c))
                     for s, p in specs.items()}
    elif source == "hf":
        if hf_name is None:
            raise ValueError("source='hf' needs `hf_name`, e.g. hf_name='wmt16' hf_config='de-en'")
        per_split = {s: (lambda c, n=n: read_hf(hf_name, hf_config, n, src_lang, tgt_lang,
                                                max_words, c, streaming))
                     for s, n in (hf_splits or HF_SPLITS).items()}
    else:
        raise ValueError(f"unknown translation source {source!r}; use 'default', 'files' or 'hf'")
    unknown = set(per_split) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split names {sorted(unknown)}; use {SPLITS}")
    if set(per_split) == {"train"}:
        return Corpus.cut(per_split["train"], val_size, test_size, seed)
    return Corpus(per_split)


def check_file(path: Path) -> None:
    if not path.exists():
        raise ValueError(f"translation file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"translation file {path} is not a file")


def _first_char(path: Path) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read(64).lstrip()[:1]
