"""Log-mel features: 80 channels, 25 ms window, 10 ms hop (T = 1 + samples // 160 at 16 kHz),
with librosa's Slaney mel scale and filter normalization, and per-utterance normalization."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from giantpipe.platform.data.audio import SAMPLE_RATE


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



@dataclass
class FeatureStats:
    """Global per-dimension mean and std of the training features."""

    mean: Tensor
    std: Tensor
