"""Batch order is independent of the replica layout and resumes mid-epoch."""

import torch
from torch.utils.data import TensorDataset

from giantpipe.platform.data.sampling import GlobalBatchSampler, ResumableLoader


def test_replicas_split_each_global_batch():
    whole = list(GlobalBatchSampler(40, 8, seed=5))
    halves = [list(GlobalBatchSampler(40, 8, seed=5, num_replicas=2, replica=r)) for r in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == whole
    assert sorted(i for b in whole for i in b) == list(range(40))


def test_epochs_reshuffle_deterministically():
    s = GlobalBatchSampler(40, 8, seed=5)
    first = list(s)
    s.set_epoch(1)
    second = list(s)
    assert first != second
    s.set_epoch(0)
    assert list(s) == first


def test_loader_resumes_on_the_next_unseen_batch():
    data = TensorDataset(torch.arange(40))
    loader = ResumableLoader(data, GlobalBatchSampler(40, 8, seed=1))
    it = iter(loader)
    seen = [next(it)[0].tolist() for _ in range(3)]
    state = loader.state_dict()
    assert state == {"epoch": 0, "consumed": 2 + 1}
    seen.append(next(it)[0].tolist())
    fresh = ResumableLoader(data, GlobalBatchSampler(40, 8, seed=1))
    fresh.load_state_dict(state)
    assert next(iter(fresh))[0].tolist() == seen[3]
