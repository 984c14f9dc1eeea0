"""Translation data for Lightning: prepared once, cached, length-bucketed, resumable.

`prepare()` reads the configured source (the embedded corpus, local files or a Hugging Face
dataset), trains or loads the wordpieces and tokenizes every split; the result is pickled under
`cache_dir/translation/prepared/<key>` (the key hashes the settings and, for local files, their
sizes and modification times), so the pipeline's worker processes and `giantpipe-eval` load it
in a fraction of a second. Skipped pairs (empty, overlong, undecodable, malformed) are logged
per split. Batches come from `BucketBatchSampler` (similar lengths, shuffled order) through a
`ResumableLoader`, as in `TextDataModule`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from omegaconf import OmegaConf

from giantpipe.platform.config import ConfigError
from giantpipe.platform.data.buckets import BucketedLoaders, skip_summary
from giantpipe.platform.data.translation import (
    TranslationData,
    TranslationDataset,
    build_vocabularies,
    load_translation_splits,
)
from giantpipe.platform.data.translation_sources import SPLITS, SkipCounts
from giantpipe.platform.data.verbalization_corpus import CORPUS_VERSION
from giantpipe.platform.data.wordpieces import WORDPIECES_VERSION

log = logging.getLogger(__name__)
PREPARED_VERSION = 1


class TranslationDataModule(BucketedLoaders, pl.LightningDataModule):
    """Tokenized sentence pairs per split, wordpiece vocabularies, bucketed batch loaders.

    Args:
        cfg: the `data` config (TranslationDataConfig).
        batch_size: the global batch (all data-parallel replicas together).
        seed: the batch-order seed.
        min_eval_batch: the smallest evaluation batch per replica times replicas (a pipeline
            needs at least `micro_batches` sentences per replica).
    """

    def __init__(self, cfg, batch_size: int, seed: int, min_eval_batch: int = 1):
        super().__init__()
        self.cfg, self.batch_size, self.seed = cfg, batch_size, seed
        self.min_eval_batch = min_eval_batch
        self.data: TranslationData | None = None

    # ----------------------------------------------------------- preparation
    def prepare(self) -> TranslationData:
        """Load or build the tokenized splits; idempotent, safe before the trainer exists."""
        if self.data is not None:
            return self.data
        path = Path(self.cfg.cache_dir).expanduser() / "translation" / "prepared" / f"{self._key()}.pkl"
        if path.exists():
            with open(path, "rb") as f:
                self.data = pickle.load(f)
        else:
            self.data = self._build()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                pickle.dump(self.data, f)
            os.replace(tmp, path)  # atomic: concurrent ranks write identical files
        self._log_counts()
        return self.data

    def _source_kwargs(self) -> dict:
        cfg = self.cfg
        kwargs = dict(source=cfg.source, src_lang=cfg.src_lang, tgt_lang=cfg.tgt_lang,
                      seed=cfg.split_seed, val_size=cfg.val_size, test_size=cfg.test_size,
                      max_words=cfg.max_words)
        if cfg.source == "default":
            kwargs["size"] = cfg.size
        elif cfg.source == "files":
            kwargs["files"] = self._files()
        elif cfg.source == "hf":
            if not cfg.hf_name:
                raise ConfigError("data.source=hf needs data.hf_name, e.g. data.hf_name=wmt16 data.hf_config=de-en")
            kwargs.update(hf_name=cfg.hf_name, hf_config=cfg.hf_config,
                          hf_splits=OmegaConf.to_container(cfg.hf_splits))
        else:
            raise ConfigError(f"data.source={cfg.source!r}: choose default, files or hf")
        return kwargs

    def _files(self):
        """`paths` (one file or a [source, target] pair) or per-split paths, checked to exist."""
        cfg = self.cfg
        per_split = {s: list(cfg.get(f"{s}_paths") or []) for s in SPLITS}
        if any(per_split.values()):
            if cfg.paths or not per_split["train"]:
                raise ConfigError("give either data.paths (cut into splits) or data.train_paths "
                                  "(with data.validation_paths and data.test_paths), not both")
            files = {s: _one_spec(p, f"data.{s}_paths") for s, p in per_split.items() if p}
        elif cfg.paths:
            files = _one_spec(list(cfg.paths), "data.paths")
        else:
            raise ConfigError("data.source=files needs data.paths=[pairs.jsonl] (json/jsonl/tsv, or "
                              "[train.en,train.de] parallel text) or data.train_paths=[...]")
        specs = files.values() if isinstance(files, dict) else [files]
        missing = [p for spec in specs for p in ([spec] if isinstance(spec, str) else spec)
                   if not Path(p).exists()]
        if missing:
            raise ConfigError(f"translation files not found: {missing}")
        return files

    def _key(self) -> str:
        cfg = self.cfg
        fields = ("source", "src_lang", "tgt_lang", "hf_name", "hf_config", "size", "val_size",
                  "test_size", "max_words", "tokenizer", "vocab_size", "shared_vocab", "max_tokens",
                  "eval_max_tokens")
        blob = {f: str(cfg.get(f)) for f in fields}
        blob.update(hf_splits=str(cfg.hf_splits), split_seed=cfg.split_seed, versions=(
            PREPARED_VERSION, CORPUS_VERSION, WORDPIECES_VERSION))
        if cfg.source == "files":  # a changed file gets a new key
            files = self._files()
            specs = files.items() if isinstance(files, dict) else [("all", files)]
            blob["files"] = [(s, p, os.path.getsize(p), os.path.getmtime(p))
                             for s, spec in specs for p in ([spec] if isinstance(spec, str) else spec)]
        return hashlib.sha1(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]

    def _build(self) -> TranslationData:
        cfg = self.cfg
        try:
            splits = load_translation_splits(cache_dir=cfg.cache_dir, **self._source_kwargs())
        except ValueError as err:
            raise ConfigError(f"translation data: {err}") from None
        missing = [s for s in SPLITS if not splits.pairs.get(s)]
        if missing:
            raise ConfigError(f"translation data has no {', '.join(missing)} pairs; give them "
                              f"(data.{missing[0]}_paths) or let giantpipe cut them from data.paths")
        src_vocab, tgt_vocab = build_vocabularies(splits.pairs["train"], cfg.vocab_size, cfg.tokenizer,
                                                  cfg.shared_vocab, cfg.cache_dir)
        datasets = {s: TranslationDataset(p, src_vocab, tgt_vocab,
                                          cfg.max_tokens if s == "train" else cfg.eval_max_tokens)
                    for s, p in splits.pairs.items()}
        skipped = {s: (splits.skipped.get(s, SkipCounts()) + datasets[s].skipped).as_dict()
                   for s in datasets}
        return TranslationData(datasets, src_vocab, tgt_vocab, skipped)

    def _log_counts(self) -> None:
        for split, counts in self.data.skipped.items():
            log.info("translation %s: %d pairs%s", split, len(self.data.datasets[split]),
                     skip_summary(counts))

    # ----------------------------------------------------------- what the task needs
    @property
    def src_vocab(self):
        return self.prepare().src_vocab

    @property
    def tgt_vocab(self):
        return self.prepare().tgt_vocab

    def dataset(self, split: str) -> TranslationDataset:
        return self.prepare().datasets[_split_name(split)]

    def references(self, split: str) -> list[str]:
        """Reference translations of a split, by dataset index (the batches' `index`)."""
        return self.dataset(split).references

    # ----------------------------------------------------------- loaders
    def setup(self, stage: str | None = None) -> None:
        self.prepare()


def _split_name(split: str) -> str:
    return "validation" if split == "val" else split


def _one_spec(paths: list[str], key: str) -> str | list[str]:
    if len(paths) == 1:
        return paths[0]
    if len(paths) == 2:
        return paths
    raise ConfigError(f"{key}={paths}: give one json/jsonl/tsv file or a [source, target] pair "
                      f"of parallel text files")


def source_batches(lines: Sequence[str], src_vocab, batch_size: int, pad_id: int
                   ) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """Untranslated text -> (line numbers, {src, src_len}) batches of similar lengths.

    Empty lines get one <unk> so every line gets an output line."""
    ids = [src_vocab.encode(line.strip()) or [src_vocab.unk_id] for line in lines]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        seqs = [torch.tensor(ids[i], dtype=torch.long) for i in chunk]
        src = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=pad_id)
        yield chunk, {"src": src, "src_len": torch.tensor([len(s) for s in seqs])}
