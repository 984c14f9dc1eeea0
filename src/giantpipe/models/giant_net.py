"""The giant net: a decoder-only Transformer language model as an ordered layer list.

Layers: `TokenEmbedding` (tokens -> h), `n_layers` x `TransformerBlock` (h -> h, pre-norm,
causal self-attention), `LMHead` (h -> logits). Dropout (on the embedding and on each
residual branch) is `KeyedDropout`, so its masks do not depend on the pipeline layout. Depth and width come from the config, so the
same code scales from a CPU smoke run to a model that only fits when pipelined. Nothing is
tied across layers (embedding and head are separate), so any contiguous cut is a valid stage.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from giantpipe.models.contract import Carry, LayeredModel
from giantpipe.models.keyed_dropout import KEY, KeyedDropout


class TokenEmbedding(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, max_len: int, dropout: float):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Embedding(max_len, d_model)
        self.dropout = KeyedDropout(dropout, salt=0)
        self.max_len = max_len

    def reset_parameters(self) -> None:
        nn.init.normal_(self.tokens.weight, std=0.02)
        nn.init.normal_(self.positions.weight, std=0.02)

    def forward(self, carry: Carry) -> Carry:
        tokens_bt = carry["tokens"]
        if tokens_bt.shape[1] > self.max_len:
            raise ValueError(f"sequence of {tokens_bt.shape[1]} tokens exceeds model.max_len={self.max_len}")
        positions = torch.arange(tokens_bt.shape[1], device=tokens_bt.device)
        h_btd = self.tokens(tokens_bt) + self.positions(positions)
        keys = carry.get(KEY)
        out = {"h": self.dropout(h_btd, keys)}
        if keys is not None:
            out[KEY] = keys  # every later layer draws its dropout masks from the sample keys
        return out


class TransformerBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, depth_scale: float, salt: int = 1):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"model.d_model={d_model} must be divisible by model.n_heads={n_heads}")
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff_in = nn.Linear(d_model, d_ff)
        self.ff_out = nn.Linear(d_ff, d_model)
        self.attn_dropout = KeyedDropout(dropout, salt=2 * salt)
        self.ff_dropout = KeyedDropout(dropout, salt=2 * salt + 1)
        self.depth_scale = depth_scale

    def reset_parameters(self) -> None:
        """GPT-2 style: small normal weights, output projections scaled down with depth."""
        for linear in (self.qkv, self.ff_in):
            nn.init.normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)
        for linear in (self.proj, self.ff_out):
            nn.init.normal_(linear.weight, std=0.02 * self.depth_scale)
            nn.init.zeros_(linear.bias)

    def forward(self, carry: Carry) -> Carry:
        h_btd = carry["h"]
        b, t, d = h_btd.shape
        q, k, v = self.qkv(self.norm1(h_btd)).view(b, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
        )
        keys = carry.get(KEY)
        h_btd = h_btd + self.attn_dropout(self.proj(attn.transpose(1, 2).reshape(b, t, d)), keys)
        h_btd = h_btd + self.ff_dropout(self.ff_out(F.gelu(self.ff_in(self.norm2(h_btd)))), keys)
        return {**carry, "h": h_btd}


class LMHead(nn.Module):
    def __init__(self, d_model: int, vocab_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, vocab_size)

    def reset_parameters(self) -> None:
        self.norm.reset_parameters()
        nn.init.normal_(self.out.weight, std=0.02)
        nn.init.zeros_(self.out.bias)

    def forward(self, carry: Carry) -> Carry:
        return {"logits": self.out(self.norm(carry["h"]))}


class GiantNet(LayeredModel):
    """Decoder-only Transformer LM: [embedding, block x n_layers, head]."""

    def __init__(
        self,
        vocab_size: int = 256,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        d_ff: int = 512,
        max_len: int = 256,
        dropout: float = 0.1,
    ):
        super().__init__()
        depth_scale = 1.0 / math.sqrt(2 * n_layers)
        self.layers = nn.ModuleList(
            [TokenEmbedding(vocab_size, d_model, max_len, dropout)]
            + [TransformerBlock(d_model, n_heads, d_ff, dropout, depth_scale, salt=i + 1) for i in range(n_layers)]
            + [LMHead(d_model, vocab_size)]
        )

    def init_layer(self, index: int) -> None:
        layer = self.layers[index]
        layer.reset_parameters()
        for module in layer.modules():
            if isinstance(module, nn.LayerNorm):
                module.reset_parameters()

    def first_carry(self, batch) -> Carry:
        return {k: batch[k] for k in ("tokens", KEY) if k in batch}
