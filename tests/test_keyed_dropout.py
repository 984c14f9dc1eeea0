"""Keyed dropout: masks follow the sample, not the batch layout."""

import torch

from giantpipe.models.keyed_dropout import KeyedDropout, keyed_uniform, sample_keys


def test_masks_are_the_same_for_a_sample_in_any_micro_batch():
    keys = sample_keys(seed=0, step=5, first_index=0, count=8)
    whole = keyed_uniform(keys, torch.Size([8, 6, 4]), salt=3)
    part = keyed_uniform(keys[2:5], torch.Size([3, 6, 4]), salt=3)
    torch.testing.assert_close(part, whole[2:5], rtol=0, atol=0)
    assert not torch.equal(whole, keyed_uniform(keys, torch.Size([8, 6, 4]), salt=4))
    assert not torch.equal(keys, sample_keys(seed=0, step=6, first_index=0, count=8))
    assert torch.equal(sample_keys(0, 5, 4, 4), keys[4:])  # replica 1 of 2 gets the second half's keys


def test_drop_rate_and_scaling():
    drop = KeyedDropout(0.25, salt=1).train()
    x = torch.ones(64, 128)
    y = drop(x, sample_keys(1, 0, 0, 64))
    assert abs((y == 0).float().mean().item() - 0.25) < 0.02
    assert torch.allclose(y[y != 0], torch.tensor(1 / 0.75))
    assert torch.equal(drop.eval()(x, None), x)
