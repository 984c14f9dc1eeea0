"""Encoder-decoder attention for GNMT (and LAS): normalized Bahdanau, plain Bahdanau, dot product.

Normalized Bahdanau is GNMT v2's attention (NVIDIA DeepLearningExamples, after Luong's
normalization of the score vector): score(q, k) = g * v/|v| . tanh(W_q q + W_k k + b), with
a learned scalar g (initialized to 1/sqrt(units)) and bias b (zeros). `additive` drops g, b and
the normalization (plain Bahdanau). `dot` is Luong's scaled "general" score q . W_k k / sqrt(d).

Keys are projected once per source (`project_keys`) so that incremental decoding can cache
them; padded source positions (`mask_bs` False) get zero weight.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTENTION_KINDS = ("normalized_bahdanau", "bahdanau", "dot")


class Attention(nn.Module):
    """Attention of decoder queries (B, T, query_dim) over memory (B, S, key_dim)."""

    def __init__(
        self,
        query_dim: int,
        key_dim: int,
        units: int | None = None,
        kind: str = "normalized_bahdanau",
        init_weight: float = 0.1,
    ) -> None:
        super().__init__()
        if kind not in ATTENTION_KINDS:
            raise ValueError(f"unknown attention kind {kind!r}; choose one of {ATTENTION_KINDS}")
        self.kind = kind
        self.units = units or query_dim
        self.init_weight = init_weight
        if kind == "dot":
            # keys are projected into the query space; the score is a scaled dot product
            self.linear_k = nn.Linear(key_dim, query_dim, bias=False)
        else:
            self.linear_q = nn.Linear(query_dim, self.units, bias=False)
            self.linear_k = nn.Linear(key_dim, self.units, bias=False)
            self.v = nn.Parameter(torch.empty(self.units))
        if kind == "normalized_bahdanau":
            self.g = nn.Parameter(torch.empty(()))
            self.b = nn.Parameter(torch.empty(self.units))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in self.parameters():
            nn.init.uniform_(p, -self.init_weight, self.init_weight)
        if self.kind == "normalized_bahdanau":
            nn.init.constant_(self.g, 1.0 / math.sqrt(self.units))
            nn.init.zeros_(self.b)

    def project_keys(self, memory_bsk: Tensor) -> Tensor:
        """W_k memory, computed once per source sentence and reused at every decoder step."""
        return self.linear_k(memory_bsk)

    def scores(self, query_btq: Tensor, keys_bsu: Tensor) -> Tensor:
        """Unnormalized scores (B, T, S)."""
        if self.kind == "dot":
            return query_btq @ keys_bsu.transpose(1, 2) / math.sqrt(query_btq.size(-1))
        q_btu = self.linear_q(query_btq)
        if self.kind == "normalized_bahdanau":
            v = self.g * self.v / self.v.norm()
            hidden = torch.tanh(q_btu.unsqueeze(2) + keys_bsu.unsqueeze(1) + self.b)
        else:
            v = self.v
            hidden = torch.tanh(q_btu.unsqueeze(2) + keys_bsu.unsqueeze(1))
        return hidden @ v  # (B, T, S, U) @ (U,) -> (B, T, S)

    def forward(
        self, query_btq: Tensor, keys_bsu: Tensor, memory_bsk: Tensor, mask_bs: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Return (context (B, T, key_dim), weights (B, T, S)); masked positions weigh 0."""
        scores_bts = self.scores(query_btq, keys_bsu)
        scores_bts = scores_bts.masked_fill(~mask_bs.unsqueeze(1), float("-inf"))
        weights_bts = F.softmax(scores_bts, dim=-1)
        return weights_bts @ memory_bsk, weights_bts
