"""The run's checkpoints: one `last.ckpt`, the k best by a validation metric, never a bad one.

Lightning's `ModelCheckpoint`, with three changes a long run needs:

- **One `last.ckpt`.** It is written every `every_n_train_steps` and at the end of training
  (even when `max_steps` is not a multiple of the interval), and always replaces itself:
  Lightning's version counter would write `last-v1.ckpt` beside a `last.ckpt` it did not write
  itself in this process (twice the disk, and the wrong one to resume from).
- **Top-k ranked by fresh metrics.** `step{N}.ckpt` is considered after each validation, by that
  validation's `monitor` value. (Triggered by `every_n_train_steps`, Lightning ranks a step's
  weights by the *previous* validation's value, which runs before this step's.) A checkpoint
  that falls out of the top k is removed with its stage shards (`strategy.remove_checkpoint`).
- **Finite weights only.** Before each save every rank checks its weights; if any stage holds
  a NaN or infinity nothing is written, so the last good checkpoint is never replaced by it.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn


class RunCheckpoint(ModelCheckpoint):
    """`last.ckpt` every `every_n_train_steps` and at the end; the `save_top_k` best by `monitor`
    after each validation; superseded ones removed with their shards."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("enable_version_counter", False)
        super().__init__(*args, **kwargs)
        self._last_saved_step: int | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = self._every_n_train_steps
        if every >= 1 and trainer.global_step % every == 0 and self._may_save(trainer):
            self._save_last(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._may_save(trainer) and self.save_top_k and self._finite(trainer, pl_module):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
        if self._every_n_train_steps < 1 and self._may_save(trainer):  # no step interval: last after validation
            self._save_last(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Runs are step-based: saves follow steps and validations, not epochs."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.fast_dev_run:
            self._save_last(trainer)

    def _may_save(self, trainer: pl.Trainer) -> bool:
        return not (trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING)

    def _save_last(self, trainer: pl.Trainer) -> None:
        if not self.save_last or self._last_saved_step == trainer.global_step:
            return
        if self._finite(trainer, trainer.lightning_module):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._last_saved_step = trainer.global_step

    def _finite(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Every rank's weights are finite (a collective: every rank calls it at the same point)."""
        local = [p.detach() for p in pl_module.parameters() if not p.is_meta]
        finite = all(bool(torch.isfinite(p).all()) for p in local)
        bad = trainer.strategy.reduce(torch.tensor(float(not finite), device=pl_module.device), reduce_op="sum")
        if bad.item() > 0:
            rank_zero_warn(f"not saving a checkpoint at step {trainer.global_step}: the weights of "
                           f"{int(bad.item())} process(es) hold NaN or infinite values; the last checkpoint is kept")
            return False
        return True


class FinalCheckpoint(pl.Callback):
    """For a plain `ModelCheckpoint` with `save_last`: make `last.ckpt` hold the final weights
    even when max_steps is not a multiple of the checkpoint interval. `RunCheckpoint` (the
    default) does this itself, so this does nothing for it."""

    def __init__(self, checkpoint: ModelCheckpoint):
        self.checkpoint = checkpoint

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(self.checkpoint, RunCheckpoint):
            return
        if self.checkpoint._last_global_step_saved != trainer.global_step and self.checkpoint.dirpath:
            trainer.save_checkpoint(str(Path(self.checkpoint.dirpath) / "last.ckpt"))
