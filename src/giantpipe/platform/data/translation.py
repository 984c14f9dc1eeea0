"""Translation data for seq2seq tasks: splits, wordpieces, tokenized datasets, batches, BLEU.

    prepare_translation(source="default")            # the embedded En->De verbalization corpus
    prepare_translation(source="files", files={"train": "train.jsonl", "validation": [...]})
    prepare_translation(source="hf", hf_name="wmt16", hf_config="de-en")

A batch (`TranslationCollator`) holds `src` (B,S) and `src_len` (B,), `tgt_in` (B,T) = bos + y,
`tgt_out` (B,T) = y + eos and `tgt_len` (B,) = |y| + 1, all padded with the pad id, and
`index` (B,): the items' positions in their dataset, to look up reference texts for BLEU.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import sacrebleu
import torch
from torch.utils.data import Dataset

from giantpipe.platform.data.translation_sources import (
    SPLITS,
    Pair,
    SkipCounts,
    default_corpus,
    read_files,
    read_hf,
    read_json,
    split_pairs,
)
from giantpipe.platform.data.wordpieces import Wordpieces, cached_wordpieces

Batch = dict[str, torch.Tensor]
PathSpec = str | Path | Sequence[str | Path]


def default_cache_dir() -> Path:
    """$GIANTPIPE_CACHE, else ~/.cache/giantpipe."""
    return Path(os.environ.get("GIANTPIPE_CACHE", Path.home() / ".cache" / "giantpipe"))


@dataclass
class TranslationSplits:
    pairs: dict[str, list[Pair]]
    skipped: dict[str, SkipCounts]


def load_translation_splits(
    source: str = "default",
    *,
    src_lang: str = "en",
    tgt_lang: str = "de",
    files: PathSpec | Mapping[str, PathSpec] | None = None,
    hf_name: str | None = None,
    hf_config: str | None = None,
    hf_splits: Mapping[str, str] | None = None,
    size: int = 40_000,
    seed: int = 0,
    val_size: int = 1000,
    test_size: int = 1000,
    max_words: int | None = 250,
    cache_dir: str | Path | None = None,
) -> TranslationSplits:
    """Train/val/test pairs from `source` ("default", "files" or "hf"), with skip counts per split.

    `files`: a mapping split -> path (json/jsonl/tsv, or [src, tgt] parallel text), or one such
    path that is cut into splits by `seed`, `val_size` and `test_size` (as is a Hugging Face
    dataset whose `hf_splits` name only "train").
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if source == "default":
        paths = default_corpus(cache / "translation", size, seed, val_size, test_size)
        # English and German on both sides: src_lang="de", tgt_lang="en" reverses the task
        loaded = {s: read_json(p, src_lang, tgt_lang, max_words) for s, p in paths.items()}
    elif source == "files":
        if files is None:
            raise ValueError("source='files' needs `files`: a path or a mapping split -> path")
        if isinstance(files, Mapping):
            loaded = {s: read_files(p, src_lang, tgt_lang, max_words) for s, p in files.items()}
        else:
            loaded = {"train": read_files(files, src_lang, tgt_lang, max_words)}
    elif source == "hf":
        if hf_name is None:
            raise ValueError("source='hf' needs `hf_name`, e.g. hf_name='wmt16' hf_config='de-en'")
        hf_splits = hf_splits or {"train": "train", "validation": "validation", "test": "test"}
        loaded = {s: read_hf(hf_name, hf_config, name, src_lang, tgt_lang, max_words)
                  for s, name in hf_splits.items()}
    else:
        raise ValueError(f"unknown translation source {source!r}; use 'default', 'files' or 'hf'")
    unknown = set(loaded) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split names {sorted(unknown)}; use {SPLITS}")
    pairs = {s: p for s, (p, _) in loaded.items()}
    skipped = {s: c for s, (_, c) in loaded.items()}
    for split in SPLITS:  # a split read from its own source must give pairs
        if split in pairs and not pairs[split] and (split == "train" or len(pairs) > 1):
            raise ValueError(f"no usable {split} pairs from source={source!r} "
                             f"(skipped: {skipped[split].as_dict()}){_named(files, split)}")
    if set(pairs) == {"train"}:
        pairs = split_pairs(pairs["train"], val_size, test_size, seed)
        skipped = {s: skipped["train"] if s == "train" else SkipCounts() for s in SPLITS}
    if not pairs.get("train"):
        raise ValueError(f"no training pairs from source={source!r} (skipped: "
                         f"{skipped.get('train', SkipCounts()).as_dict()})")
    return TranslationSplits(pairs, skipped)


def _named(files, split: str) -> str:
    """' in <file>' for the split's configured file(s), if any."""
    spec = files.get(split) if isinstance(files, Mapping) else files
    return f" in {spec}" if spec else ""


def build_vocabularies(train_pairs: Sequence[Pair], vocab_size: int = 1000, kind: str = "bpe",
                       shared: bool = True, cache_dir: str | Path | None = None
                       ) -> tuple[Wordpieces, Wordpieces]:
    """(source, target) wordpieces trained on the training split; shared: one for both sides."""
    cache = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "wordpieces"
    src_texts = [s for s, _ in train_pairs]
    tgt_texts = [t for _, t in train_pairs]
    if shared:
        vocab = cached_wordpieces(src_texts + tgt_texts, cache, vocab_size, kind, "shared")
        return vocab, vocab
    return (cached_wordpieces(src_texts, cache, vocab_size, kind, "src"),
            cached_wordpieces(tgt_texts, cache, vocab_size, kind, "tgt"))


class TranslationDataset(Dataset):
    """Tokenized pairs; pairs with more than `max_tokens` pieces on either side are skipped."""

    def __init__(self, pairs: Sequence[Pair], src_vocab: Wordpieces, tgt_vocab: Wordpieces,
                 max_tokens: int | None = None) -> None:
        src_ids = src_vocab.encode_batch([s for s, _ in pairs])
        tgt_ids = tgt_vocab.encode_batch([t for _, t in pairs])
        self.skipped = SkipCounts()
        self.src_ids: list[list[int]] = []
        self.tgt_ids: list[list[int]] = []
        self.references: list[str] = []
        for (_, tgt), s, t in zip(pairs, src_ids, tgt_ids):
            if not s or not t:
                self.skipped.empty += 1
            elif max_tokens is not None and max(len(s), len(t) + 1) > max_tokens:
                self.skipped.too_long += 1
            else:
                self.src_ids.append(s)
                self.tgt_ids.append(t)
                self.references.append(tgt)

    def __len__(self) -> int:
        return len(self.src_ids)

    def __getitem__(self, index: int) -> dict:
        return {"src": self.src_ids[index], "tgt": self.tgt_ids[index], "index": index}

    @property
    def lengths(self) -> list[int]:
        """Per item, the longer of source and target (with bos/eos): what bucketing sorts by."""
        return [max(len(s), len(t) + 1) for s, t in zip(self.src_ids, self.tgt_ids)]


class TranslationCollator:
    """Items {src, tgt, index} -> a padded batch of tensors (see the module docstring)."""

    def __init__(self, pad_id: int, bos_id: int, eos_id: int) -> None:
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id

    def __call__(self, items: Sequence[dict]) -> Batch:
        src = [torch.tensor(it["src"], dtype=torch.long) for it in items]
        tgt_in = [torch.tensor([self.bos_id, *it["tgt"]], dtype=torch.long) for it in items]
        tgt_out = [torch.tensor([*it["tgt"], self.eos_id], dtype=torch.long) for it in items]
        pad = self.pad_id

        def stack(seqs):
            return torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=pad)

        return {
            "src": stack(src),
            "src_len": torch.tensor([len(s) for s in src], dtype=torch.long),
            "tgt_in": stack(tgt_in),
            "tgt_out": stack(tgt_out),
            "tgt_len": torch.tensor([len(t) for t in tgt_in], dtype=torch.long),
            "index": torch.tensor([it.get("index", -1) for it in items], dtype=torch.long),
        }


@dataclass
class TranslationData:
    datasets: dict[str, TranslationDataset]
    src_vocab: Wordpieces
    tgt_vocab: Wordpieces
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)

    def collator(self) -> TranslationCollator:
        return TranslationCollator(self.tgt_vocab.pad_id, self.tgt_vocab.bos_id,
                                   self.tgt_vocab.eos_id)


def prepare_translation(*, vocab_size: int = 1000, tokenizer_kind: str = "bpe",
                        shared_vocab: bool = True, max_tokens: int | None = 128,
                        cache_dir: str | Path | None = None, **source) -> TranslationData:
    """Load splits (`source` kwargs as in `load_translation_splits`), train or load wordpieces
    on the train split, tokenize; `skipped` merges reader and token-length skips per split."""
    splits = load_translation_splits(cache_dir=cache_dir, **source)
    src_vocab, tgt_vocab = build_vocabularies(splits.pairs["train"], vocab_size, tokenizer_kind,
                                              shared_vocab, cache_dir)
    datasets = {s: TranslationDataset(p, src_vocab, tgt_vocab, max_tokens)
                for s, p in splits.pairs.items()}
    skipped = {s: (splits.skipped.get(s, SkipCounts()) + datasets[s].skipped).as_dict()
               for s in datasets}
    for split, dataset in datasets.items():
        if splits.pairs[split] and not len(dataset):
            raise ValueError(f"no usable {split} pairs: all {len(splits.pairs[split])} were dropped "
                             f"when tokenized (skipped: {skipped[split]}); raise data.max_tokens")
    return TranslationData(datasets, src_vocab, tgt_vocab, skipped)


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


def bleu_from_ids(hypothesis_ids: Iterable[Sequence[int]], references: Sequence[str],
                  vocab: Wordpieces, tokenize: str = "13a") -> BleuResult:
    """Detokenize hypotheses (cut at EOS) and score them against reference texts."""
    return corpus_bleu(vocab.decode_batch(hypothesis_ids), references, tokenize)
