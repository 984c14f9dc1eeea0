"""Checkpoint files that are never half-written, read whatever their kind."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.plugins.io import TorchCheckpointIO

from giantpipe.platform.config import ConfigError
from giantpipe.strategies.stage_checkpoint import CheckpointError, atomic_save, load_checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """A kill at any moment leaves either the previous checkpoint or the new one at `path`.

    Loading goes through the checkpoint format module (strategies/stage_checkpoint.py): a
    pipelined checkpoint (a manifest and its stage shards, each verified) is consolidated first,
    optimizer state included, so `strategy=single ckpt_path=...` resumes a pipelined run where it
    stopped. A bad checkpoint is one `ConfigError` line naming the file and stage.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        atomic_save(checkpoint, Path(path))

    def load_checkpoint(self, path, *args, **kwargs) -> dict:
        try:
            return load_checkpoint(path)
        except CheckpointError as err:
            raise ConfigError(str(err)) from None
