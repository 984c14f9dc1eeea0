"""Translation data for Lightning: prepared once on disk, memory-mapped, length-bucketed, resumable.

`prepare()` turns the `data` config into `prepare_translation`'s settings: the first process
tokenizes the corpus into `cache_dir/translation/prepared/<key>/`; every other process (pipeline
stages, `giantpipe-eval`, later runs and sweep jobs) opens the arrays in milliseconds. Skipped
pairs (empty, overlong, undecodable, malformed) are logged per split. Batches come from
`BucketBatchSampler` over the memory-mapped lengths through a `ResumableLoader`; a stage reads
only the columns it uses (see `BucketedLoaders`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from omegaconf import OmegaConf

from giantpipe.platform.config import ConfigError
from giantpipe.platform.data.buckets import BucketedLoaders
from giantpipe.platform.data.translation import (
    TranslationData,
    prepare_translation,
)
from giantpipe.platform.data.translation_sources import SPLITS

log = logging.getLogger(__name__)


class TranslationDataModule(BucketedLoaders, pl.LightningDataModule):
    """Tokenized sentence pairs per split, wordpiece vocabularies, bucketed batch loaders
    (`data.TranslationDataConfig`; arguments as `BucketedLoaders`)."""

    # ----------------------------------------------------------- preparation
    def prepare(self) -> TranslationData:
        """Prepare (first process) or open (any other) the tokenized splits; idempotent."""
        if self.data is not None:
            return self.data
        cfg = self.cfg
        try:
            data = prepare_translation(
                vocab_size=cfg.vocab_size, tokenizer_kind=cfg.tokenizer, shared_vocab=cfg.shared_vocab,
                max_tokens=cfg.max_tokens, eval_max_tokens=cfg.eval_max_tokens,
                tokenizer_sample=cfg.tokenizer_sample, cache_dir=Path(cfg.cache_dir).expanduser(),
                **self._source_kwargs())
        except ValueError as err:
            raise ConfigError(f"translation data: {err}") from None
        missing = [s for s in SPLITS if s not in data.datasets]
        if missing:
            raise ConfigError(f"translation data has no {', '.join(missing)} pairs; give them "
                              f"(data.{missing[0]}_paths) or let giantpipe cut them from data.paths")
        self.data = data
        self.log_counts("translation", "pairs")
        return data

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
            kwargs.update(hf_name=cfg.hf_name, hf_config=cfg.hf_config, streaming=cfg.streaming,
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

    # ----------------------------------------------------------- what the task needs
    @property
    def src_vocab(self):
        return self.prepare().src_vocab

    @property
    def tgt_vocab(self):
        return self.prepare().tgt_vocab

    def references(self, split: str):
        """Reference translations of a split, by dataset index (the batches' `index`)."""
        return self.dataset(split).references


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
