"""Length bucketing on top of `GlobalBatchSampler`: global batches of items of similar length.

Each epoch the indices are shuffled (seeded by seed and epoch, as `GlobalBatchSampler` does),
cut into pools of `pool_batches` global batches, sorted by length inside a pool and cut into
global batches, whose order is shuffled again. Padding shrinks to a few tokens per batch while
the order stays random. Without shuffling (evaluation) all items are sorted by length. As in
the parent, a data-parallel replica takes its contiguous slice of every global batch, all
pipeline stages of a replica read the same slice, and a resume skips consumed batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from giantpipe.platform.data.sampling import GlobalBatchSampler


class BucketBatchSampler(GlobalBatchSampler):
    def __init__(self, lengths: Sequence[int], global_batch: int, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True, num_replicas: int = 1,
                 replica: int = 0, pool_batches: int = 50) -> None:
        super().__init__(len(lengths), global_batch, seed, shuffle, drop_last, num_replicas, replica)
        if pool_batches < 1:
            raise ValueError(f"pool_batches must be >= 1, got {pool_batches}")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.pool_batches = pool_batches

    def global_batches(self) -> list[list[int]]:
        """All global batches of this epoch, in order (the last one may be short)."""
        n, size = self.num_items, self.global_batch
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=generator)
            pool = size * self.pool_batches
        else:
            generator, order, pool = None, torch.arange(n), max(n, 1)
        batches: list[list[int]] = []
        for start in range(0, n, pool):
            chunk = order[start:start + pool]
            chunk = chunk[torch.argsort(self.lengths[chunk], stable=True)]
            batches += [chunk[i:i + size].tolist() for i in range(0, len(chunk), size)]
        if generator is not None:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator)]
        full = [b for b in batches if len(b) == size]
        partial = [b for b in batches if len(b) < size]
        return full if self.drop_last else full + partial  # a short batch goes last

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        for batch in self.global_batches()[skip:]:
            per_replica = -(-len(batch) // self.num_replicas)
            yield batch[self.replica * per_replica:(self.replica + 1) * per_replica]
