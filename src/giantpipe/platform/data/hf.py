"""Hugging Face `datasets` splits, downloaded (memory-mapped Arrow) or streamed.

`streaming=True` reads a dataset's shards as they come, so a corpus larger than the disk budget
still prepares: giantpipe keeps only its own prepared tokens or features (see `cache`).
"""

from __future__ import annotations

HF_SPLITS = {"train": "train", "validation": "validation", "test": "test"}  # the default mapping


def load_split(name: str, config: str | None, split: str, streaming: bool = False, **kwargs):
    """`datasets.load_dataset(name, config, split=split)`; an IterableDataset when streaming."""
    import datasets

    return datasets.load_dataset(name, config, split=split, streaming=streaming, **kwargs)
