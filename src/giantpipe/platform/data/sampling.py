"""Batch order that is independent of the parallelism, and survives a resume.

Every global batch is drawn from one permutation seeded by (seed, epoch); a data-parallel
replica takes its contiguous slice of each global batch, and all pipeline stages of a replica
read the same slice. So the mathematics is the same for `strategy=single` and any
stages x replicas layout. The loader records how many batches of the epoch were consumed, so
Lightning can resume mid-epoch on the next unseen batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this replica's slice of each global batch of a (seed, epoch)-seeded permutation."""

    def __init__(
        self,
        num_items: int,
        global_batch: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        num_replicas: int = 1,
        replica: int = 0,
    ):
        if global_batch % num_replicas:
            raise ValueError(
                f"the batch size {global_batch} is not divisible by {num_replicas} data-parallel replicas; "
                "choose a batch size that is a multiple of strategy.replicas"
            )
        if drop_last and num_items < global_batch:
            raise ValueError(f"the split has {num_items} items, fewer than one batch of {global_batch}")
        self.num_items, self.global_batch, self.seed = num_items, global_batch, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.num_replicas, self.replica = num_replicas, replica
        self.epoch = 0
        self.skip = 0  # batches to skip once, when resuming mid-epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        full, rest = divmod(self.num_items, self.global_batch)
        return full + (0 if self.drop_last or rest == 0 else 1)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_items, generator=generator).tolist()
        else:
            order = list(range(self.num_items))
        skip, self.skip = self.skip, 0
        for b in range(skip, len(self)):
            batch = order[b * self.global_batch : (b + 1) * self.global_batch]
            per_replica = -(-len(batch) // self.num_replicas)
            yield batch[self.replica * per_replica : (self.replica + 1) * per_replica]


class ResumableLoader(DataLoader):
    """A DataLoader over a `GlobalBatchSampler` that Lightning can checkpoint mid-epoch.

    Lightning asks for `state_dict` after the step that consumed the last yielded batch, so the
    count of yielded batches is the count of consumed ones (checked by the resume test).
    """

    def __init__(self, dataset: Dataset, batch_sampler: GlobalBatchSampler, **kwargs):
        # A private generator: creating an iterator must not draw from the global RNG, or a
        # resumed run's dropout masks would drift from the uninterrupted run's.
        kwargs.setdefault("generator", torch.Generator().manual_seed(batch_sampler.seed))
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self._yielded = 0

    def __iter__(self):
        self._yielded = self.batch_sampler.skip
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.batch_sampler.epoch, "consumed": self._yielded}

    def load_state_dict(self, state: dict) -> None:
        if state["epoch"] == self.batch_sampler.epoch and state["consumed"] < len(self.batch_sampler):
            self.batch_sampler.skip = state["consumed"]


class SplitLoaders:
    """Lightning's three dataloader hooks for a data module that defines `_loader(split, shuffle)`."""

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("validation", shuffle=False)

    def test_dataloader(self):
        return self._loader("test", shuffle=False)


def replica_of(trainer) -> tuple[int, int]:
    """(num_replicas, replica index) of this process: pipelines report their data-parallel slot."""
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) if trainer else None
    if not kwargs:
        return 1, 0
    return kwargs["num_replicas"], kwargs["rank"]


def stage_of(trainer) -> int:
    """The pipeline stage of this process (0 without a pipeline): it decides which columns
    of a batch the process reads."""
    strategy = getattr(trainer, "strategy", None) if trainer else None
    topology = getattr(strategy, "topology", None)
    if topology is None or not hasattr(topology, "stage_of"):
        return 0
    return topology.stage_of(trainer.global_rank)
