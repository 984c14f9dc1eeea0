"""Losses in the pipeline's `SumLoss` form: a per-micro-batch sum and a mini-batch normalizer.

Splitting a token-mean loss over micro-batches is only exact when every micro-batch divides
by the *mini-batch's* token count, not its own; these losses make that explicit.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from giantpipe.models.contract import Batch, Carry


class TokenCrossEntropy:
    """Cross-entropy summed over target tokens that are not `ignore_index` (optionally smoothed)."""

    def __init__(self, label_smoothing: float = 0.0, ignore_index: int = -100, target_key: str = "targets"):
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index
        self.target_key = target_key

    def __call__(self, out: Carry, micro_batch: Batch) -> Tensor:
        logits_btv = out["logits"]
        targets_bt = micro_batch[self.target_key]
        return F.cross_entropy(
            logits_btv.reshape(-1, logits_btv.shape[-1]).float(),
            targets_bt.reshape(-1),
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            reduction="sum",
        )

    def normalizer(self, batch: Batch) -> float:
        return float((batch[self.target_key] != self.ignore_index).sum().clamp(min=1))
