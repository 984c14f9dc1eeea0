"""SpecAugment (Park et al. 2019): frequency and time masks on training features."""

from __future__ import annotations

import torch
from torch import Tensor, nn


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

