"""Length bucketing on top of `GlobalBatchSampler`: global batches of items of similar length.

Each epoch the indices are shuffled (seeded by seed and epoch, as `GlobalBatchSampler` does),
cut into pools of `pool_batches` global batches, sorted by length inside a pool and cut into
global batches, whose order is shuffled again. Padding shrinks to a few tokens per batch while
the order stays random. Without shuffling (evaluation) all items are sorted by length. As in
the parent, a data-parallel replica takes its contiguous slice of every global batch, all
pipeline stages of a replica read the same slice, and a resume skips consumed batches.
An epoch's batches are one index tensor and its cut points (8 bytes an item), never Python
lists of every index: a 3M-pair corpus costs 24 MB here, not 100.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from giantpipe.platform.data.sampling import (
    GlobalBatchSampler,
    ResumableLoader,
    SplitLoaders,
    replica_of,
    stage_of,
)
from giantpipe.platform.data.skips import skip_summary

log = logging.getLogger(__name__)


class SourceColumn:
    """A dataset whose model-input column (source tokens, audio features) a reader may skip:
    `with_source(False)` is a view whose items carry that column's length but not its data."""

    read_source = True

    def __getstate__(self) -> dict:
        """DataLoader workers get the dataset without `lengths` (the sampler's, in the main
        process): a memory-mapped column would be pickled as a copy of its data."""
        return {**self.__dict__, "lengths": None}

    def with_source(self, read: bool):
        view = object.__new__(type(self))  # not copy.copy: that would go through __getstate__
        view.__dict__.update(self.__dict__, read_source=read)
        return view


@dataclass
class Batches:
    """Global batches as slices of one index order, batch b = order[starts[b]:starts[b] + sizes[b]]:
    an epoch's plan costs 4 bytes an item (int32 indices), not a second reordered copy."""

    order: torch.Tensor
    starts: torch.Tensor
    sizes: torch.Tensor

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, b: int) -> list[int]:
        start = int(self.starts[b])
        return self.order[start:start + int(self.sizes[b])].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        return (self[b] for b in range(len(self)))


class BucketBatchSampler(GlobalBatchSampler):
    def __init__(self, lengths: Sequence[int] | np.ndarray, global_batch: int, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True, num_replicas: int = 1,
                 replica: int = 0, pool_batches: int = 50) -> None:
        super().__init__(len(lengths), global_batch, seed, shuffle, drop_last, num_replicas, replica)
        if pool_batches < 1:
            raise ValueError(f"pool_batches must be >= 1, got {pool_batches}")
        self.lengths = torch.from_numpy(np.array(lengths, dtype=np.int32))  # a copy: 4 bytes an item
        self.pool_batches = pool_batches

    def global_batches(self) -> Batches:
        """All global batches of this epoch, in order (the last one may be short)."""
        n, size = self.num_items, self.global_batch
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=generator, dtype=torch.int32)
            pool = size * self.pool_batches
        else:
            generator, order, pool = None, torch.arange(n, dtype=torch.int32), max(n, 1)
        for start in range(0, n, pool):  # sort each pool by length, in place
            chunk = order[start:start + pool]
            order[start:start + pool] = chunk[torch.argsort(self.lengths[chunk], stable=True)]
        # pools are whole batches, so only the very last batch can be short
        full, rest = divmod(n, size)
        count = full + (rest > 0)
        batch_order = (torch.randperm(count, generator=generator) if generator is not None
                       else torch.arange(count))
        starts = batch_order[batch_order < full] * size  # full batches in their drawn order ...
        sizes = torch.full_like(starts, size)
        if rest and not self.drop_last:  # ... and a short batch last
            starts, sizes = torch.cat([starts, torch.tensor([full * size])]), torch.cat([sizes, torch.tensor([rest])])
        return Batches(order, starts, sizes)

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        batches = self.global_batches()
        for b in range(skip, len(batches)):
            batch = batches[b]
            per_replica = -(-len(batch) // self.num_replicas)
            yield batch[self.replica * per_replica:(self.replica + 1) * per_replica]


class EvalBucketSampler(BucketBatchSampler):
    """Evaluation batches sorted by length, none smaller than `min_batch` (a short last batch
    joins the one before it), so a pipeline can always cut every batch into its micro-batches."""

    def __init__(self, lengths: Sequence[int] | np.ndarray, global_batch: int, min_batch: int = 1,
                 **kwargs):
        super().__init__(lengths, global_batch, shuffle=False, drop_last=False, **kwargs)
        self.min_batch = min_batch

    def global_batches(self) -> Batches:
        batches = super().global_batches()  # unshuffled: the last batch follows the one before it
        if len(batches) > 1 and batches.sizes[-1] < self.min_batch:
            sizes = batches.sizes[:-1].clone()
            sizes[-1] += batches.sizes[-1]
            batches = Batches(batches.order, batches.starts[:-1], sizes)
        return batches

    def __len__(self) -> int:
        return len(self.global_batches())


class BucketedLoaders(SplitLoaders):
    """Lightning's dataloader hooks over length-bucketed, resumable batches, for a data module
    whose `prepare()` returns `data` with `datasets` (`SourceColumn`s with `lengths`),
    `skipped` and `collator()`, and whose `cfg` has `pool_batches` and `num_workers`.

    Args:
        cfg: the `data` config.
        batch_size: the global batch (all data-parallel replicas together).
        seed: the batch-order seed.
        min_eval_batch: the smallest evaluation batch (a pipeline's micro-batches x replicas).

    What a rank reads: its replica's slice of each global batch (`replica_of`), and of each item
    the targets and lengths; the model's input (source tokens, audio features) only on the
    first pipeline stage, the one whose layers consume it (`stage_of`)."""

    def __init__(self, cfg, batch_size: int, seed: int, min_eval_batch: int = 1):
        super().__init__()
        self.cfg, self.batch_size, self.seed = cfg, batch_size, seed
        self.min_eval_batch = min_eval_batch
        self.data = None

    def dataset(self, split: str):
        return self.prepare().datasets["validation" if split == "val" else split]

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def log_counts(self, kind: str, unit: str) -> None:
        for split, counts in self.data.skipped.items():
            log.info("%s %s: %d %s%s", kind, split, len(self.data.datasets[split]), unit,
                     skip_summary(counts))

    def _loader(self, split: str, shuffle: bool) -> ResumableLoader:
        dataset = self.dataset(split).with_source(stage_of(self.trainer) == 0)
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
