"""Speech data for LAS: sources, log-mel features, SpecAugment, graphemes, batches.

    prepare_speech(source="default")                          # the embedded eSpeak corpus
    prepare_speech(source="files", files={"train": "train/trans.txt", "test": [...]})
    prepare_speech(source="hf", hf_name="openslr/librispeech_asr", hf_config="clean")

Sources follow the Hugging Face speech schema `{"audio": {"array", "sampling_rate"}, "text"}`
(undecoded `{"bytes", "path"}` audio is decoded with soundfile, so no torchcodec is needed) or
local audio files listed in a transcript file. Audio is read lazily: one scan decodes every item
once, skipping and counting silent, empty, unreadable or overlong audio and empty transcripts.
Features are 80-dim log-mel frames (25 ms window, 10 ms hop: T = 1 + samples // 160 at 16 kHz),
normalized per utterance or with the training set's global mean and variance; training items
get SpecAugment. A batch (`SpeechCollator`) holds `features` (B,T,80), `feat_len` (B,),
`tgt_in` (B,U) = bos + y, `tgt_out` (B,U) = y + eos, `tgt_len` (B,) and `index` (B,).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

SAMPLE_RATE = 16_000
SPLITS = ("train", "validation", "test")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
PathSpec = str | Path


# --- reading audio ---------------------------------------------------------------------------
class AudioReadError(Exception):
    """An item whose audio cannot be read or decoded."""


@dataclass
class AudioSkipCounts:
    """How many items a scan skipped, by reason."""

    silent: int = 0
    empty: int = 0
    unreadable: int = 0
    too_long: int = 0
    no_text: int = 0

    @property
    def total(self) -> int:
        return sum(self.as_dict().values())

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def __add__(self, other: AudioSkipCounts) -> AudioSkipCounts:
        return AudioSkipCounts(**{k: getattr(self, k) + getattr(other, k) for k in self.as_dict()})


def to_mono_16k(array, sampling_rate: int) -> np.ndarray:
    """float32 mono samples at 16 kHz (channels averaged; integer PCM scaled to [-1, 1]).
    AudioReadError for what is not audio: non-numeric or >2-D arrays, a rate that is not a
    positive whole number of Hz."""
    try:
        audio = np.asarray(array)
    except (ValueError, TypeError) as e:  # ragged lists
        raise AudioReadError(f"audio array is not numeric ({e})") from None
    if audio.dtype.kind not in "iufb" or audio.ndim not in (1, 2):
        raise AudioReadError(f"audio array of dtype {audio.dtype} and shape {audio.shape} is not "
                             "(samples,) or (samples, channels) of numbers")
    if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, (int, float, np.number)) \
            or not math.isfinite(sampling_rate) or sampling_rate < 1 or sampling_rate != int(sampling_rate):
        raise AudioReadError(f"sampling rate {sampling_rate!r} is not a positive whole number of Hz")
    if audio.dtype.kind in "iu":
        audio = audio.astype(np.float32) / float(np.iinfo(audio.dtype).max + 1)
    audio = audio.astype(np.float32, copy=False)
    if audio.ndim == 2:  # soundfile: (samples, channels)
        audio = audio.mean(axis=1 if audio.shape[1] <= audio.shape[0] else 0)
    if sampling_rate != SAMPLE_RATE and audio.size:
        from scipy.signal import resample_poly

        g = math.gcd(SAMPLE_RATE, int(sampling_rate))
        audio = resample_poly(audio, SAMPLE_RATE // g, int(sampling_rate) // g).astype(np.float32)
    return audio


def decode_audio(data: bytes | PathSpec) -> np.ndarray:
    """Decode a file or encoded bytes (wav, flac, ogg, mp3) to float32 mono 16 kHz;
    AudioReadError if it cannot be read, or is a WAV file shorter than its header says."""
    import soundfile as sf

    try:
        if not isinstance(data, bytes):
            data = Path(data).read_bytes()  # OSError (missing, a folder) -> unreadable
        truncated = _wav_truncation(data)
        if truncated:
            raise AudioReadError(truncated)
        audio, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
    except AudioReadError:
        raise
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, OSError, ...
        raise AudioReadError(str(e)) from e
    return to_mono_16k(audio, rate)


def _wav_truncation(data: bytes) -> str | None:
    """Why a RIFF/WAVE file is cut short (its data chunk promises more bytes than follow), else
    None. libsndfile would quietly decode the prefix of a half-downloaded file."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos = 12
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        if data[pos : pos + 4] == b"data":
            if size in (0, 0xFFFFFFFF):  # streamed: length unknown
                return None
            have = len(data) - pos - 8
            return f"truncated WAV: {size} bytes of audio announced, {have} present" if have < size else None
        pos += 8 + size + (size & 1)
    return "truncated WAV: no data chunk"


class SpeechSource(ABC):
    """Items (audio, transcript), read on demand; `load` raises AudioReadError if unreadable."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def load(self, index: int) -> tuple[np.ndarray, str]: ...


class RecordSource(SpeechSource):
    """Records in the HF schema: audio `{"array", "sampling_rate"}`, `{"bytes", "path"}` or a path."""

    def __init__(self, records: Sequence[Mapping], audio_field: str = "audio",
                 text_field: str = "text") -> None:
        self.records, self.audio_field, self.text_field = records, audio_field, text_field

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> tuple[np.ndarray, str]:
        record = self.records[index]
        if not isinstance(record, Mapping):
            raise AudioReadError(f"item {index} is a {type(record).__name__}, not a record")
        audio, text = record.get(self.audio_field), record.get(self.text_field)
        text = text if isinstance(text, str) else ""  # no transcript: scan counts it
        if isinstance(audio, Mapping) and audio.get("array") is not None:
            if not audio.get("sampling_rate"):
                raise AudioReadError("audio array without a sampling_rate")
            return to_mono_16k(audio["array"], audio["sampling_rate"]), text or ""
        if isinstance(audio, Mapping) and (audio.get("bytes") or audio.get("path")):
            return decode_audio(audio.get("bytes") or audio["path"]), text or ""
        if isinstance(audio, (str, Path)):
            return decode_audio(audio), text or ""
        raise AudioReadError(f"no audio in field {self.audio_field!r}")


class FileSource(RecordSource):
    """Local audio files and their transcripts: a list of (path, text); a None path is an
    item that cannot be read."""

    def __init__(self, items: Sequence[tuple[Path | None, str]]) -> None:
        super().__init__([{"audio": None if p is None else str(p), "text": t} for p, t in items])


class SynthSource(SpeechSource):
    """A split of the embedded eSpeak corpus (`speech_synth`)."""

    def __init__(self, folder: PathSpec, split: str) -> None:
        from giantpipe.platform.data.speech_synth import SynthSplit

        self.split = SynthSplit.load(folder, split)

    def __len__(self) -> int:
        return len(self.split)

    def load(self, index: int) -> tuple[np.ndarray, str]:
        audio, text = self.split[index]
        return to_mono_16k(audio, self.split.sample_rate), text


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
    if not isinstance(name, str) or not name or "\0" in name or not _is_unicode(name):
        return None
    try:
        path = _resolve(root, name)
    except (OSError, ValueError):  # a name too long for the file system
        return None
    return path, text if isinstance(text, str) and _is_unicode(text) else ""


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes (surrogateescape) or JSON's lone surrogates
        return False
    return True


def _resolve(root: Path, name: str) -> Path:
    path = root / name
    if path.suffix.lower() in AUDIO_SUFFIXES or path.exists():
        return path
    return next((p for s in AUDIO_SUFFIXES if (p := path.with_name(path.name + s)).exists()), path)


def read_hf(name: str, config: str | None, split: str, audio_field: str = "audio",
            text_field: str = "text", **load_kwargs) -> RecordSource:
    """A split of a Hugging Face speech dataset; audio stays encoded until an item is read."""
    import datasets

    ds = datasets.load_dataset(name, config, split=split, **load_kwargs)
    if isinstance(ds.features.get(audio_field), datasets.Audio):
        ds = ds.cast_column(audio_field, datasets.Audio(decode=False))
    return RecordSource(ds, audio_field, text_field)


@dataclass
class Scan:
    """What a source holds after filtering: kept indices, their sample counts and transcripts
    (normalized), and the skip counts."""

    indices: list[int] = field(default_factory=list)
    num_samples: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    skipped: AudioSkipCounts = field(default_factory=AudioSkipCounts)


def scan(source: SpeechSource, max_seconds: float | None = 30.0,
         silence_peak: float = 1e-3) -> Scan:
    """Decode every item once; skip (and count) unreadable (samples that are NaN or infinite
    included), empty, silent (peak below `silence_peak` of full scale) and overlong audio, and
    items without transcript text."""
    out = Scan()
    for i in range(len(source)):
        try:
            audio, text = source.load(i)
        except AudioReadError:
            out.skipped.unreadable += 1
            continue
        if audio.size == 0:
            out.skipped.empty += 1
        elif not np.isfinite(audio).all():
            out.skipped.unreadable += 1
        elif float(np.abs(audio).max()) < silence_peak:
            out.skipped.silent += 1
        elif max_seconds is not None and audio.size > max_seconds * SAMPLE_RATE:
            out.skipped.too_long += 1
        elif not (text := normalize_transcript(text)):
            out.skipped.no_text += 1
        else:
            out.indices.append(i)
            out.num_samples.append(int(audio.size))
            out.texts.append(text)
    return out


# --- features --------------------------------------------------------------------------------
def hz_to_mel(hz: np.ndarray, htk: bool = False) -> np.ndarray:
    """HTK: 2595 log10(1 + f/700); Slaney (librosa's default): linear to 1 kHz, log above."""
    hz = np.asarray(hz, dtype=np.float64)
    if htk:
        return 2595.0 * np.log10(1.0 + hz / 700.0)
    step, logstep = 200.0 / 3, math.log(6.4) / 27.0
    return np.where(hz >= 1000.0, 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / logstep,
                    hz / step)


def mel_to_hz(mel: np.ndarray, htk: bool = False) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    if htk:
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    step, logstep = 200.0 / 3, math.log(6.4) / 27.0
    return np.where(mel >= 15.0, 1000.0 * np.exp(logstep * (mel - 15.0)), mel * step)


def mel_frequencies(n_mels: int, fmin: float, fmax: float, htk: bool = False) -> np.ndarray:
    """`n_mels + 2` frequencies equally spaced in mel: band edges; [1:-1] are the centres."""
    return mel_to_hz(np.linspace(hz_to_mel(fmin, htk), hz_to_mel(fmax, htk), n_mels + 2), htk)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int = 80, fmin: float = 0.0,
                   fmax: float | None = None, htk: bool = False, slaney_norm: bool = True
                   ) -> Tensor:
    """Triangular mel filters (n_mels, n_fft // 2 + 1), as `librosa.filters.mel` builds them."""
    fmax = sample_rate / 2 if fmax is None else fmax
    fft_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_frequencies(n_mels, fmin, fmax, htk)
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_hz[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    if slaney_norm:  # equal area: each filter's weights sum to about 2 / bandwidth
        weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return torch.from_numpy(weights).float()


class LogMel(nn.Module):
    """Audio (samples,) at 16 kHz -> log-mel frames (1 + samples // hop, n_mels)."""

    def __init__(self, n_mels: int = 80, sample_rate: int = SAMPLE_RATE, window_ms: float = 25.0,
                 hop_ms: float = 10.0, n_fft: int | None = None, eps: float = 1e-6) -> None:
        super().__init__()
        self.win = int(round(sample_rate * window_ms / 1000))
        self.hop = int(round(sample_rate * hop_ms / 1000))
        self.n_fft = n_fft or 2 ** math.ceil(math.log2(self.win))
        self.n_mels, self.sample_rate, self.eps = n_mels, sample_rate, eps
        self.register_buffer("window", torch.hann_window(self.win), persistent=False)
        self.register_buffer("fbank", mel_filterbank(sample_rate, self.n_fft, n_mels),
                             persistent=False)

    def num_frames(self, num_samples: int) -> int:
        return 1 + num_samples // self.hop

    def forward(self, audio: Tensor) -> Tensor:
        spec = torch.stft(audio.float(), self.n_fft, self.hop, self.win, self.window, center=True,
                          pad_mode="constant", return_complex=True)
        power = spec.real.square() + spec.imag.square()  # (freq, frames)
        return torch.log(self.fbank @ power + self.eps).T.contiguous()


def normalize_utterance(feats_tf: Tensor, eps: float = 1e-5) -> Tensor:
    """Zero mean, unit variance per feature dimension over the utterance's frames."""
    mean = feats_tf.mean(0, keepdim=True)
    std = feats_tf.std(0, unbiased=False, keepdim=True)
    return (feats_tf - mean) / (std + eps)


class SpecAugment(nn.Module):
    """Frequency and time masks (Park et al. 2019) on (T, F) features; identity in eval mode.

    `freq_masks` bands of up to `freq_width` channels and `time_masks` spans of up to
    `time_width` frames (and at most `max_time_ratio` of the utterance) are set to `value`
    (0: the mean of normalized features).
    """

    def __init__(self, freq_masks: int = 2, freq_width: int = 27, time_masks: int = 2,
                 time_width: int = 40, max_time_ratio: float = 0.2, value: float = 0.0) -> None:
        super().__init__()
        self.freq_masks, self.freq_width = freq_masks, freq_width
        self.time_masks, self.time_width = time_masks, time_width
        self.max_time_ratio, self.value = max_time_ratio, value

    def forward(self, feats_tf: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """`generator` makes the masks a function of its seed (per-sample keyed masks)."""
        if not self.training:
            return feats_tf
        out = feats_tf.clone()
        frames, channels = out.shape
        max_t = min(self.time_width, int(self.max_time_ratio * frames))
        for dim, count, width, size in ((1, self.freq_masks, self.freq_width, channels),
                                        (0, self.time_masks, max_t, frames)):
            for _ in range(count):
                w = int(torch.randint(0, width + 1, (), generator=generator))
                if 0 < w < size:
                    start = int(torch.randint(0, size - w + 1, (), generator=generator))
                    out.narrow(dim, start, w).fill_(self.value)
        return out


# --- graphemes -------------------------------------------------------------------------------
def normalize_transcript(text: str) -> str:
    """Lowercase letters, apostrophes and single spaces: the grapheme model's alphabet."""
    text = unicodedata.normalize("NFKC", text or "").lower()
    kept = "".join(c if c.isalpha() or c == "'" else " " for c in text)
    return " ".join(kept.split())


class GraphemeVocab:
    """Characters with <pad>=0, <s> (bos)=1, </s> (eos)=2, <unk>=3."""

    SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    def __init__(self, chars: Sequence[str]) -> None:
        self.chars = list(chars)
        self.index = {c: i + len(self.SPECIALS) for i, c in enumerate(self.chars)}

    @classmethod
    def from_texts(cls, texts) -> GraphemeVocab:
        return cls(sorted({c for t in texts for c in normalize_transcript(t)}))

    @property
    def vocab_size(self) -> int:
        return len(self.SPECIALS) + len(self.chars)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(c, self.unk_id) for c in normalize_transcript(text)]

    def decode(self, ids) -> str:
        """Text of `ids`, cut at the first EOS; pad and bos are dropped, unk becomes '?'."""
        out = []
        for i in (int(i) for i in ids):
            if i == self.eos_id:
                break
            if i >= len(self.SPECIALS):
                out.append(self.chars[i - len(self.SPECIALS)])
            elif i == self.unk_id:
                out.append("?")
        return "".join(out)

    def decode_batch(self, batch) -> list[str]:
        return [self.decode(ids) for ids in batch]


# --- datasets and batches --------------------------------------------------------------------
@dataclass
class FeatureStats:
    """Global per-dimension mean and std of the training features."""

    mean: Tensor
    std: Tensor


class SpeechDataset(Dataset):
    """Scanned items as {features (T, n_mels), tgt (ids), index}; features computed on demand
    (`cache`: once, then kept in memory: about 100 MB per 1,000 utterances of 3 s at 80 mels)."""

    def __init__(self, source: SpeechSource, scanned: Scan, vocab: GraphemeVocab,
                 featurizer: LogMel, normalization: str = "utterance",
                 stats: FeatureStats | None = None, augment: SpecAugment | None = None,
                 cache: bool = False) -> None:
        if normalization not in ("utterance", "global", "none"):
            raise ValueError(f"normalization must be 'utterance', 'global' or 'none', "
                             f"got {normalization!r}")
        if normalization == "global" and stats is None:
            raise ValueError("global normalization needs the training set's FeatureStats")
        self.source, self.scanned, self.vocab, self.featurizer = source, scanned, vocab, featurizer
        self.normalization, self.stats, self.augment = normalization, stats, augment
        self.skipped = scanned.skipped
        self.cache: dict[int, Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.scanned.indices)

    def text(self, index: int) -> str:
        """The item's normalized transcript: the reference for WER."""
        return self.scanned.texts[index]

    def raw_features(self, index: int) -> Tensor:
        """Log-mel frames of item `index`; kept in memory after the first read when `cache`."""
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        audio, _ = self.source.load(self.scanned.indices[index])
        with torch.no_grad():
            feats = self.featurizer(torch.from_numpy(np.ascontiguousarray(audio)))
        if self.cache is not None:
            self.cache[index] = feats
        return feats

    def normalize(self, feats: Tensor) -> Tensor:
        if self.normalization == "utterance":
            return normalize_utterance(feats)
        if self.normalization == "global":
            return (feats - self.stats.mean) / self.stats.std
        return feats

    def features_of(self, audio: np.ndarray) -> Tensor:
        """Normalized features of any 16 kHz mono audio, as this split's items get them."""
        with torch.no_grad():
            return self.normalize(self.featurizer(torch.from_numpy(np.ascontiguousarray(audio))))

    def __getitem__(self, index: int) -> dict:
        with torch.no_grad():
            feats = self.normalize(self.raw_features(index))
            if self.augment is not None:
                feats = self.augment(feats)
        return {"features": feats, "tgt": self.vocab.encode(self.text(index)), "index": index}

    @property
    def lengths(self) -> list[int]:
        """Frames per item: what `BucketBatchSampler` sorts by."""
        return [self.featurizer.num_frames(n) for n in self.scanned.num_samples]

    def feature_stats(self, max_items: int = 1000) -> FeatureStats:
        """Mean and std of the raw log-mel features over (up to `max_items` evenly spaced) items."""
        picks = np.linspace(0, len(self) - 1, min(len(self), max_items)).round().astype(int)
        total, square, frames = 0.0, 0.0, 0
        for i in sorted(set(picks.tolist())):
            feats = self.raw_features(i).double()
            total, square = total + feats.sum(0), square + feats.square().sum(0)
            frames += feats.size(0)
        mean = total / frames
        std = (square / frames - mean.square()).clamp(min=1e-10).sqrt()
        return FeatureStats(mean.float(), std.float())


class SpeechCollator:
    """Items {features, tgt, index} -> a padded batch (see the module docstring)."""

    def __init__(self, pad_id: int, bos_id: int, eos_id: int) -> None:
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id

    def __call__(self, items: Sequence[dict]) -> dict[str, Tensor]:
        def pad(seqs, value):
            return torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=value)

        tgt_in = [torch.tensor([self.bos_id, *it["tgt"]], dtype=torch.long) for it in items]
        tgt_out = [torch.tensor([*it["tgt"], self.eos_id], dtype=torch.long) for it in items]
        return {
            "features": pad([it["features"] for it in items], 0.0),
            "feat_len": torch.tensor([it["features"].size(0) for it in items], dtype=torch.long),
            "tgt_in": pad(tgt_in, self.pad_id),
            "tgt_out": pad(tgt_out, self.pad_id),
            "tgt_len": torch.tensor([len(t) for t in tgt_in], dtype=torch.long),
            "index": torch.tensor([it.get("index", -1) for it in items], dtype=torch.long),
        }


@dataclass
class SpeechData:
    datasets: dict[str, SpeechDataset]
    vocab: GraphemeVocab
    skipped: dict[str, dict[str, int]]
    stats: FeatureStats | None = None

    def collator(self) -> SpeechCollator:
        return SpeechCollator(self.vocab.pad_id, self.vocab.bos_id, self.vocab.eos_id)


def load_sources(source: str = "default", *, files: PathSpec | Mapping[str, PathSpec] | None = None,
                 audio_dir: PathSpec | None = None, hf_name: str | None = None,
                 hf_config: str | None = None, hf_splits: Mapping[str, str] | None = None,
                 audio_field: str = "audio", text_field: str = "text", train_size: int = 4000,
                 val_size: int = 300, test_size: int = 300, seed: int = 0,
                 noise_prob: float = 0.5, cache_dir: PathSpec | None = None
                 ) -> dict[str, SpeechSource]:
    """One source per split from "default" (eSpeak corpus), "files" or "hf"."""
    if source == "default":
        from giantpipe.platform.data.speech_synth import default_speech_corpus

        cache = Path(cache_dir) if cache_dir is not None else Path(
            os.environ.get("GIANTPIPE_CACHE", Path.home() / ".cache" / "giantpipe"))
        folder = default_speech_corpus(cache / "speech", train_size, val_size, test_size, seed,
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
        hf_splits = hf_splits or {"train": "train", "validation": "validation", "test": "test"}
        sources = {s: read_hf(hf_name, hf_config, name, audio_field, text_field)
                   for s, name in hf_splits.items()}
    else:
        raise ValueError(f"unknown speech source {source!r}; use 'default', 'files' or 'hf'")
    unknown = set(sources) - set(SPLITS)
    if unknown or "train" not in sources:
        raise ValueError(f"speech splits must include 'train' and be among {SPLITS}, "
                         f"got {sorted(sources)}")
    return sources


def prepare_speech(*, n_mels: int = 80, normalization: str = "utterance",
                   spec_augment: SpecAugment | bool = True, max_seconds: float | None = 30.0,
                   units: str = "graphemes", vocab_size: int = 500, cache_features: bool = False,
                   **source) -> SpeechData:
    """Load and scan the splits (`source` kwargs as in `load_sources`), build the output units
    on the training transcripts (graphemes, or BPE wordpieces of `vocab_size`), and the
    datasets (SpecAugment on train only)."""
    sources = load_sources(**source)
    scans = {s: scan(src, max_seconds) for s, src in sources.items()}
    vocab = output_units(units, scans["train"].texts, vocab_size, source.get("cache_dir"))
    featurizer = LogMel(n_mels)
    augment = SpecAugment() if spec_augment is True else spec_augment or None
    train = SpeechDataset(sources["train"], scans["train"], vocab, featurizer, "none")
    stats = train.feature_stats() if normalization == "global" else None
    datasets = {s: SpeechDataset(src, scans[s], vocab, featurizer, normalization, stats,
                                 augment if s == "train" else None, cache_features)
                for s, src in sources.items()}
    if not len(datasets["train"]):
        raise ValueError(f"no usable training audio (skipped: {scans['train'].skipped.as_dict()})")
    return SpeechData(datasets, vocab, {s: d.skipped.as_dict() for s, d in datasets.items()}, stats)


def output_units(units: str, texts: Sequence[str], vocab_size: int, cache_dir: PathSpec | None):
    """The speller's vocabulary: `GraphemeVocab`, or cached BPE `Wordpieces` (same interface)."""
    if units == "graphemes":
        return GraphemeVocab.from_texts(texts)
    if units == "wordpieces":
        from giantpipe.platform.data.wordpieces import cached_wordpieces

        cache = Path(cache_dir) if cache_dir is not None else Path(
            os.environ.get("GIANTPIPE_CACHE", Path.home() / ".cache" / "giantpipe"))
        return cached_wordpieces(list(texts), cache / "wordpieces", vocab_size, "bpe", "speech")
    raise ValueError(f"units={units!r}: choose graphemes or wordpieces")
