"""Checkpoint files that are never half-written: serialize to a temporary file, then rename."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.plugins.io import TorchCheckpointIO

from giantpipe.strategies.stage_checkpoint import atomic_save, consolidate


class AtomicCheckpointIO(TorchCheckpointIO):
    """A kill at any moment leaves either the previous checkpoint or the new one at `path`.

    Loading a pipelined checkpoint (a manifest and its stage shards) in a one-device run
    consolidates it first, optimizer state included, so `strategy=single ckpt_path=...`
    resumes a pipelined run where it stopped.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        atomic_save(checkpoint, Path(path))

    def load_checkpoint(self, path, *args, **kwargs) -> dict:
        checkpoint = super().load_checkpoint(path, *args, **kwargs)
        return consolidate(path) if "giantpipe_shards" in checkpoint else checkpoint
