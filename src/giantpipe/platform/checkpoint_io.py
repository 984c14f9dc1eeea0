"""Checkpoint files that are never half-written: serialize to a temporary file, then rename."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.plugins.io import TorchCheckpointIO

from giantpipe.strategies.stage_checkpoint import atomic_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """A kill at any moment leaves either the previous checkpoint or the new one at `path`."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        atomic_save(checkpoint, Path(path))
