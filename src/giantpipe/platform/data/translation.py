"""Translation data prepared once into memory-mapped token arrays, and read batch by batch.

    prepare_translation(source="default")            # the embedded En->De verbalization corpus
    prepare_translation(source="files", files={"train": "train.jsonl", "validation": [...]})
    prepare_translation(source="hf", hf_name="wmt16", hf_config="de-en", streaming=True)

Preparation streams the corpus (never a list of all pairs): wordpieces are trained on a
reservoir sample of at most `tokenizer_sample` training pairs, then every split is tokenized in
batches (`tokenizers` encodes a batch on all cores) into ragged arrays under
`cache_dir/translation/prepared/<key>/`, keyed by every setting that shapes them. Any later
process opens the arrays in milliseconds and shares their pages with every other process.

A batch (`TranslationCollator`) holds `src` (B,S) and `src_len` (B,), `tgt_in` (B,T) = bos + y,
`tgt_out` (B,T) = y + eos and `tgt_len` (B,) = |y| + 1, all padded with the pad id, and
`index` (B,): the items' positions in their dataset, to look up reference texts for BLEU.
A dataset that does not read the source (`with_source(False)`: pipeline stages after the
first) gives `src` as (B,0) with the true `src_len`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sacrebleu
import torch
from torch.utils.data import Dataset

from giantpipe.platform.data.buckets import SourceColumn
from giantpipe.platform.data.cache import (
    build_once,
    cache_root,
    file_stamps,
    progress,
    settings_key,
)
from giantpipe.platform.data.ragged import (
    Ragged,
    RaggedWriter,
    TextColumn,
    token_dtype,
    write_texts,
)
from giantpipe.platform.data.skips import SkipCounts
from giantpipe.platform.data.translation_sources import SPLITS, Corpus, Pair, open_corpus
from giantpipe.platform.data.verbalization_corpus import CORPUS_VERSION
from giantpipe.platform.data.wordpieces import WORDPIECES_VERSION, Wordpieces, train_wordpieces

Batch = dict[str, torch.Tensor]
PREPARED_VERSION = 2  # bump when the prepared layout changes: it keys the cache
CHUNK = 8192  # pairs tokenized per batch


class TranslationDataset(SourceColumn, Dataset):
    """One prepared split: token rows, reference texts and the bucketing lengths, memory-mapped."""

    def __init__(self, folder: Path, split: str) -> None:
        self.src_ids = Ragged(folder, f"{split}.src")
        self.tgt_ids = Ragged(folder, f"{split}.tgt")
        self.references = TextColumn(folder, f"{split}.ref")
        self.lengths = np.load(folder / f"{split}.lengths.npy", mmap_mode="r")
        """Per item, the longer of source and target (with bos/eos): what bucketing sorts by."""

    def __len__(self) -> int:
        return len(self.tgt_ids)

    def __getitem__(self, index: int) -> dict:
        if self.read_source:
            return {"src": self.src_ids[index], "tgt": self.tgt_ids[index], "index": index}
        start, stop = self.src_ids.bounds(index)
        return {"src": None, "src_len": stop - start, "tgt": self.tgt_ids[index], "index": index}


class TranslationCollator:
    """Items {src, src_len, tgt, index} -> a padded batch of tensors (see the module docstring)."""

    def __init__(self, pad_id: int, bos_id: int, eos_id: int) -> None:
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id

    def __call__(self, items: Sequence[dict]) -> Batch:
        tgt = [it["tgt"] for it in items]
        width = max(len(t) for t in tgt) + 1
        tgt_in = np.full((len(items), width), self.pad_id, np.int64)
        tgt_out = tgt_in.copy()
        for b, t in enumerate(tgt):  # rows filled in place: no tensor per item
            tgt_in[b, 0], tgt_in[b, 1:len(t) + 1] = self.bos_id, t
            tgt_out[b, :len(t)], tgt_out[b, len(t)] = t, self.eos_id
        if all(it.get("src") is not None for it in items):
            src_len = [len(it["src"]) for it in items]
            src = np.full((len(items), max(src_len)), self.pad_id, np.int64)
            for b, it in enumerate(items):
                src[b, :src_len[b]] = it["src"]
        else:
            src_len, src = [it["src_len"] for it in items], np.zeros((len(items), 0), np.int64)
        return {
            "src": torch.from_numpy(src),
            "src_len": torch.tensor(src_len, dtype=torch.long),
            "tgt_in": torch.from_numpy(tgt_in),
            "tgt_out": torch.from_numpy(tgt_out),
            "tgt_len": torch.tensor([len(t) + 1 for t in tgt], dtype=torch.long),
            "index": torch.tensor([it.get("index", -1) for it in items], dtype=torch.long),
        }


@dataclass
class TranslationData:
    datasets: dict[str, TranslationDataset]
    src_vocab: Wordpieces
    tgt_vocab: Wordpieces
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)
    folder: Path | None = None

    def collator(self) -> TranslationCollator:
        return TranslationCollator(self.tgt_vocab.pad_id, self.tgt_vocab.bos_id,
                                   self.tgt_vocab.eos_id)


def prepare_translation(*, vocab_size: int = 1000, tokenizer_kind: str = "bpe",
                        shared_vocab: bool = True, max_tokens: int | None = 128,
                        eval_max_tokens: int | None = None, tokenizer_sample: int = 500_000,
                        cache_dir: str | Path | None = None, **source) -> TranslationData:
    """Prepare (once) and open the tokenized splits; `source` as in `open_corpus`.

    `max_tokens` drops longer training pairs, `eval_max_tokens` validation/test pairs; the
    skip counts merge the reader's and the tokenizer's per split."""
    tokens = dict(vocab_size=vocab_size, tokenizer_kind=tokenizer_kind, shared_vocab=shared_vocab,
                  max_tokens=max_tokens, eval_max_tokens=eval_max_tokens,
                  tokenizer_sample=tokenizer_sample)
    root = cache_root(cache_dir)
    settings = {**tokens, **{k: v for k, v in source.items() if k != "streaming"},
                "files": _stamps(source.get("files")) if source.get("source") == "files" else None,
                "versions": (PREPARED_VERSION, CORPUS_VERSION, WORDPIECES_VERSION)}
    folder = root / "translation" / "prepared" / settings_key(settings)
    build_once(folder, lambda tmp: _build(tmp, open_corpus(cache_dir=root, **source), **tokens))
    return open_translation(folder)


def open_translation(folder: Path) -> TranslationData:
    """The prepared splits in `folder` (see `prepare_translation`), memory-mapped."""
    meta = json.loads((folder / "meta.json").read_text())
    src_vocab = Wordpieces.load(folder / "src_wordpieces.json")
    tgt_vocab = (Wordpieces.load(folder / "tgt_wordpieces.json")
                 if (folder / "tgt_wordpieces.json").exists() else src_vocab)
    datasets = {s: TranslationDataset(folder, s) for s in meta["splits"]}
    return TranslationData(datasets, src_vocab, tgt_vocab, meta["skipped"], folder)


def _stamps(files) -> list:
    if files is None:
        return []
    specs = files.values() if isinstance(files, dict) else [files]
    return file_stamps(p for spec in specs for p in ([spec] if isinstance(spec, (str, Path)) else spec))


def _build(folder: Path, corpus: Corpus, *, vocab_size: int, tokenizer_kind: str,
           shared_vocab: bool, max_tokens: int | None, eval_max_tokens: int | None,
           tokenizer_sample: int) -> None:
    with progress(f"sampling up to {tokenizer_sample} training pairs for the wordpieces"):
        sample = sample_pairs(corpus.train_pairs(counts := SkipCounts()), tokenizer_sample)
    if not sample:
        raise ValueError(f"no usable train pairs (skipped: {counts.as_dict()}); check the train source")
    with progress(f"training {tokenizer_kind} wordpieces ({vocab_size}) on {len(sample)} pairs"):
        src_vocab, tgt_vocab = build_vocabularies(sample, vocab_size, tokenizer_kind, shared_vocab)
    del sample
    src_vocab.save(folder / "src_wordpieces.json")
    if not shared_vocab:
        tgt_vocab.save(folder / "tgt_wordpieces.json")
    limits = {s: max_tokens if s == "train" else eval_max_tokens for s in SPLITS}
    counts = {s: SkipCounts() for s in SPLITS}
    writer = SplitWriter(folder, corpus.splits, src_vocab, tgt_vocab, limits, counts)
    with progress("tokenizing the corpus") as advance:
        for split, pair in corpus.pairs(counts):
            writer.add(split, pair, advance)
    kept = writer.close()
    for split in corpus.splits:
        if not kept[split]:
            raise ValueError(f"no usable {split} pairs (skipped: {counts[split].as_dict()}); "
                             f"check the {split} source, or raise data.max_tokens / data.max_words")
    meta = {"splits": list(corpus.splits), "sizes": kept,
            "skipped": {s: counts[s].as_dict() for s in corpus.splits}}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


def sample_pairs(pairs: Iterable[Pair], limit: int, seed: int = 0) -> list[Pair]:
    """A uniform reservoir sample of at most `limit` pairs; all of them, in order, if fewer."""
    rng, sample = random.Random(seed), []
    for n, pair in enumerate(pairs):
        if n < limit:
            sample.append(pair)
        elif (j := rng.randrange(n + 1)) < limit:
            sample[j] = pair
    return sample


def build_vocabularies(pairs: Sequence[Pair], vocab_size: int = 1000, kind: str = "bpe",
                       shared: bool = True) -> tuple[Wordpieces, Wordpieces]:
    """(source, target) wordpieces trained on `pairs`; shared: one for both sides."""
    src_texts = [s for s, _ in pairs]
    tgt_texts = [t for _, t in pairs]
    if shared:
        vocab = train_wordpieces(src_texts + tgt_texts, vocab_size, kind)
        return vocab, vocab
    return train_wordpieces(src_texts, vocab_size, kind), train_wordpieces(tgt_texts, vocab_size, kind)


class SplitWriter:
    """Tokenizes pairs in batches of `CHUNK` and appends them to each split's ragged arrays:
    `<split>.src`, `<split>.tgt` (ids), `<split>.ref` (target text) and `<split>.lengths.npy`.
    Pairs with an empty side or over the split's token limit are skipped and counted."""

    def __init__(self, folder: Path, splits: Sequence[str], src_vocab: Wordpieces,
                 tgt_vocab: Wordpieces, limits: dict[str, int | None],
                 counts: dict[str, SkipCounts]) -> None:
        self.folder, self.src_vocab, self.tgt_vocab = folder, src_vocab, tgt_vocab
        self.limits, self.counts = limits, counts
        dtype = token_dtype(max(src_vocab.vocab_size, tgt_vocab.vocab_size))
        self.writers = {s: (RaggedWriter(folder, f"{s}.src", dtype), RaggedWriter(folder, f"{s}.tgt", dtype),
                            RaggedWriter(folder, f"{s}.ref", np.uint8)) for s in splits}
        self.pending: dict[str, list[Pair]] = {s: [] for s in splits}
        self.lengths: dict[str, list[np.ndarray]] = {s: [] for s in splits}
        self.kept = {s: 0 for s in splits}

    def add(self, split: str, pair: Pair, advance=lambda n: None) -> None:
        self.pending[split].append(pair)
        if len(self.pending[split]) >= CHUNK:
            advance(CHUNK)
            self._flush(split)

    def _flush(self, split: str) -> None:
        pairs, self.pending[split] = self.pending[split], []
        if not pairs:
            return
        src_ids = self.src_vocab.encode_batch([s for s, _ in pairs])
        tgt_ids = self.tgt_vocab.encode_batch([t for _, t in pairs])
        limit, counts = self.limits[split], self.counts[split]
        keep = []
        for i, (s, t) in enumerate(zip(src_ids, tgt_ids)):
            if not s or not t:
                counts.empty += 1
            elif limit is not None and max(len(s), len(t) + 1) > limit:
                counts.too_long += 1
            else:
                keep.append(i)
        src_w, tgt_w, ref_w = self.writers[split]
        src_w.extend([src_ids[i] for i in keep])
        tgt_w.extend([tgt_ids[i] for i in keep])
        write_texts(ref_w, [pairs[i][1] for i in keep])
        self.lengths[split].append(np.array([max(len(src_ids[i]), len(tgt_ids[i]) + 1) for i in keep],
                                            np.int32))
        self.kept[split] += len(keep)

    def close(self) -> dict[str, int]:
        for split, writers in self.writers.items():
            self._flush(split)
            for w in writers:
                w.close()
            lengths = self.lengths[split]
            np.save(self.folder / f"{split}.lengths.npy",
                    np.concatenate(lengths) if lengths else np.zeros(0, np.int32))
        return self.kept


@dataclass
class BleuResult:
    score: float
    signature: str
    text: str  # sacrebleu's one-line summary


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str],
                tokenize: str = "13a") -> BleuResult:
    """Corpus BLEU of detokenized hypotheses against one reference each (sacrebleu)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    metric = sacrebleu.metrics.BLEU(tokenize=tokenize)
    result = metric.corpus_score(list(hypotheses), [list(references)])
    return BleuResult(result.score, str(metric.get_signature()), str(result))

