"""Speech data for LAS prepared once into memory-mapped shards, and read batch by batch.

    prepare_speech(source="default")                          # the embedded eSpeak corpus
    prepare_speech(source="files", files={"train": "train/trans.txt", "test": [...]})
    prepare_speech(source="hf", hf_name="openslr/librispeech_asr", hf_config="clean")

Preparation reads every split's source once (`speech_sources.usable`: bad audio skipped and
counted) and writes, per kept utterance, its raw log-mel frames (float16; `precompute=False`:
its 16 kHz int16 samples, featurized per batch instead) and its normalized transcript into
ragged arrays under `cache_dir/speech/prepared/<key>/`, keyed by every setting that shapes
them; the output units are built on the training transcripts. Later processes open the shards
in milliseconds and share their pages. Features are normalized per utterance or with the
training set's global mean and variance when an item is read.

A batch (`SpeechCollator`) holds `features` (B,T,n_mels), `feat_len` (B,), `tgt_in` (B,U) =
bos + y, `tgt_out` (B,U) = y + eos, `tgt_len` (B,) and `index` (B,). A dataset that does not
read the audio (`with_source(False)`: pipeline stages after the first) gives `features` as
(B,0,n_mels) with the true `feat_len`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from giantpipe.platform.data.buckets import SourceColumn
from giantpipe.platform.data.cache import (
    build_once,
    cache_root,
    file_stamps,
    progress,
    settings_key,
)
from giantpipe.platform.data.features import FeatureStats, LogMel, normalize_utterance
from giantpipe.platform.data.graphemes import load_units, output_units, save_units
from giantpipe.platform.data.ragged import Ragged, RaggedWriter, TextColumn, write_texts
from giantpipe.platform.data.skips import SkipCounts
from giantpipe.platform.data.speech_sources import load_sources, read_transcripts, usable

PREPARED_VERSION = 1  # bump when the prepared layout changes: it keys the cache
NORMALIZATIONS = ("utterance", "global", "none")


class SpeechDataset(SourceColumn, Dataset):
    """One prepared split: features (or audio), transcripts and frame counts, memory-mapped."""

    def __init__(self, folder: Path, split: str, vocab, featurizer: LogMel,
                 normalization: str = "utterance", stats: FeatureStats | None = None) -> None:
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be 'utterance', 'global' or 'none', "
                             f"got {normalization!r}")
        if normalization == "global" and stats is None:
            raise ValueError("global normalization needs the training set's FeatureStats")
        self.precomputed = (folder / f"{split}.feats.json").exists()
        self.rows = Ragged(folder, f"{split}.feats" if self.precomputed else f"{split}.audio")
        self.texts = TextColumn(folder, f"{split}.text")
        self.lengths = np.load(folder / f"{split}.frames.npy", mmap_mode="r")
        """Frames per item: what `BucketBatchSampler` sorts by."""
        self.vocab, self.featurizer = vocab, featurizer
        self.normalization, self.stats = normalization, stats

    def __len__(self) -> int:
        return len(self.texts)

    def text(self, index: int) -> str:
        """The item's normalized transcript: the reference for WER."""
        return self.texts[index]

    def raw_features(self, index: int) -> Tensor:
        """Un-normalized log-mel frames (T, n_mels) of item `index`."""
        row = self.rows[index]
        if self.precomputed:
            return torch.from_numpy(row.astype(np.float32))
        with torch.no_grad():
            return self.featurizer(torch.from_numpy(row.astype(np.float32) / 32768.0))

    def normalize(self, feats: Tensor) -> Tensor:
        if self.normalization == "utterance":
            return normalize_utterance(feats)
        if self.normalization == "global":
            return (feats - self.stats.mean) / self.stats.std
        return feats

    def features_of(self, audio: np.ndarray) -> Tensor:
        """Normalized features of any 16 kHz mono audio, as this split's items get them."""
        with torch.no_grad():
            feats = self.featurizer(torch.from_numpy(np.ascontiguousarray(audio, np.float32)))
        return self.normalize(_float16_rounded(feats) if self.precomputed else feats)

    def __getitem__(self, index: int) -> dict:
        frames = int(self.lengths[index])
        if self.read_source:
            feats = self.normalize(self.raw_features(index))
        else:
            feats = torch.zeros(0, self.featurizer.n_mels)
        return {"features": feats, "feat_len": frames, "tgt": self.vocab.encode(self.text(index)),
                "index": index}


class SpeechCollator:
    """Items {features, feat_len, tgt, index} -> a padded batch (see the module docstring)."""

    def __init__(self, pad_id: int, bos_id: int, eos_id: int) -> None:
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id

    def __call__(self, items: Sequence[dict]) -> dict[str, Tensor]:
        def pad(seqs, value):
            return torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=value)

        tgt_in = [torch.tensor([self.bos_id, *it["tgt"]], dtype=torch.long) for it in items]
        tgt_out = [torch.tensor([*it["tgt"], self.eos_id], dtype=torch.long) for it in items]
        return {
            "features": pad([it["features"] for it in items], 0.0),
            "feat_len": torch.tensor([it.get("feat_len", it["features"].size(0)) for it in items],
                                     dtype=torch.long),
            "tgt_in": pad(tgt_in, self.pad_id),
            "tgt_out": pad(tgt_out, self.pad_id),
            "tgt_len": torch.tensor([len(t) for t in tgt_in], dtype=torch.long),
            "index": torch.tensor([it.get("index", -1) for it in items], dtype=torch.long),
        }


@dataclass
class SpeechData:
    datasets: dict[str, SpeechDataset]
    vocab: object  # GraphemeVocab or Wordpieces
    skipped: dict[str, dict[str, int]]
    stats: FeatureStats | None = None

    def collator(self) -> SpeechCollator:
        return SpeechCollator(self.vocab.pad_id, self.vocab.bos_id, self.vocab.eos_id)


def prepare_speech(*, n_mels: int = 80, normalization: str = "utterance",
                   max_seconds: float | None = 30.0, units: str = "graphemes",
                   vocab_size: int = 500, precompute: bool = True,
                   cache_dir: str | Path | None = None, **source) -> SpeechData:
    """Prepare (once) and open the splits; `source` kwargs as in `speech_sources.load_sources`."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be 'utterance', 'global' or 'none', got {normalization!r}")
    root = cache_root(cache_dir)
    shape = dict(n_mels=n_mels, max_seconds=max_seconds, units=units, vocab_size=vocab_size,
                 precompute=precompute)
    settings = {**shape, **{k: v for k, v in source.items() if k != "streaming"},
                "files": _file_stamps(source), "version": PREPARED_VERSION}
    folder = root / "speech" / "prepared" / settings_key(settings)
    build_once(folder, lambda tmp: _build(tmp, load_sources(cache_dir=root, **source), **shape))
    meta = json.loads((folder / "meta.json").read_text())
    vocab, featurizer = load_units(folder), LogMel(n_mels)
    stats = FeatureStats(*(torch.tensor(meta["stats"][k]) for k in ("mean", "std")))
    datasets = {s: SpeechDataset(folder, s, vocab, featurizer, normalization, stats)
                for s in meta["splits"]}
    return SpeechData(datasets, vocab, meta["skipped"], stats if normalization == "global" else None)


def _file_stamps(source: dict) -> list:
    """Size and time of the transcript files and of every audio file they list: an edited
    file gets a new cache key."""
    if source.get("source") != "files" or not source.get("files"):
        return []
    files = source["files"] if isinstance(source["files"], dict) else {"train": source["files"]}
    listed = [r["audio"] for path in files.values()
              for r in read_transcripts(path, source.get("audio_dir")).records
              if r["audio"] is not None and Path(r["audio"]).is_file()]
    return file_stamps([*files.values(), *listed])


def _build(folder: Path, sources: dict, *, n_mels: int, max_seconds: float | None, units: str,
           vocab_size: int, precompute: bool) -> None:
    featurizer, skipped = LogMel(n_mels), {}
    for split, source in sources.items():
        counts = SkipCounts()
        with progress(f"reading the {split} utterances") as advance:
            _write_split(folder, split, usable(source, counts, max_seconds), featurizer,
                         precompute, advance)
        skipped[split] = counts.as_dict()
    train_texts = TextColumn(folder, "train.text")
    if not len(train_texts):
        raise ValueError(f"no usable training audio (skipped: {skipped['train']})")
    save_units(output_units(units, list(train_texts), vocab_size), folder)
    train = SpeechDataset(folder, "train", None, featurizer, "none")
    stats = feature_stats(train)
    meta = {"splits": list(sources), "skipped": skipped,
            "stats": {"mean": stats.mean.tolist(), "std": stats.std.tolist()}}
    (folder / "meta.json").write_text(json.dumps(meta))


def _write_split(folder: Path, split: str, items, featurizer: LogMel, precompute: bool,
                 advance) -> None:
    name = f"{split}.feats" if precompute else f"{split}.audio"
    rows = (RaggedWriter(folder, name, np.float16, (featurizer.n_mels,)) if precompute
            else RaggedWriter(folder, name, np.int16))
    texts, frames = RaggedWriter(folder, f"{split}.text", np.uint8), []
    for audio, text in items:
        if precompute:
            with torch.no_grad():
                rows.extend([featurizer(torch.from_numpy(np.ascontiguousarray(audio))).numpy()])
        else:
            rows.extend([np.clip(np.round(audio * 32768.0), -32768, 32767)])
        write_texts(texts, [text])
        frames.append(featurizer.num_frames(audio.size))
        advance(1)
    rows.close()
    texts.close()
    np.save(folder / f"{split}.frames.npy", np.asarray(frames, np.int32))


def feature_stats(dataset: SpeechDataset, max_items: int = 1000) -> FeatureStats:
    """Mean and std of the raw log-mel features over (up to `max_items` evenly spaced) items."""
    picks = np.linspace(0, len(dataset) - 1, min(len(dataset), max_items)).round().astype(int)
    total, square, frames = 0.0, 0.0, 0
    for i in sorted(set(picks.tolist())):
        feats = dataset.raw_features(i).double()
        total, square = total + feats.sum(0), square + feats.square().sum(0)
        frames += feats.size(0)
    mean = total / frames
    std = (square / frames - mean.square()).clamp(min=1e-10).sqrt()
    return FeatureStats(mean.float(), std.float())


def _float16_rounded(feats: Tensor) -> Tensor:
    """Features as the shards store them, so `features_of` matches a prepared item."""
    return feats.half().float()
