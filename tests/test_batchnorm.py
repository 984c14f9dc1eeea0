"""Micro-batch BatchNorm: the deferred variant's running statistics equal the mini-batch's."""

import torch
from torch import nn

from giantpipe.models.contract import build_materialized
from giantpipe.models.giant_conv import GiantConvNet
from giantpipe.strategies.batchnorm import DeferredBatchNorm


def test_deferred_running_statistics_equal_the_mini_batch():
    torch.manual_seed(0)
    x = torch.randn(12, 3, 7) * 2 + 1
    plain = nn.BatchNorm1d(3)
    plain(x)
    deferred = DeferredBatchNorm.convert(nn.Sequential(nn.BatchNorm1d(3)), chunks=4)[0]
    outputs = [deferred(chunk) for chunk in x.chunk(4)]
    torch.testing.assert_close(deferred.running_mean, plain.running_mean)
    torch.testing.assert_close(deferred.running_var, plain.running_var)
    assert deferred.num_batches_tracked.item() == 1
    # each micro-batch is still normalized with its own statistics, as GPipe does
    per_micro = nn.BatchNorm1d(3)
    torch.testing.assert_close(outputs[1], per_micro(x.chunk(4)[1]))


def test_plain_batchnorm_per_micro_batch_differs_from_the_mini_batch():
    x = torch.randn(12, 3, 7) * 2 + 1
    plain, micro = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    plain(x)
    for chunk in x.chunk(4):
        micro(chunk)
    assert not torch.allclose(plain.running_var, micro.running_var)


def test_conv_giant_net_is_causal_and_converts_on_meta():
    model = build_materialized(lambda: GiantConvNet(vocab_size=20, d_model=8, n_layers=2, max_len=16), seed=0).eval()
    tokens = torch.randint(0, 20, (2, 10))
    changed = tokens.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 20
    a, b = model({"tokens": tokens})["logits"], model({"tokens": changed})["logits"]
    torch.testing.assert_close(a[:, :6], b[:, :6])
    with torch.device("meta"):
        meta = GiantConvNet(vocab_size=20, d_model=8, n_layers=2)
    DeferredBatchNorm.convert(meta, chunks=2)
    assert isinstance(meta.layers[1].norm, DeferredBatchNorm) and meta.layers[1].norm.sum.is_meta
