"""Listen, Attend and Spell (Chan et al. 2016) as a list of composite-layer-ready layers.

    [listener 1 (BLSTM), listener 2..L (pyramidal BLSTM), speller embedding,
     speller 1 + attention, speller 2..K, projection]

A pyramidal layer concatenates adjacent frames before its BLSTM, so time halves per level
(T -> ceil(T/2), lengths too) and the speller attends over T / 2^levels listener states. The
speller layers are GNMT's decoder layers (`gnmt.py`: the bottom one queries the attention,
the upper ones read [y; context]); the projection reads [y; context] like LAS's
CharacterDistribution. Carry keys, layer by layer (B batch, T frames, U target length):

    listener k       {x (B,T,D), src_len (B,), tgt_in}  -> {x (B,T',2H), src_len, tgt_in}
    (the last listener layer writes `memory` (B,S,2H) and `src_mask` (B,S) instead of `x`)
    speller embed    tgt_in (B,U)                       -> y (B,U,E)
    speller 1        {y, memory, src_mask, src_len}     -> {y (B,U,H), context (B,U,2H)}
    speller k        {y, context}                       -> {y, context}
    projection       {y, context}                       -> {logits (B,U,V)}

Batches hold `features` (B,T,n_mels), `feat_len` (B,), `tgt_in` (B,U) = bos + y and, for the
loss and `split`, `tgt_out` (B,U) = y + eos and optionally `tgt_len` (B,). Several targets per
utterance, `tgt_in` (B,R,U) (MWER's N-best lists, see `mwer.py`), run the listener once per
utterance: the speller embedding flattens them to B*R rows and repeats `memory` to match, and
the logits come out as (B*R,U,V). The speller steps one token at a time (`step_layers`) with
per-layer state, so a speller spread over pipeline stages decodes stage by stage, as GNMT's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from giantpipe.models.contract import Batch, Carry, split_batch
from giantpipe.models.gnmt import (
    AttentionDecoderLayer,
    BidirectionalEncoderLayer,
    DecoderLayer,
    OutputProjection,
    TargetEmbedding,
)
from giantpipe.models.seq2seq import AttentionSeq2Seq


def stack_frames(x_btd: Tensor, lengths: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Concatenate each run of `k` frames: (B,T,D) -> (B,ceil(T/k),kD); lengths -> ceil(len/k).

    Frames past each length are zeroed first, so an utterance's last group is completed with
    zeros whatever the batch's padding holds.
    """
    b, t, d = x_btd.shape
    mask = torch.arange(t, device=x_btd.device) < lengths.to(x_btd.device).unsqueeze(1)
    x_btd = x_btd * mask.unsqueeze(-1).to(x_btd.dtype)
    if t % k:
        x_btd = torch.cat([x_btd, x_btd.new_zeros(b, k - t % k, d)], dim=1)
    return x_btd.reshape(b, -(-t // k), k * d), (lengths + k - 1) // k


def pyramid_reduce(x_btd: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """LAS's pyramid step: frames 2t and 2t+1 concatenated, (B,T,D) -> (B,ceil(T/2),2D)."""
    return stack_frames(x_btd, lengths, 2)


class ListenerLayer(BidirectionalEncoderLayer):
    """A BLSTM over the frames; `pyramidal` halves time first; `last` emits the memory."""

    def __init__(self, input_size: int, hidden_size: int, dropout: float, pyramidal: bool,
                 last: bool, init_weight: float = 0.1, stack: int = 1) -> None:
        stack = 2 if pyramidal else stack  # frames concatenated before the BLSTM
        super().__init__(input_size * stack, hidden_size, dropout, "memory" if last else "x",
                         init_weight)
        self.pyramidal, self.last, self.stack = pyramidal, last, stack

    def forward(self, carry: Carry) -> Carry:
        carry = dict(carry)
        if self.stack > 1:
            carry["x"], carry["src_len"] = stack_frames(carry["x"], carry["src_len"], self.stack)
        carry = super().forward(carry)
        if self.last:
            frames = torch.arange(carry["memory"].size(1), device=carry["memory"].device)
            carry["src_mask"] = frames.unsqueeze(0) < carry["src_len"].unsqueeze(1)
        return carry


class SpellerEmbedding(TargetEmbedding):
    """`tgt_in` -> `y`; a (B,R,U) `tgt_in` becomes B*R rows, with the listener outputs repeated."""


class SpellerProjection(OutputProjection):
    """[y; context] -> grapheme logits (LAS's CharacterDistribution, one linear layer)."""

    def __init__(self, hidden_size: int, memory_size: int, vocab_size: int,
                 init_weight: float = 0.1) -> None:
        super().__init__(hidden_size + memory_size, vocab_size, init_weight)

    def forward(self, carry: Carry) -> Carry:
        carry = dict(carry)
        carry["logits"] = self.linear(torch.cat([carry.pop("y"), carry.pop("context")], dim=-1))
        return carry


class LAS(AttentionSeq2Seq):
    """Listener of (pyramidal) BLSTMs, attention, LSTM speller over graphemes.

    `pyramid_levels` of the listener layers after the first halve time, and the first reads
    `frame_stack` frames at a time (low frame rate input: reduction frame_stack * 2**levels);
    the listener's memory is 2 * `listener_hidden` wide.
    """

    def __init__(
        self,
        vocab_size: int,
        n_mels: int = 80,
        listener_hidden: int = 256,
        listener_layers: int = 4,
        pyramid_levels: int = 3,
        speller_hidden: int = 512,
        speller_layers: int = 2,
        embedding_size: int | None = None,
        dropout: float = 0.1,
        attention: str = "normalized_bahdanau",
        pad_id: int = 0,
        init_weight: float = 0.1,
        frame_stack: int = 1,
    ) -> None:
        super().__init__()
        if listener_layers < 1 or speller_layers < 1:
            raise ValueError(f"LAS needs at least one listener and one speller layer, got "
                             f"listener_layers={listener_layers}, speller_layers={speller_layers}")
        if not 0 <= pyramid_levels < listener_layers:
            raise ValueError(f"pyramid_levels must be in [0, listener_layers - 1] (the first "
                             f"layer reads whole frames), got {pyramid_levels} with "
                             f"listener_layers={listener_layers}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if frame_stack < 1:
            raise ValueError(f"frame_stack must be >= 1, got {frame_stack}")
        h, w, memory = listener_hidden, init_weight, 2 * listener_hidden
        self.pad_id, self.reduction = pad_id, frame_stack * 2 ** pyramid_levels

        layers: list[nn.Module] = []
        names = []
        for k in range(listener_layers):
            pyramidal = 1 <= k <= pyramid_levels
            layers.append(ListenerLayer(n_mels if k == 0 else memory, h, dropout, pyramidal,
                                        last=k == listener_layers - 1, init_weight=w,
                                        stack=frame_stack if k == 0 else 1))
            names.append(f"listener_{k + 1}" + ("_pyramid" if pyramidal else ""))
        self.encoder_indices = range(0, len(layers))
        e = embedding_size or speller_hidden
        layers.append(SpellerEmbedding(vocab_size, e, pad_id, w))
        layers.append(AttentionDecoderLayer(e, speller_hidden, memory, dropout, attention, w))
        names += ["speller_embedding", "speller_1_attention"]
        for k in range(2, speller_layers + 1):
            layers.append(DecoderLayer(speller_hidden, memory, dropout, residual=k >= 3,
                                       init_weight=w))
            names.append(f"speller_{k}")
        layers.append(SpellerProjection(speller_hidden, memory, vocab_size, w))
        names.append("projection")
        self.decoder_indices = range(len(self.encoder_indices), len(layers))
        self.layers = nn.ModuleList(layers)
        self.layer_names = names
        for i in range(len(layers)):
            self.init_layer(i)

    def first_carry(self, batch: Batch) -> Carry:
        carry = {"x": batch["features"], "src_len": batch["feat_len"]}
        if "tgt_in" in batch:
            carry["tgt_in"] = batch["tgt_in"]
        return carry

    def split(self, batch: Batch, chunks: int) -> list[Batch]:
        return [trim_speech_padding(mb, self.pad_id) for mb in split_batch(batch, chunks)]

    # --- inference -------------------------------------------------------------------------
    def encode(self, batch: Batch) -> Carry:
        """Run the listener once: {memory (B,S,2H), src_mask (B,S), src_len (B,)}."""
        return self.run_layers({"x": batch["features"], "src_len": batch["feat_len"]},
                               self.encoder_indices)


def trim_speech_padding(batch: Batch, pad_id: int = 0) -> Batch:
    """Cut a (micro-)batch's `features` to its longest utterance and its `tgt_*` (last dim, for
    (B,U) and (B,R,U) targets alike) to its longest target."""
    frames = int(batch["feat_len"].max())
    if "tgt_out" in batch:  # y + eos, never pad inside
        tgt_len = int((batch["tgt_out"] != pad_id).sum(-1).max())
    elif "tgt_len" in batch:
        tgt_len = int(batch["tgt_len"].max())
    else:
        tgt_len = None
    out = {}
    for k, v in batch.items():
        if k == "features":
            v = v[:, :frames]
        elif k.startswith("tgt") and v.dim() >= 2 and tgt_len is not None:
            v = v[..., :tgt_len]
        out[k] = v
    return out
