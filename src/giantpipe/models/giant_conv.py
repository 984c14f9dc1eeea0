"""The convolutional giant net: causal 1-D conv blocks with BatchNorm, as a layer list.

It exists to exercise BatchNorm under micro-batching (DESIGN §3): in training each
micro-batch is normalized with its own statistics, as GPipe does; `strategy.
deferred_batch_norm=true` makes the running statistics equal the whole mini-batch's.
Layers: embedding (shared with the Transformer giant net), `n_layers` x `ConvBlock`, head.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from giantpipe.models.contract import Carry, LayeredModel
from giantpipe.models.giant_net import LMHead, TokenEmbedding
from giantpipe.models.keyed_dropout import KEY, KeyedDropout


class ConvBlock(nn.Module):
    """h + Conv(GELU(BN(h))), the convolution causal (left-padded) so no token sees the future."""

    def __init__(self, d_model: int, kernel_size: int, dropout: float, salt: int = 1):
        super().__init__()
        self.norm = nn.BatchNorm1d(d_model)
        self.conv = nn.Conv1d(d_model, d_model, kernel_size)
        self.dropout = KeyedDropout(dropout, salt)
        self.pad = kernel_size - 1

    def forward(self, carry: Carry) -> Carry:
        h_bdt = carry["h"].transpose(1, 2)
        x = F.pad(F.gelu(self.norm(h_bdt)), (self.pad, 0))
        h_bdt = h_bdt + self.dropout(self.conv(x), carry.get(KEY))
        return {**carry, "h": h_bdt.transpose(1, 2)}


class GiantConvNet(LayeredModel):
    """[embedding, conv block x n_layers, head]; same interface as GiantNet."""

    def __init__(self, vocab_size: int = 256, d_model: int = 128, n_layers: int = 4, kernel_size: int = 5,
                 max_len: int = 256, dropout: float = 0.1):
        super().__init__()
        self.layers = nn.ModuleList(
            [TokenEmbedding(vocab_size, d_model, max_len, dropout)]
            + [ConvBlock(d_model, kernel_size, dropout, salt=i + 1) for i in range(n_layers)]
            + [LMHead(d_model, vocab_size)]
        )

    def init_layer(self, index: int) -> None:
        layer = self.layers[index]
        for module in layer.modules():
            if isinstance(module, (nn.Conv1d, _BatchNorm, nn.LayerNorm)):
                module.reset_parameters()
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()

    def first_carry(self, batch) -> Carry:
        return {k: batch[k] for k in ("tokens", KEY) if k in batch}
