"""What every attention encoder-decoder in giantpipe shares: the incremental decode step.

A subclass builds `layers` as [encoder layers..., target embedding, decoder 1 + attention,
decoder 2..., projection] and sets `encoder_indices` / `decoder_indices`. Each decoder-side
layer has `init_step_state(encoded, beam)` and `step(carry, state)`, so a decoder spread over
pipeline stages is stepped stage by stage: each stage steps its own `indices`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from giantpipe.models.beam_search import BeamSearchResult
from giantpipe.models.beam_search import beam_search as run_beam_search
from giantpipe.models.contract import Carry, LayeredModel

State = dict[str, Tensor]


class StatelessStep(nn.Module):
    """A decoder-side layer without recurrent state (embedding, projection): a decoding step is
    its forward."""

    def init_step_state(self, encoded: Carry, beam_size: int) -> State:
        return {}

    def step(self, carry: Carry, state: State) -> tuple[Carry, State]:
        return self(carry), state


class AttentionSeq2Seq(LayeredModel):
    encoder_indices: range
    decoder_indices: range

    def init_layer(self, index: int) -> None:
        self.layers[index].reset_parameters()

    @property
    def emit_attention(self) -> bool:
        return self.layers[self.decoder_indices[1]].emit_attention

    @emit_attention.setter
    def emit_attention(self, value: bool) -> None:
        """Also put decoder 1's attention weights (B,T,S) in the carry as `attn` (for inspection)."""
        self.layers[self.decoder_indices[1]].emit_attention = value

    def init_step_states(self, encoded: Carry, beam_size: int = 1, indices=None) -> dict[int, State]:
        """Fresh recurrent state per decoder layer, every input repeated `beam_size` times.

        `encoded` needs `src_len`; decoder 1 also reads `memory` and `src_mask` from it.
        """
        indices = self.decoder_indices if indices is None else indices
        return {i: self.layers[i].init_step_state(encoded, beam_size) for i in indices}

    def step_layers(self, carry: Carry, states: dict[int, State], indices=None) -> tuple[Carry, dict[int, State]]:
        """Advance decoder layers `indices` (default: all in `states`) by one token.

        The step carry is {tgt_in (N,1)} before the embedding, {logits (N,1,V), attn (N,1,S)}
        after the projection.
        """
        states = dict(states)
        for i in sorted(states) if indices is None else indices:
            carry, states[i] = self.layers[i].step(carry, states[i])
        return carry, states

    @staticmethod
    def reorder_step_states(states: dict[int, State], index: Tensor) -> dict[int, State]:
        """Select rows (beams) of every state tensor; all of them are batch-first."""
        return {i: {k: v.index_select(0, index) for k, v in s.items()} for i, s in states.items()}

    def step_decoder(self) -> Seq2SeqStepDecoder:
        return Seq2SeqStepDecoder(self)

    def beam_search(self, decoder, encoded: Carry, src_len: Tensor, **search) -> BeamSearchResult:
        """Beam search driven by `decoder` (`step_decoder()`, or a pipelined one): the search
        the `Decodable` contract offers, so strategies need not import models.beam_search."""
        return run_beam_search(decoder, encoded, src_len, **search)


class Seq2SeqStepDecoder:
    """The beam-search decoder protocol (init_state / step / reorder) over a whole decoder."""

    def __init__(self, model: AttentionSeq2Seq) -> None:
        self.model = model

    def init_state(self, encoded: Carry, beam_size: int) -> dict[int, State]:
        return self.model.init_step_states(encoded, beam_size)

    def step(self, tokens: Tensor, state: dict[int, State]) -> tuple[Tensor, Tensor, dict[int, State]]:
        carry, state = self.model.step_layers({"tgt_in": tokens.unsqueeze(1)}, state)
        log_probs = F.log_softmax(carry["logits"][:, 0].float(), dim=-1)
        return log_probs, carry["attn"][:, 0], state

    def reorder(self, state: dict[int, State], beam_indices: Tensor) -> dict[int, State]:
        return self.model.reorder_step_states(state, beam_indices)
