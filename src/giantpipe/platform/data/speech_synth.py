"""The embedded default speech corpus: English sentences read aloud by eSpeak NG, made offline.

The text is the English side of the translation corpus (`verbalization_corpus`: dates, times,
money, ordinals, measures in carrier sentences), rewritten in spoken form by `spoken_english`
("$12.50" -> "twelve dollars and fifty cents"), so the transcript is what the voice says and a
grapheme model can learn it. eSpeak NG comes from the `espeakng-loader` wheel (a self-contained
libespeak-ng and its voices, driven through ctypes; no system package). Speakers differ by
accent and voice variant, speaking rate, pitch and gain; half the utterances get white noise
at 10-30 dB SNR. Validation and test speakers are held out: their voice variants (and the
New York accent) never occur in training, so the test measures generalization to new voices.

eSpeak keeps state from one utterance to the next (its output depends on what it said before),
so utterances are synthesized in fixed chunks, each in a fresh subprocess: the corpus is then
identical for a given seed, wherever and however often it is generated. It is cached as
16 kHz int16: per split one `{split}.npy` (all utterances end to end) and a `{split}.json`
manifest (text, speaker, offsets). The default (4000/300/300 utterances, ~4 h) takes about a
minute to generate on two cores.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import numpy as np
from num2words import num2words

from giantpipe.platform.data.ragged import pread_array
from giantpipe.platform.data.verbalization_corpus import CORPUS_VERSION, generate_pairs

SYNTH_VERSION = 1  # bump when the audio or the spoken form changes: it keys the cache
SAMPLE_RATE = 16_000
SPLITS = ("train", "validation", "test")
CHUNK = 250  # utterances per synthesis subprocess: part of the corpus definition

TRAIN_ACCENTS = ("en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-029")
TRAIN_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "f1", "f2", "f3", "f4")
HELD_OUT_ACCENTS = ("en-us", "en-gb-x-rp", "en-us-nyc")
HELD_OUT_VARIANTS = ("m7", "f5")
TRAIN_VOICES = tuple(f"{a}+{v}" for a in TRAIN_ACCENTS for v in TRAIN_VARIANTS)
HELD_OUT_VOICES = tuple(f"{a}+{v}" for a in HELD_OUT_ACCENTS for v in HELD_OUT_VARIANTS)
RATE_WPM = (140, 210)
PITCH = (30, 70)


# --- spoken form -----------------------------------------------------------------------------
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
_ABBREVIATIONS = {m[:3]: m for m in MONTHS} | {"Sept": "September"}
_MONTH = "|".join(MONTHS)
_CURRENCY = {"$": ("dollar", "dollars", "cent", "cents"), "€": ("euro", "euros", "cent", "cents"),
             "£": ("pound", "pounds", "penny", "pence")}
_SUFFIX = r"\s*([ap])\.?\s?m\b\.?"


def _cardinal(n: int) -> str:
    return num2words(n, lang="en")


def _money(m: re.Match) -> str:
    one, many, one_cent, cents_word = _CURRENCY[m.group(1)]
    units, cents = int(m.group(2).replace(",", "")), int(m.group(3) or 0)
    words = [f"{_cardinal(units)} {one if units == 1 else many}"] if units or not cents else []
    if cents:
        words.append(f"{_cardinal(cents)} {one_cent if cents == 1 else cents_word}")
    return " and ".join(words)


def _clock(m: re.Match) -> str:
    hour, minute, suffix = int(m.group(1)), int(m.group(2)), m.group(3)
    if minute == 0:
        words = _cardinal(hour) if suffix else (
            f"{_cardinal(hour)} hundred" if hour == 0 or hour > 12 else f"{_cardinal(hour)} o'clock")
    else:
        words = f"{_cardinal(hour)} {'oh ' if minute < 10 else ''}{_cardinal(minute)}"
    return f"{words} {suffix.lower()} m" if suffix else words


def spoken_english(written: str) -> str:
    """How one reads an English sentence of the corpus aloud: lowercase words, no digits.

    >>> spoken_english("The pear costs £1,538.05 on Dec 18, 1998 at 5:07 p.m.")
    'the pear costs one thousand five hundred and thirty eight pounds and five pence on december eighteenth nineteen ninety eight at five oh seven p m'
    """
    text = written.replace("\xa0", " ")
    text = re.sub(r"\b(Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept|Sep|Oct|Nov|Dec)\b\.?",
                  lambda m: _ABBREVIATIONS[m.group(1)], text)
    text = re.sub(r"([$€£])\s?(\d[\d,]*)(?:\.(\d\d))?", _money, text)
    text = re.sub(rf"\b((?:{_MONTH})|\d{{1,2}}(?:st|nd|rd|th)?,|in)\s+(\d{{4}})\b",
                  lambda m: f"{m.group(1)} {num2words(int(m.group(2)), lang='en', to='year')}", text)
    text = re.sub(rf"\b(\d{{1,2}}):(\d\d)(?:{_SUFFIX})?", _clock, text, flags=re.I)
    text = re.sub(rf"\b(\d{{1,2}}){_SUFFIX}", lambda m: f"{_cardinal(int(m.group(1)))} "
                  f"{m.group(2).lower()} m", text, flags=re.I)
    text = re.sub(r"(\d+)%", lambda m: f"{m.group(1)} percent", text)
    text = re.sub(r"\b(\d+)(?:st|nd|rd|th)\b",
                  lambda m: num2words(int(m.group(1)), lang="en", to="ordinal"), text)
    text = re.sub(rf"\b({_MONTH})\s+(\d{{1,2}})\b",  # "May 3" -> "may third"
                  lambda m: f"{m.group(1)} {num2words(int(m.group(2)), lang='en', to='ordinal')}",
                  text)
    text = re.sub(rf"\b(\d{{1,2}})\s+({_MONTH})\b",  # "3 May" -> "the third of may"
                  lambda m: f"the {num2words(int(m.group(1)), lang='en', to='ordinal')} of "
                  f"{m.group(2)}", text)
    text = re.sub(r"\b(\d+)\.(\d+)\b", lambda m: f"{_cardinal(int(m.group(1)))} point "
                  + " ".join(_cardinal(int(d)) for d in m.group(2)), text)
    text = re.sub(r"(?<![\w])-(\d)", r"minus \1", text)
    text = re.sub(r"\d[\d,]*", lambda m: _cardinal(int(m.group(0).replace(",", ""))), text)
    text = re.sub(r"[^a-z' ]+", " ", text.lower().replace("-", " "))
    text = re.sub(r"(?<![a-z])'|'(?![a-z])", " ", text)
    return " ".join(text.split())


# --- eSpeak NG through ctypes ------------------------------------------------------------------
_SYNC, _RATE, _PITCH, _UTF8 = 2, 1, 3, 1  # AUDIO_OUTPUT_SYNCHRONOUS, espeakRATE, espeakPITCH
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.c_void_p)


class ESpeak:
    """libespeak-ng from `espeakng-loader`, synchronous: `synth` returns the samples at `rate`.

    Its output depends on what it said before in the same process; see the module docstring.
    """

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("the default speech corpus needs eSpeak NG: pip install "
                              "espeakng-loader") from e
        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.data = Path(espeakng_loader.get_data_path())
        self.rate = self.lib.espeak_Initialize(_SYNC, 0, str(self.data).encode(), 0)
        if self.rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({self.rate}) with data {self.data}")
        self._chunks: list[np.ndarray] = []
        self._callback = _CALLBACK(self._collect)  # keep a reference: C holds the pointer
        self.lib.espeak_SetSynthCallback(self._callback)
        self.lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint,
                                          ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
                                          ctypes.c_void_p, ctypes.c_void_p]
        self.lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]

    def _collect(self, wav, num_samples, events) -> int:
        if num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0

    def synth(self, text: str, voice: str, rate_wpm: int, pitch: int, seed: int = 0) -> np.ndarray:
        accent, _, variant = voice.partition("+")
        if variant and not (self.data / "voices" / "!v" / variant).exists():
            raise ValueError(f"eSpeak has no voice variant {variant!r} (voice {voice!r})")
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"eSpeak has no voice {accent!r}")
        self.lib.espeak_SetParameter(_RATE, int(rate_wpm), 0)
        self.lib.espeak_SetParameter(_PITCH, int(pitch), 0)
        self.lib.espeak_ng_SetRandSeed(seed)
        self._chunks.clear()
        data = text.encode("utf-8")
        self.lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, _UTF8, None, None)
        self.lib.espeak_Synchronize()
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)


@cache
def _engine() -> ESpeak:
    return ESpeak()


def render(spec: dict, engine: ESpeak | None = None) -> np.ndarray:
    """One utterance as 16 kHz int16: synthesize, resample, scale to `gain`, add noise at `snr_db`."""
    from scipy.signal import resample_poly

    engine = engine or _engine()
    raw = engine.synth(spec["text"], spec["voice"], spec["rate"], spec["pitch"], spec["seed"])
    g = math.gcd(SAMPLE_RATE, engine.rate)
    audio = resample_poly(raw.astype(np.float64), SAMPLE_RATE // g, engine.rate // g)
    audio *= spec["gain"] / max(np.abs(audio).max(), 1e-9)
    if spec.get("snr_db") is not None:
        rng = np.random.default_rng(spec["seed"])
        noise_rms = np.sqrt(np.mean(audio**2)) / 10 ** (spec["snr_db"] / 20)
        audio = audio + rng.normal(0.0, noise_rms, audio.shape)
    return np.clip(np.round(audio * 32767), -32768, 32767).astype(np.int16)


def synthesize(specs: Sequence[dict], workers: int = 1) -> list[np.ndarray]:
    """Render `specs` in chunks of `CHUNK`, each in order in a fresh subprocess (so the result
    never depends on what eSpeak said before), `workers` subprocesses at a time."""
    chunks = [list(specs[i:i + CHUNK]) for i in range(0, len(specs), CHUNK)]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return [a for part in pool.map(_synthesize_chunk, chunks) for a in part]


def _synthesize_chunk(specs: list[dict]) -> list[np.ndarray]:
    with tempfile.TemporaryDirectory(prefix="giantpipe-synth-") as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "audio.npz"
        job.write_text(json.dumps(specs))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-m", __name__, str(job), str(out)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"speech synthesis failed:\n{proc.stderr[-3000:]}")
        with np.load(out) as arrays:
            return [arrays[f"u{i}"] for i in range(len(specs))]


# --- the corpus ------------------------------------------------------------------------------
def corpus_sentences(total: int, seed: int = 0) -> list[tuple[str, str]]:
    """`total` (written, spoken) English sentences with distinct spoken forms, shuffled by seed."""
    pairs = generate_pairs(int(total * 1.25) + 20, seed)
    spoken: dict[str, str] = {}
    for en, _ in pairs:
        spoken.setdefault(spoken_english(en), en)
    if len(spoken) < total:
        raise ValueError(f"only {len(spoken)} distinct spoken sentences for {total} utterances")
    items = [(written, text) for text, written in spoken.items()][:total]
    random.Random(seed).shuffle(items)
    return items


def utterance_specs(sentences: Sequence[tuple[str, str]], voices: Sequence[str], seed: int,
                    noise_prob: float, snr_db: tuple[float, float]) -> list[dict]:
    """Speaker, rate, pitch, gain and noise for each sentence, drawn from `seed`."""
    rng = random.Random(seed)
    specs = []
    for written, text in sentences:
        noisy = rng.random() < noise_prob
        specs.append({
            "text": text, "written": written, "voice": rng.choice(list(voices)),
            "rate": rng.randint(*RATE_WPM), "pitch": rng.randint(*PITCH),
            "gain": round(rng.uniform(0.3, 0.95), 3),
            "snr_db": round(rng.uniform(*snr_db), 1) if noisy else None,
            "seed": rng.randrange(2**31),
        })
    return specs


def default_speech_corpus(cache_dir: str | Path, train_size: int = 4000, val_size: int = 300,
                          test_size: int = 300, seed: int = 0, noise_prob: float = 0.5,
                          snr_db: tuple[float, float] = (10.0, 30.0), workers: int | None = None
                          ) -> Path:
    """Generate (once) and cache the corpus; return its folder (`{split}.npy`, `{split}.json`).

    `workers` synthesis subprocesses run at once (default: up to 2); the result is the same.
    """
    sizes = {"train": train_size, "validation": val_size, "test": test_size}
    if min(sizes.values()) < 1:
        raise ValueError(f"every split needs at least one utterance, got {sizes}")
    key = (f"espeak-v{SYNTH_VERSION}.{CORPUS_VERSION}-n{train_size}.{val_size}.{test_size}-s{seed}"
           f"-noise{noise_prob}.{snr_db[0]}.{snr_db[1]}")
    folder = Path(cache_dir) / key
    if all((folder / f"{s}.json").exists() for s in SPLITS):
        return folder
    sentences = corpus_sentences(sum(sizes.values()), seed)
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for k, split in enumerate(SPLITS):
        voices = TRAIN_VOICES if split == "train" else HELD_OUT_VOICES
        specs = utterance_specs(sentences[start:start + sizes[split]], voices,
                                seed * 1009 + k, noise_prob, snr_db)
        start += sizes[split]
        audio = synthesize(specs, workers or min(2, os.cpu_count() or 1))
        _write_split(folder, split, specs, audio)
    return folder


def _write_split(folder: Path, split: str, specs: list[dict], audio: list[np.ndarray]) -> None:
    offsets = np.cumsum([0] + [len(a) for a in audio]).tolist()
    items = [{**spec, "offset": offsets[i], "length": len(audio[i])} for i, spec in enumerate(specs)]
    tmp = folder / f"{split}.{os.getpid()}.tmp.npy"
    np.save(tmp, np.concatenate(audio))
    os.replace(tmp, folder / f"{split}.npy")
    manifest = {"sample_rate": SAMPLE_RATE, "items": items}
    tmp = folder / f"{split}.{os.getpid()}.tmp.json"
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, folder / f"{split}.json")  # written last: marks the split complete


class SynthSplit:
    """One cached split: items are read on demand (`pread` from the audio file, which is opened
    lazily and not pickled), so reading the whole corpus, as its preparation does, holds one
    utterance at a time, and DataLoader workers share the file, not a copy."""

    def __init__(self, audio_path: str | Path, items: list[dict],
                 sample_rate: int = SAMPLE_RATE) -> None:
        self.audio_path, self.items, self.sample_rate = Path(audio_path), items, sample_rate
        self._file: tuple[int, int] | None = None  # (descriptor, where the int16 samples start)

    @classmethod
    def load(cls, folder: str | Path, split: str) -> SynthSplit:
        manifest = json.loads((Path(folder) / f"{split}.json").read_text())
        return cls(Path(folder) / f"{split}.npy", manifest["items"], manifest["sample_rate"])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None}

    def __del__(self) -> None:
        if getattr(self, "_file", None) is not None:
            os.close(self._file[0])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[np.ndarray, str]:
        """(int16 samples, transcript) of utterance `index`."""
        if self._file is None:
            header = np.load(self.audio_path, mmap_mode="r").offset  # all utterances end to end
            self._file = (os.open(self.audio_path, os.O_RDONLY), header)
        item = self.items[index]
        fd, start = self._file
        samples = pread_array(fd, start + 2 * item["offset"], (item["length"],), np.int16)  # 2 bytes a sample
        return samples, item["text"]


def _main(job: str, out: str) -> None:
    """Subprocess entry: render the specs of `job` (JSON) into `out` (.npz, u0, u1, ...)."""
    specs = json.loads(Path(job).read_text())
    engine = ESpeak()
    np.savez(out, **{f"u{i}": render(spec, engine) for i, spec in enumerate(specs)})


if __name__ == "__main__":
    _main(*sys.argv[1:3])
