"""Language modelling on the giant net: next-token cross-entropy, reported in bits per byte."""

from __future__ import annotations

import math

from giantpipe.models.losses import TokenCrossEntropy
from giantpipe.platform.tasks.base import Task


class LanguageModelTask(Task):
    def __init__(self, model_factory, optim, seed: int, bytes_per_token: dict[str, float], label_smoothing=0.0):
        super().__init__(model_factory, TokenCrossEntropy(label_smoothing), optim, seed)
        self.bytes_per_token = bytes_per_token

    def batch_tokens(self, batch) -> int:
        return batch["targets"].numel()

    def _eval_step(self, batch, split: str) -> None:
        loss = self.runner.eval_loss(batch)
        n = self.batch_items(batch)
        self.log(f"{split}/loss", loss, batch_size=n, prog_bar=split == "val")
        bpb = loss / math.log(2) / self.bytes_per_token[split]
        self.log(f"{split}/bpb", bpb, batch_size=n, prog_bar=split == "val")

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")
