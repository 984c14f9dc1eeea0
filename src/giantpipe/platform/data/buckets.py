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

from giantpipe.platform.data.sampling import (
    GlobalBatchSampler,
    ResumableLoader,
    SplitLoaders,
    replica_of,
)


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


class EvalBucketSampler(BucketBatchSampler):
    """Evaluation batches sorted by length, none smaller than `min_batch` (a short last batch
    joins the one before it), so a pipeline can always cut every batch into its micro-batches."""

    def __init__(self, lengths: Sequence[int], global_batch: int, min_batch: int = 1, **kwargs):
        super().__init__(lengths, global_batch, shuffle=False, drop_last=False, **kwargs)
        self.min_batch = min_batch

    def global_batches(self) -> list[list[int]]:
        batches = super().global_batches()
        if len(batches) > 1 and len(batches[-1]) < self.min_batch:
            batches[-2:] = [batches[-2] + batches[-1]]
        return batches

    def __len__(self) -> int:
        return len(self.global_batches())


class BucketedLoaders(SplitLoaders):
    """Lightning's dataloader hooks over length-bucketed, resumable batches, for a data module
    with `dataset(split)` (items with `lengths`), `data.collator()`, `batch_size`, `seed`,
    `min_eval_batch` and `cfg.pool_batches` / `cfg.num_workers`."""

    def _loader(self, split: str, shuffle: bool) -> ResumableLoader:
        dataset = self.dataset(split)
        replicas, replica = replica_of(self.trainer)
        if shuffle:
            sampler = BucketBatchSampler(dataset.lengths, self.batch_size, seed=self.seed,
                                         num_replicas=replicas, replica=replica,
                                         pool_batches=self.cfg.pool_batches)
        else:
            sampler = EvalBucketSampler(dataset.lengths, self.batch_size, self.min_eval_batch,
                                        seed=self.seed, num_replicas=replicas, replica=replica)
        return ResumableLoader(dataset, sampler, collate_fn=self.data.collator(),
                               num_workers=self.cfg.num_workers)


def skip_summary(counts: dict[str, int]) -> str:
    """", skipped 3 (empty 1, malformed 2)" for the nonzero counts, or "" when none."""
    lost = {k: v for k, v in counts.items() if v}
    if not lost:
        return ""
    return f", skipped {sum(lost.values())} ({', '.join(f'{k} {v}' for k, v in lost.items())})"
