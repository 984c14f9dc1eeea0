"""The models `bench_pipeline.py` measures, each with its fixed batches, loss and 2-stage balance.

    mlp    8 x Linear(1024)+ReLU, batch 1024, squared error: DESIGN §3's peer measurement
    giant  the giant net (decoder-only Transformer LM, fixed shapes)
    seq    a toy masked sequence model whose batches change length every step
    gnmt   GNMT (models/gnmt.py, the `experiment=gnmt` size) on synthetic sentence pairs of
           varying lengths

Every batch is generated from a fixed seed, so every run measures the same work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from giantpipe.models.contract import LayeredModel, split_batch
from giantpipe.models.giant_net import GiantNet
from giantpipe.models.gnmt import GNMT
from giantpipe.models.losses import TokenCrossEntropy

SEED = 0
MODES = ("never", "except_last", "always")
MODEL_NAMES = ("mlp", "giant", "seq", "gnmt")


class Dense(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, carry):
        return {"h": torch.relu(self.linear(carry["h"]))}


class MLP(LayeredModel):
    def __init__(self, width: int = 1024, depth: int = 8):
        super().__init__()
        self.layers = nn.ModuleList([Dense(width) for _ in range(depth)])

    def first_carry(self, batch):
        return {"h": batch["x"]}


class SquaredError:
    def __call__(self, out, micro_batch):
        return (out["h"] - micro_batch["y"]).pow(2).sum()

    def normalizer(self, batch):
        return float(batch["y"].numel())


class SeqEmbed(nn.Module):
    def __init__(self, d_in: int, d: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d)

    def forward(self, carry):
        mask = carry["mask"]
        return {"h": torch.tanh(self.proj(carry["x"])) * mask.unsqueeze(-1), "mask": mask}


class SeqBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ff_in, self.ff_out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, carry):
        h, mask = carry["h"], carry["mask"].unsqueeze(-1)
        return {**carry, "h": h + self.ff_out(F.gelu(self.ff_in(h))) * mask}


class SeqHead(nn.Module):
    def __init__(self, d: int, vocab: int):
        super().__init__()
        self.out = nn.Linear(d, vocab)

    def forward(self, carry):
        return {"logits": self.out(carry["h"]), "mask": carry["mask"]}


class SeqModel(LayeredModel):
    """Padded sequences + mask; `split` trims each micro-batch to its own longest sequence."""

    def __init__(self, d_in: int = 32, d: int = 256, depth: int = 6, vocab: int = 64):
        super().__init__()
        self.layers = nn.ModuleList(
            [SeqEmbed(d_in, d), *(SeqBlock(d) for _ in range(depth)), SeqHead(d, vocab)]
        )

    def split(self, batch, chunks):
        parts = split_batch(batch, chunks)
        return [{k: v[:, : int(mb["mask"].sum(1).max())] for k, v in mb.items()} for mb in parts]


class MaskedTokenLoss:
    def __call__(self, out, micro_batch):
        mask = micro_batch["mask"]
        return F.cross_entropy(out["logits"][mask], micro_batch["y"][mask], reduction="sum")

    def normalizer(self, batch):
        return float(batch["mask"].sum())


@dataclass
class ModelSpec:
    name: str
    description: str
    factory: object  # zero-argument callable building the LayeredModel
    loss: object
    batches: list  # the batches cycled through, one per step
    balance: list[int]
    peer_keys: list[str] | None  # carry key entering each stage, then the output's; None: no peer
    samples: int
    tokens: list[int] | None = None  # target tokens of each batch (sequence models)
    micro_batches: tuple[int, ...] | None = None  # this model's M grid (None: the script's)
    layer_costs: list[float] | None = None  # per-layer cost for V > 1 balances (None: parameters)
    modes: tuple[str, ...] = MODES  # re-materialization modes measured with 2 stages

    @property
    def mean_tokens(self) -> float | None:
        return sum(self.tokens) / len(self.tokens) if self.tokens else None


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_spec(name: str, quick: bool) -> ModelSpec:
    gen = _seeded(SEED)
    if name == "mlp":
        width, batch = (256, 128) if quick else (1024, 1024)
        data = {
            "x": torch.randn(batch, width, generator=gen),
            "y": torch.randn(batch, width, generator=gen),
        }
        return ModelSpec(
            "mlp", f"8 x Linear({width})+ReLU, batch {batch}, squared error",
            lambda: MLP(width, 8), SquaredError(), [data], [4, 4], ["h", "h", "h"], batch,
        )  # fmt: skip
    if name == "giant":
        d, layers, batch, seq = (32, 2, 16, 16) if quick else (128, 6, 32, 64)
        factory = lambda: GiantNet(256, d, layers, 4, 4 * d, seq, dropout=0.0)  # noqa: E731
        tokens = torch.randint(256, (batch, seq + 1), generator=gen)
        data = {"tokens": tokens[:, :-1].contiguous(), "targets": tokens[:, 1:].contiguous()}
        half = (layers + 2) // 2
        return ModelSpec(
            "giant", f"giant net: {layers} blocks, d_model {d}, batch {batch} x {seq} tokens",
            factory, TokenCrossEntropy(), [data], [half, layers + 2 - half],
            ["tokens", "h", "logits"], batch, tokens=[batch * seq],
        )  # fmt: skip
    if name == "seq":
        d, depth, batch, max_len = (32, 2, 16, 12) if quick else (128, 6, 64, 48)
        batches = []
        for _ in range(4):  # a different longest sequence every step
            width = int(torch.randint(max_len // 2, max_len + 1, (), generator=gen))
            lengths = torch.randint(1, width + 1, (batch,), generator=gen)
            lengths[0] = width
            mask = torch.arange(width) < lengths.unsqueeze(1)
            x = torch.randn(batch, width, 32, generator=gen) * mask.unsqueeze(-1)
            batches.append(
                {"x": x, "mask": mask, "y": torch.randint(64, (batch, width), generator=gen) * mask}
            )
        return ModelSpec(
            "seq", f"toy masked sequence model: {depth} blocks, d {d}, batch {batch}, length <= {max_len}, trimmed per micro-batch",
            lambda: SeqModel(32, d, depth, 64), MaskedTokenLoss(), batches, [(depth + 2) // 2, depth + 2 - (depth + 2) // 2], None, batch,
            tokens=[int(b["mask"].sum()) for b in batches],
        )  # fmt: skip
    if name == "gnmt":
        return gnmt_spec(gen, quick)
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}")


def gnmt_spec(gen: torch.Generator, quick: bool) -> ModelSpec:
    """GNMT at the `experiment=gnmt` size (3+3 LSTM layers of 128, 1000 wordpieces, batch 64)
    on synthetic sentence pairs: every batch has other longest source and target lengths, and
    `GNMT.split` trims each micro-batch to its own. Balance [5, 4] (the embeddings and the
    encoder | the decoder and the projection) is what `balance_by_cost` gives for per-layer
    times measured here (forward + backward ms: 0.4 24.0 15.5 10.8 0.2 | 22.7 15.6 15.1 8.3).
    With V = 2 chunks the balance comes from `GNMT_LAYER_MS` (`measure_costs(..., "time")`
    without the loss, the mean over the first two batches, 2026-12-02): by parameters the embeddings and the
    projection weigh far more than they cost, and rank 0 got 82 ms of layers against 62."""
    hidden, layers, vocab, batch, max_len = (
        (32, 2, 100, 16, 10) if quick else (128, 3, 1000, 64, 24)
    )
    batches = [_sentence_pairs(gen, batch, max_len, vocab) for _ in range(4)]
    return ModelSpec(
        "gnmt",
        f"GNMT {layers}+{layers} LSTM layers of {hidden}, vocab {vocab}, batch {batch} pairs of "
        f"<= {max_len} tokens, trimmed per micro-batch",
        lambda: GNMT(vocab, vocab, hidden, layers, layers, dropout=0.1, init_weight=0.4),
        TokenCrossEntropy(0.1, ignore_index=0, target_key="tgt_out"),
        batches,
        [layers + 2, layers + 1],
        None,
        batch,
        tokens=[int((b["tgt_out"] != 0).sum()) for b in batches],
        micro_batches=(1, 4) if quick else (1, 2, 4, 8),
        modes=("never", "always"),
        layer_costs=None if quick else GNMT_LAYER_MS,
    )


GNMT_LAYER_MS = [0.3, 30.0, 20.0, 14.5, 0.3, 34.0, 17.5, 17.0, 10.0]  # forward + backward, 1 thread


def _sentence_pairs(gen: torch.Generator, batch: int, max_len: int, vocab: int) -> dict:
    """Random wordpiece ids (4.. vocab-1; 0 pads, 1 starts the target) of random lengths."""

    def lengths(longest: int) -> torch.Tensor:
        out = torch.randint(2, longest + 1, (batch,), generator=gen)
        out[int(torch.randint(batch, (), generator=gen))] = longest
        return out

    s_max, t_max = (int(torch.randint(max_len // 2, max_len + 1, (), generator=gen)) for _ in "st")
    src_len, tgt_len = lengths(s_max), lengths(t_max)
    src = torch.randint(4, vocab, (batch, s_max), generator=gen)
    src = src * (torch.arange(s_max) < src_len.unsqueeze(1))
    tgt_mask = torch.arange(t_max) < tgt_len.unsqueeze(1)
    tgt_out = torch.randint(4, vocab, (batch, t_max), generator=gen) * tgt_mask
    tgt_in = torch.cat([torch.ones(batch, 1, dtype=torch.long), tgt_out[:, :-1]], 1) * tgt_mask
    return {
        "src": src,
        "src_len": src_len,
        "tgt_in": tgt_in,
        "tgt_out": tgt_out,
        "tgt_len": tgt_len,
    }
