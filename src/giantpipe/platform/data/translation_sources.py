"""Where translation pairs come from: the embedded default corpus, Hugging Face, local files.

Every reader returns (pairs, SkipCounts): lines that are empty, longer than `max_words` (or
`MAX_CHARS_PER_WORD` characters a word), not valid UTF-8 (lone surrogates from JSON escapes
included), or malformed (bad JSON, missing language, not a string, wrong column count) are
skipped and counted by kind, so the platform can log what a corpus lost. What cannot be
skipped line by line (a .json array that is not valid JSON, a missing file) is a ValueError
naming the file. Local formats: json (an
array of records) and jsonl in the Hugging Face translation schema
`{"translation": {"en": ..., "de": ...}}` (flat `{"en": ..., "de": ...}` is accepted too),
tsv (`src<TAB>tgt`) and parallel text (a source file and a target file, line by line).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from giantpipe.platform.data.verbalization_corpus import CORPUS_VERSION, generate_pairs

Pair = tuple[str, str]
SPLITS = ("train", "validation", "test")
MAX_CHARS_PER_WORD = 40  # with max_words: a "sentence" of one 100k-character token is too long


@dataclass
class SkipCounts:
    """How many records a reader skipped, by reason."""

    empty: int = 0
    too_long: int = 0
    undecodable: int = 0
    malformed: int = 0

    @property
    def total(self) -> int:
        return self.empty + self.too_long + self.undecodable + self.malformed

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def __add__(self, other: SkipCounts) -> SkipCounts:
        return SkipCounts(**{k: getattr(self, k) + getattr(other, k) for k in self.as_dict()})


def clean(text: str) -> str:
    """Collapse runs of whitespace (tabs, newlines, no-break spaces) into single spaces."""
    return " ".join(text.split())


class _Filter:
    """Applies the empty / too-long checks and counts what it drops."""

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
        if not _is_unicode(src) or not _is_unicode(tgt):
            self.counts.undecodable += 1
            return None
        if self.max_words is not None and (
            max(len(src.split()), len(tgt.split())) > self.max_words
            or max(len(src), len(tgt)) > self.max_words * MAX_CHARS_PER_WORD
        ):
            self.counts.too_long += 1
            return None
        return src, tgt


def _is_unicode(text: str) -> bool:
    """False for strings holding lone surrogates (JSON's "\\ud800"): no tokenizer takes them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _decoded_lines(path: Path, counts: SkipCounts) -> Iterator[str | None]:
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


def read_records(records: Iterable[object], src_lang: str, tgt_lang: str,
                 max_words: int | None = 250) -> tuple[list[Pair], SkipCounts]:
    """Pairs from already-parsed records (dicts), e.g. a Hugging Face dataset."""
    counts = SkipCounts()
    keep, pairs = _Filter(max_words, counts), []
    for record in records:
        fields = _from_record(record, src_lang, tgt_lang)
        if fields is None:
            counts.malformed += 1
        elif (pair := keep(*fields)) is not None:
            pairs.append(pair)
    return pairs, counts


def read_json(path: str | Path, src_lang: str, tgt_lang: str,
              max_words: int | None = 250) -> tuple[list[Pair], SkipCounts]:
    """A .jsonl file (one record a line) or a .json file holding a list of records."""
    path = Path(path)
    if path.suffix == ".json" and _first_char(path) == "[":
        try:
            records = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise ValueError(f"translation file {path} is not a valid JSON array of records ({err}); "
                             "fix it, or write one record a line as .jsonl so bad lines are skipped") from None
        return read_records(records, src_lang, tgt_lang, max_words)
    counts = SkipCounts()
    keep, pairs = _Filter(max_words, counts), []
    for line in _decoded_lines(path, counts):
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
            pairs.append(pair)
    return pairs, counts


def read_tsv(path: str | Path, max_words: int | None = 250) -> tuple[list[Pair], SkipCounts]:
    """`source<TAB>target` lines; any other column count is malformed."""
    counts = SkipCounts()
    keep, pairs = _Filter(max_words, counts), []
    for line in _decoded_lines(Path(path), counts):
        if line is None:
            continue
        if not line.strip():
            counts.empty += 1
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            counts.malformed += 1
        elif (pair := keep(*fields)) is not None:
            pairs.append(pair)
    return pairs, counts


def read_parallel(src_path: str | Path, tgt_path: str | Path,
                  max_words: int | None = 250) -> tuple[list[Pair], SkipCounts]:
    """Line i of the source file translates to line i of the target file."""
    for path in (src_path, tgt_path):
        _check_file(Path(path))
    src_lines = list(_decoded_lines(Path(src_path), SkipCounts()))
    tgt_lines = list(_decoded_lines(Path(tgt_path), SkipCounts()))
    if len(src_lines) != len(tgt_lines):
        raise ValueError(f"parallel files differ in length: {src_path} has {len(src_lines)} lines, "
                         f"{tgt_path} has {len(tgt_lines)}; they must align line by line")
    counts = SkipCounts()  # a pair with a line that is not UTF-8 on either side counts once
    keep, pairs = _Filter(max_words, counts), []
    for src, tgt in zip(src_lines, tgt_lines):
        if src is None or tgt is None:
            counts.undecodable += 1
        elif (pair := keep(src, tgt)) is not None:
            pairs.append(pair)
    return pairs, counts


def read_files(paths: str | Path | Sequence[str | Path], src_lang: str, tgt_lang: str,
               max_words: int | None = 250) -> tuple[list[Pair], SkipCounts]:
    """Dispatch on the path: [src, tgt] -> parallel text; .json/.jsonl -> records; .tsv -> tsv."""
    if not isinstance(paths, (str, Path)):
        if len(paths) != 2:
            raise ValueError(f"give one json/jsonl/tsv file or a [source, target] pair, got {paths}")
        return read_parallel(paths[0], paths[1], max_words)
    path = Path(paths)
    _check_file(path)
    if path.suffix in (".json", ".jsonl"):
        return read_json(path, src_lang, tgt_lang, max_words)
    if path.suffix == ".tsv":
        return read_tsv(path, max_words)
    raise ValueError(f"cannot tell the format of {path}: use .json, .jsonl, .tsv, or a "
                     f"[source, target] pair of parallel text files")


def read_hf(name: str, config: str | None, split: str, src_lang: str, tgt_lang: str,
            max_words: int | None = 250, **load_kwargs) -> tuple[list[Pair], SkipCounts]:
    """A split of a Hugging Face translation dataset (e.g. "wmt16", "de-en", "train")."""
    import datasets

    ds = datasets.load_dataset(name, config, split=split, **load_kwargs)
    return read_records(ds, src_lang, tgt_lang, max_words)


def split_pairs(pairs: Sequence[Pair], val_size: int, test_size: int,
                seed: int = 0) -> dict[str, list[Pair]]:
    """Shuffle by `seed`, cut off `test_size` and `val_size` distinct source sentences for the
    test and validation splits; equal sources never straddle two splits."""
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


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ValueError(f"translation file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"translation file {path} is not a file")


def _first_char(path: Path) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read(64).lstrip()[:1]
