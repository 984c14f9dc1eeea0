"""Speech data for Lightning: prepared once on disk, memory-mapped, length-bucketed, resumable.

`prepare()` turns the `data` config into `prepare_speech`'s settings: the first process reads
the configured source (the embedded eSpeak corpus, local transcript files or a Hugging Face
dataset, streamed or not) once, skipping and counting unreadable, empty, silent and overlong
audio and empty transcripts, and writes log-mel shards (or 16 kHz samples, with
`data.cache_features=false`) and transcripts to the cache; every other process opens them.
SpecAugment is the task's (keyed per sample, so every pipeline layout draws the same masks).
Batches come from `BucketBatchSampler` over the memory-mapped frame counts through a
`ResumableLoader`; evaluation batches are never smaller than a pipeline's micro-batch count.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
from omegaconf import OmegaConf

from giantpipe.platform.config import ConfigError
from giantpipe.platform.data.buckets import BucketedLoaders
from giantpipe.platform.data.speech import SpeechData, prepare_speech
from giantpipe.platform.data.speech_sources import SPLITS

log = logging.getLogger(__name__)


class SpeechDataModule(BucketedLoaders, pl.LightningDataModule):
    """Utterances per split, the output units, bucketed batch loaders
    (`data.SpeechDataConfig`; arguments as `BucketedLoaders`)."""

    def prepare(self) -> SpeechData:
        """Load and scan the splits; idempotent, safe before the trainer exists."""
        if self.data is None:
            try:
                cfg = self.cfg
                self.data = prepare_speech(n_mels=cfg.n_mels, normalization=cfg.normalization,
                                           max_seconds=cfg.max_seconds, units=cfg.units,
                                           vocab_size=cfg.vocab_size, precompute=cfg.cache_features,
                                           cache_dir=Path(cfg.cache_dir).expanduser(),
                                           **self._source_kwargs())
            except ValueError as err:
                raise ConfigError(f"speech data: {err}") from None
            missing = [s for s in SPLITS if s not in self.data.datasets or not len(self.data.datasets[s])]
            if missing:
                raise ConfigError(f"speech data has no usable {', '.join(missing)} utterances "
                                  f"(skipped: {self.data.skipped}); give data.{missing[0]}_paths")
            self.log_counts("speech", "utterances")
        return self.data

    def _source_kwargs(self) -> dict:
        cfg = self.cfg
        if cfg.source == "default":
            return dict(source="default", train_size=cfg.train_size, val_size=cfg.val_size,
                        test_size=cfg.test_size, seed=cfg.corpus_seed, noise_prob=cfg.noise_prob)
        if cfg.source == "files":
            files = {s: list(cfg.get(f"{s}_paths") or []) for s in SPLITS}
            if not files["train"]:
                raise ConfigError("data.source=files needs a transcript file per split: "
                                  "data.train_paths=[train/trans.txt] data.validation_paths=[...] "
                                  "data.test_paths=[...]")
            for split, paths in files.items():
                if len(paths) > 1:
                    raise ConfigError(f"data.{split}_paths={paths}: give one transcript file per split")
            missing = [p for paths in files.values() for p in paths if not Path(p).exists()]
            if missing:
                raise ConfigError(f"speech transcript files not found: {missing}")
            return dict(source="files", files={s: p[0] for s, p in files.items() if p},
                        audio_dir=cfg.audio_dir, text_field=cfg.text_field)
        if cfg.source == "hf":
            if not cfg.hf_name:
                raise ConfigError("data.source=hf needs data.hf_name, e.g. data=librispeech")
            return dict(source="hf", hf_name=cfg.hf_name, hf_config=cfg.hf_config,
                        hf_splits=OmegaConf.to_container(cfg.hf_splits), streaming=cfg.streaming,
                        audio_field=cfg.audio_field, text_field=cfg.text_field)
        raise ConfigError(f"data.source={cfg.source!r}: choose default, files or hf")

    # ----------------------------------------------------------- what the task needs
    @property
    def vocab(self):
        return self.prepare().vocab

    def references(self, split: str):
        """Normalized transcripts of a split, by dataset index (the batches' `index`)."""
        return self.dataset(split).texts
