"""GNMT (Wu et al. 2016; NVIDIA's GNMT v2 layout) as a list of composite-layer-ready layers.

    [src embedding, encoder 1 (bi), encoder 2, ..., tgt embedding,
     decoder 1 + attention, decoder 2, ..., projection]

Carry keys, layer by layer (B batch, S source, T target length):

    src embedding   {src, src_len, tgt_in}   -> {x (B,S,E), src_mask (B,S) bool, src_len, tgt_in}
    encoder 1 (bi)  x                        -> x (B,S,2H)  forward and backward LSTM
    encoder k       x                        -> x (B,S,H)   residual from k = 3 on
    (last encoder layer writes `memory` instead of `x`)
    tgt embedding   tgt_in                   -> y (B,T,E)
    decoder 1       {y, memory, src_mask, src_len} -> {y (B,T,H), context (B,T,M)}
    decoder k       {y, context}             -> {y, context}  input [y; context], residual k >= 3
    projection      {y, context}             -> {logits (B,T,V)}

Keys a layer does not read pass through untouched, so any contiguous run of layers can be
a pipeline stage. The decoder layers also step one token at a time (`step`) with their own
recurrent state, so a decoder spread over stages decodes stage by stage: the step carry for
one token ({tgt_in (N,1)} -> ... -> {logits (N,1,V), attn (N,1,S)}) is what travels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from giantpipe.models.attention import Attention
from giantpipe.models.contract import Batch, Carry, split_batch
from giantpipe.models.seq2seq import AttentionSeq2Seq, State, StatelessStep


def _uniform_lstm_(lstm: nn.LSTM, init_weight: float) -> None:
    """NVIDIA GNMT init: weights and input biases uniform, hidden biases zero."""
    for name, p in lstm.named_parameters():
        if name.startswith("bias_hh"):
            nn.init.zeros_(p)
        else:
            nn.init.uniform_(p, -init_weight, init_weight)


def _lstm_state(state: State | None) -> tuple[Tensor, Tensor] | None:
    return None if state is None else (state["h"].unsqueeze(0), state["c"].unsqueeze(0))


class Embedding(StatelessStep):
    """Token ids `in_key` -> vectors `out_key`."""

    def __init__(self, vocab_size: int, dim: int, pad_id: int, in_key: str, out_key: str,
                 init_weight: float = 0.1) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        self.in_key, self.out_key, self.init_weight = in_key, out_key, init_weight

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.embedding.weight, -self.init_weight, self.init_weight)
        with torch.no_grad():
            self.embedding.weight[self.embedding.padding_idx].zero_()

    def forward(self, carry: Carry) -> Carry:
        carry = dict(carry)
        ids = carry.pop(self.in_key)
        carry[self.out_key] = self.embedding(ids)
        return carry


class TargetEmbedding(Embedding):
    """`tgt_in` -> `y`. Several targets per source, `tgt_in` (B,R,U) (MWER's N-best lists),
    become B*R rows with the encoder outputs repeated, so the encoder runs once per source."""

    repeated_per_target = ("memory", "src_mask", "src_len")

    def __init__(self, vocab_size: int, dim: int, pad_id: int, init_weight: float = 0.1) -> None:
        super().__init__(vocab_size, dim, pad_id, "tgt_in", "y", init_weight)

    def forward(self, carry: Carry) -> Carry:
        carry = dict(carry)
        if carry["tgt_in"].dim() == 3:
            per_item = carry["tgt_in"].size(1)
            carry["tgt_in"] = carry["tgt_in"].flatten(0, 1)
            for key in self.repeated_per_target:
                if key in carry:
                    carry[key] = carry[key].repeat_interleave(per_item, dim=0)
        return super().forward(carry)


class SourceEmbedding(Embedding):
    """`src` -> `x`, plus the padding mask `src_mask` (B,S) that attention needs later."""

    def __init__(self, vocab_size: int, dim: int, pad_id: int, init_weight: float = 0.1) -> None:
        super().__init__(vocab_size, dim, pad_id, "src", "x", init_weight)

    def forward(self, carry: Carry) -> Carry:
        carry = super().forward(carry)
        positions = torch.arange(carry["x"].size(1), device=carry["x"].device)
        carry["src_mask"] = positions.unsqueeze(0) < carry["src_len"].unsqueeze(1)
        return carry


class BidirectionalEncoderLayer(nn.Module):
    """Encoder layer 1: a forward and a backward LSTM over the source, outputs concatenated.

    The backward LSTM reads each sentence reversed *within its length* (padding stays at the
    end), so it starts at the sentence's last real token and padding never leaks into real
    positions, as packing would give; but both directions run as plain batched LSTMs, which
    on a CPU are several times faster than packed ones. Outputs at padded positions are zero.
    """

    residual = False

    def __init__(self, input_size: int, hidden_size: int, dropout: float, out_key: str = "x",
                 init_weight: float = 0.1) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, batch_first=True)
        self.lstm_reverse = nn.LSTM(input_size, hidden_size, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.out_key, self.init_weight = out_key, init_weight

    def reset_parameters(self) -> None:
        _uniform_lstm_(self.lstm, self.init_weight)
        _uniform_lstm_(self.lstm_reverse, self.init_weight)

    def forward(self, carry: Carry) -> Carry:
        carry = dict(carry)
        x_bse = self.dropout(carry.pop("x"))
        lengths = carry["src_len"].to(x_bse.device).unsqueeze(1)
        positions = torch.arange(x_bse.size(1), device=x_bse.device).unsqueeze(0)
        # position t <-> len - 1 - t inside each sentence, padding in place: its own inverse
        index = torch.where(positions < lengths, lengths - 1 - positions, positions)
        index = index.unsqueeze(-1)
        forward_bsh, _ = self.lstm(x_bse)
        reversed_bsh, _ = self.lstm_reverse(x_bse.gather(1, index.expand_as(x_bse)))
        backward_bsh = reversed_bsh.gather(1, index.expand_as(reversed_bsh))
        mask = (positions < lengths).unsqueeze(-1).to(forward_bsh.dtype)
        carry[self.out_key] = torch.cat([forward_bsh, backward_bsh], dim=-1) * mask
        return carry


class EncoderLayer(nn.Module):
    """A unidirectional encoder LSTM layer; `residual` adds its input to its output."""

    def __init__(self, input_size: int, hidden_size: int, dropout: float, residual: bool,
                 out_key: str = "x", init_weight: float = 0.1) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.residual, self.out_key, self.init_weight = residual, out_key, init_weight

    def reset_parameters(self) -> None:
        _uniform_lstm_(self.lstm, self.init_weight)

    def forward(self, carry: Carry) -> Carry:
        carry = dict(carry)
        x = carry.pop("x")
        out, _ = self.lstm(self.dropout(x))
        carry[self.out_key] = out + x if self.residual else out
        return carry


class AttentionDecoderLayer(nn.Module):
    """Decoder layer 1: an LSTM over the target embeddings whose outputs query the attention.

    Consumes `memory`/`src_mask`/`src_len` (later layers don't need them) and emits the
    attention `context` for the upper layers; `emit_attention` also puts the weights in `attn`.
    """

    residual = False

    def __init__(self, input_size: int, hidden_size: int, memory_size: int, dropout: float,
                 attention: str, init_weight: float = 0.1) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, batch_first=True)
        self.attention = Attention(hidden_size, memory_size, kind=attention, init_weight=init_weight)
        self.dropout = nn.Dropout(dropout)
        self.init_weight = init_weight
        self.emit_attention = False

    def reset_parameters(self) -> None:
        _uniform_lstm_(self.lstm, self.init_weight)
        self.attention.reset_parameters()

    def _run(self, y: Tensor, memory: Tensor, keys: Tensor, mask: Tensor,
             state: State | None) -> tuple[Tensor, Tensor, Tensor, State]:
        out, (h, c) = self.lstm(self.dropout(y), _lstm_state(state))
        context, weights = self.attention(out, keys, memory, mask)
        return out, context, weights, {"h": h.squeeze(0), "c": c.squeeze(0)}

    def forward(self, carry: Carry) -> Carry:
        carry = dict(carry)
        memory, mask = carry.pop("memory"), carry.pop("src_mask")
        carry.pop("src_len", None)
        keys = self.attention.project_keys(memory)
        y, context, weights, _ = self._run(carry.pop("y"), memory, keys, mask, None)
        carry.update(y=y, context=context)
        if self.emit_attention:
            carry["attn"] = weights
        return carry

    def init_step_state(self, encoded: Carry, beam_size: int) -> State:
        memory = encoded["memory"].repeat_interleave(beam_size, dim=0)
        n, h = memory.size(0), self.lstm.hidden_size
        zeros = memory.new_zeros(n, h)
        return {
            "memory": memory,
            "keys": self.attention.project_keys(memory),
            "src_mask": encoded["src_mask"].repeat_interleave(beam_size, dim=0),
            "h": zeros,
            "c": zeros.clone(),
        }

    def step(self, carry: Carry, state: State) -> tuple[Carry, State]:
        carry = dict(carry)
        y, context, weights, hc = self._run(
            carry.pop("y"), state["memory"], state["keys"], state["src_mask"], state
        )
        carry.update(y=y, context=context, attn=weights)
        return carry, {**state, **hc}


class DecoderLayer(nn.Module):
    """An upper decoder LSTM layer over [y; context]; `residual` adds y to its output."""

    def __init__(self, hidden_size: int, memory_size: int, dropout: float, residual: bool,
                 init_weight: float = 0.1) -> None:
        super().__init__()
        self.lstm = nn.LSTM(hidden_size + memory_size, hidden_size, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.residual, self.init_weight = residual, init_weight

    def reset_parameters(self) -> None:
        _uniform_lstm_(self.lstm, self.init_weight)

    def _run(self, carry: Carry, state: State | None) -> tuple[Carry, State]:
        carry = dict(carry)
        y = carry["y"]
        out, (h, c) = self.lstm(self.dropout(torch.cat([y, carry["context"]], dim=-1)),
                                _lstm_state(state))
        carry["y"] = out + y if self.residual else out
        return carry, {"h": h.squeeze(0), "c": c.squeeze(0)}

    def forward(self, carry: Carry) -> Carry:
        return self._run(carry, None)[0]

    def init_step_state(self, encoded: Carry, beam_size: int) -> State:
        n = encoded["src_len"].size(0) * beam_size
        zeros = self.lstm.weight_hh_l0.new_zeros(n, self.lstm.hidden_size)
        return {"h": zeros, "c": zeros.clone()}

    def step(self, carry: Carry, state: State) -> tuple[Carry, State]:
        return self._run(carry, state)


class OutputProjection(StatelessStep):
    """Top decoder output -> vocabulary logits; the loss is the task's business."""

    def __init__(self, hidden_size: int, vocab_size: int, init_weight: float = 0.1) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, vocab_size)
        self.init_weight = init_weight

    def reset_parameters(self) -> None:
        for p in self.linear.parameters():
            nn.init.uniform_(p, -self.init_weight, self.init_weight)

    def forward(self, carry: Carry) -> Carry:
        carry = dict(carry)
        carry.pop("context", None)
        carry["logits"] = self.linear(carry.pop("y"))
        return carry


class GNMT(AttentionSeq2Seq):
    """GNMT v2: bidirectional first encoder layer, residuals from layer 3, attention at decoder 1.

    Batches hold `src` (B,S), `src_len` (B,), `tgt_in` (B,T) = bos + y and, for the loss and
    `split`, `tgt_out` (B,T) = y + eos and optionally `tgt_len` (B,). Several targets per
    source, (B,R,T) (MWER's N-best lists), give logits (B*R,T,V) (`TargetEmbedding`).

    Args:
        src_vocab_size, tgt_vocab_size: separate embeddings, never tied, so that any layer can
            live on any pipeline stage.
        hidden_size: LSTM width H (each direction of encoder 1 has H units).
        num_encoder_layers, num_decoder_layers: counting encoder 1 (bi) and decoder 1.
        embedding_size: E; defaults to H.
        dropout: applied to the input of every LSTM layer.
        attention: "normalized_bahdanau" (GNMT v2), "bahdanau" or "dot".
        pad_id: the padding id: its embedding row stays zero and `split` trims it away.
        init_weight: parameters start uniform in (-w, w), as in NVIDIA's GNMT.
    """

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        hidden_size: int = 1024,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        embedding_size: int | None = None,
        dropout: float = 0.2,
        attention: str = "normalized_bahdanau",
        pad_id: int = 0,
        init_weight: float = 0.1,
    ) -> None:
        super().__init__()
        if num_encoder_layers < 1 or num_decoder_layers < 1:
            raise ValueError(
                f"GNMT needs at least one encoder and one decoder layer, got "
                f"num_encoder_layers={num_encoder_layers}, num_decoder_layers={num_decoder_layers}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        e, h, w = embedding_size or hidden_size, hidden_size, init_weight
        memory_size = 2 * h if num_encoder_layers == 1 else h
        self.pad_id = pad_id

        def enc_out(k: int) -> str:
            return "memory" if k == num_encoder_layers else "x"

        layers: list[nn.Module] = [SourceEmbedding(src_vocab_size, e, pad_id, w)]
        names = ["src_embedding", "encoder_1_bi"]
        layers.append(BidirectionalEncoderLayer(e, h, dropout, enc_out(1), w))
        for k in range(2, num_encoder_layers + 1):
            in_size = 2 * h if k == 2 else h
            layers.append(EncoderLayer(in_size, h, dropout, residual=k >= 3, out_key=enc_out(k),
                                       init_weight=w))
            names.append(f"encoder_{k}")
        self.encoder_indices = range(0, len(layers))
        layers.append(TargetEmbedding(tgt_vocab_size, e, pad_id, w))
        layers.append(AttentionDecoderLayer(e, h, memory_size, dropout, attention, w))
        names += ["tgt_embedding", "decoder_1_attention"]
        for k in range(2, num_decoder_layers + 1):
            layers.append(DecoderLayer(h, memory_size, dropout, residual=k >= 3, init_weight=w))
            names.append(f"decoder_{k}")
        layers.append(OutputProjection(h, tgt_vocab_size, w))
        names.append("projection")
        self.decoder_indices = range(len(self.encoder_indices), len(layers))
        self.layers = nn.ModuleList(layers)
        self.layer_names = names
        for i in range(len(layers)):
            self.init_layer(i)

    def first_carry(self, batch: Batch) -> Carry:
        return {k: batch[k] for k in ("src", "src_len", "tgt_in") if k in batch}

    def split(self, batch: Batch, chunks: int) -> list[Batch]:
        return [trim_padding(mb, self.pad_id) for mb in split_batch(batch, chunks)]

    # --- inference -------------------------------------------------------------------------
    def encode(self, batch: Batch) -> Carry:
        """Run the encoder layers once: {memory (B,S,M), src_mask (B,S), src_len (B,)}."""
        carry = {k: batch[k] for k in ("src", "src_len")}
        return self.run_layers(carry, self.encoder_indices)


def trim_padding(batch: Batch, pad_id: int = 0) -> Batch:
    """Cut a (micro-)batch's `src*` and `tgt*` matrices to its own longest source and target."""
    src_len = int(batch["src_len"].max())
    if "tgt_len" in batch:
        tgt_len = int(batch["tgt_len"].max())
    elif "tgt_out" in batch:
        tgt_len = int((batch["tgt_out"] != pad_id).sum(-1).max())
    else:
        tgt_len = None
    out = {}
    for k, v in batch.items():
        if v.dim() >= 2 and k.startswith("src"):
            v = v[:, :src_len]
        elif v.dim() >= 2 and k.startswith("tgt") and tgt_len is not None:
            v = v[..., :tgt_len]  # (B,T) or N-best (B,R,T)
        out[k] = v
    return out
