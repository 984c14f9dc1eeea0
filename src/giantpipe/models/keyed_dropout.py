"""Dropout whose mask depends on *which sample* it is, not on how the batch was cut.

A plain `nn.Dropout` draws from the global RNG stream, so its masks change when the same
mini-batch is split into other micro-batches, run on other stages or by other replicas.
`KeyedDropout` derives each element's keep/drop decision from a counter-based hash of
(sample key, dropout site, element index). Sample keys come from the task: (seed, step,
position of the sample in the global batch). So a pipelined run with any N, M and replica
count draws exactly the masks of the single-device run, and a recompute draws them again.

Without keys in the carry (inference, or a caller that does not provide them) it falls back
to ordinary dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KEY = "rng_key"  # carry/batch entry: int64 (B,) sample keys

_M1, _M2 = 0x5851F42D4C957F2D, 0x14057B7EF767814F  # 64-bit odd multipliers (PCG / Knuth)
_MASK53 = (1 << 53) - 1


def _mix(x: Tensor) -> Tensor:
    """A splitmix64-style finalizer on int64 (wrapping arithmetic)."""
    x = x ^ ((x >> 31) & 0x1FFFFFFFF)
    x = x * _M1
    x = x ^ ((x >> 29) & 0x7FFFFFFFF)
    x = x * _M2
    return x ^ ((x >> 32) & 0xFFFFFFFF)


def keyed_uniform(keys_b: Tensor, shape: torch.Size, salt: int) -> Tensor:
    """Uniform [0, 1) numbers of `shape` (batch first) determined by (key of each row, salt, index)."""
    per_sample = int(torch.Size(shape[1:]).numel())
    index = torch.arange(per_sample, device=keys_b.device, dtype=torch.int64).view(1, *shape[1:])
    keys = keys_b.to(torch.int64).view(-1, *([1] * (len(shape) - 1)))
    h = _mix(_mix(keys * _M2 + salt) + index)
    return ((h >> 11) & _MASK53).double().mul_(1.0 / (1 << 53)).to(torch.float32)


class KeyedDropout(nn.Module):
    """Dropout with per-sample counter-based masks; `salt` must be unique per dropout site."""

    def __init__(self, p: float, salt: int):
        super().__init__()
        self.p, self.salt = p, salt

    def forward(self, x: Tensor, keys: Tensor | None) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if keys is None:
            return F.dropout(x, self.p, True)
        keep = keyed_uniform(keys, x.shape, self.salt) >= self.p
        return x * keep.to(x.dtype) / (1.0 - self.p)


def sample_keys(seed: int, step: int, first_index: int, count: int, device=None) -> Tensor:
    """Keys of `count` samples starting at `first_index` of the global batch at `step`."""
    base = _mix(torch.tensor([seed * 1_000_003 + step], dtype=torch.int64))
    index = torch.arange(first_index, first_index + count, dtype=torch.int64)
    return _mix(base * _M1 + index).to(device) if device is not None else _mix(base * _M1 + index)
