"""Small Lightning callbacks the platform adds to every run."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl


class FinalCheckpoint(pl.Callback):
    """Make `last.ckpt` hold the final weights even when max_steps is not a multiple of the
    checkpoint interval (ModelCheckpoint alone would leave the last interval's weights)."""

    def __init__(self, checkpoint: pl.callbacks.ModelCheckpoint):
        self.checkpoint = checkpoint

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.checkpoint._last_global_step_saved != trainer.global_step and self.checkpoint.dirpath:
            trainer.save_checkpoint(str(Path(self.checkpoint.dirpath) / "last.ckpt"))
