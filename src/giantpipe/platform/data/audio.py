"""Audio in, float32 mono 16 kHz samples out: arrays in any layout or rate, encoded files or bytes.

Whatever cannot be read as audio (not numbers, no rate, a file libsndfile refuses, a WAV file
cut short) is an `AudioReadError`, which the speech readers count as unreadable and skip.
Encoded audio is decoded with soundfile (no torchcodec needed).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
PathSpec = str | Path


class AudioReadError(Exception):
    """An item whose audio cannot be read or decoded."""


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

