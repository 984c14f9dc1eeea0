"""Pipelined beam search when each stage holds V chunks (virtual stages), forward only.

The decoder steps through the virtual stages in order, as `PipelinedStepDecoder` steps through
stages: each rank runs its chunks in increasing virtual-stage order, receiving a chunk's
carry from the previous virtual stage (another rank's `Link`, or this rank's `LocalLink` at a
V's turn) and sending it on; the last virtual stage's rank broadcasts the log-probabilities,
once per step, to the whole pipeline. Every rank thus makes the same search decisions, equal
to one device's. With V = 1 this is `PipelinedStepDecoder`'s walk.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from giantpipe.models.candidate_sampling import sample_candidates
from giantpipe.models.contract import Batch, Carry, DecodeResult, batch_size
from giantpipe.strategies.pipelined_decoding import PipelinedStepDecoder, search_through
from giantpipe.strategies.schedule import owner


class ChunkedStepDecoder(PipelinedStepDecoder):
    """The `StepDecoder` protocol for this rank's chunks of a pipelined decoder."""

    def __init__(self, engine) -> None:
        n, placement = engine.num_stages, engine.placement
        stages = n * engine.virtual_stages
        ranks = engine.topology.pipeline_ranks(engine.replica)
        ranges = _all_chunk_ranges(engine)
        group = engine.groups.pipeline if n > 1 else None
        first = engine._chunks[0]
        super().__init__(engine.module, ranges, first.stage, first.prev, first.next, group,
                         [ranks[owner(k, n, placement)[0]] for k in range(stages)], engine.device)  # fmt: skip
        self.chunks = sorted(engine._chunks, key=lambda c: c.stage)
        self.held = {c.stage for c in self.chunks}
        model = engine.module
        self.local_decoder = [i for c in self.chunks for i in model.decoder_indices if i in c.layers]
        self.local_encoder = [i for c in self.chunks for i in model.encoder_indices if i in c.layers]

    def encode(self, batch: Batch) -> tuple[Carry, Tensor]:
        """The encoder through the virtual stages up to the attention's; (what this rank's
        decoder layers need, the encoded source lengths on every rank)."""
        kept: Carry | None = None
        for chunk in self.chunks:
            if chunk.stage > self.memory_stage:
                break
            if chunk.stage == 0:
                carry = {k: v for k, v in self.model.first_carry(batch).items() if not k.startswith("tgt")}
            else:
                carry = chunk.prev.recv_carry()
            layers = [i for i in self.model.encoder_indices if i in chunk.layers]
            carry = self.model.run_layers(carry, layers)
            if chunk.stage < self.memory_stage:
                chunk.next.send_carry(carry)
            else:
                kept = carry
        src_len = kept["src_len"] if kept is not None else None
        src_len = self._broadcast_from(self.memory_stage, src_len, batch_size(batch), torch.long)
        return (kept if kept is not None else {"src_len": src_len}), src_len

    def step(self, tokens: Tensor, state):
        out = None
        for chunk in self.chunks:
            if chunk.stage < self.first_step_stage:
                continue
            if chunk.stage == self.first_step_stage:
                carry = {"tgt_in": tokens.unsqueeze(1)}
            else:
                carry = chunk.prev.recv_carry()
            layers = [i for i in self.model.decoder_indices if i in chunk.layers]
            carry, state = self.model.step_layers(carry, state, layers)
            if chunk.stage < self.num_stages - 1:
                chunk.next.send_carry(carry)
            else:
                out = carry
        return (*self._share_outputs(out, tokens.numel()), state)

    def wait(self) -> None:
        for chunk in self.chunks:
            for link in (chunk.prev, chunk.next):
                if link is not None:
                    link.wait()

    def _broadcast_from(self, stage: int, tensor: Tensor | None, shape, dtype) -> Tensor:
        if self.group is None:
            assert tensor is not None
            return tensor
        if stage not in self.held:
            tensor = torch.empty(shape, dtype=dtype, device=self.device)
        tensor = tensor.to(self.device, dtype).contiguous()
        dist.broadcast(tensor, src=self.rank_of_stage[stage], group=self.group)
        return tensor


def _all_chunk_ranges(engine) -> list[range]:
    """Every virtual stage's layer range (collectively: each rank knows only its own chunks)."""
    stages = engine.num_stages * engine.virtual_stages
    mine = [(c.stage, c.layers.start, c.layers.stop) for c in engine._chunks]
    if engine.num_stages == 1:
        return [range(a, b) for _, a, b in sorted(mine)]
    own = torch.tensor(mine, device=engine.device).flatten()
    parts = [torch.zeros_like(own) for _ in range(engine.num_stages)]
    dist.all_gather(parts, own, group=engine.groups.pipeline)
    rows = sorted(tuple(r) for p in parts for r in p.view(-1, 3).tolist())
    assert [k for k, _, _ in rows] == list(range(stages)), "chunk layout out of step"
    return [range(a, b) for _, a, b in rows]


@torch.no_grad()
def chunked_beam_search(engine, batch: Batch, **search) -> DecodeResult:
    """`pipelined_beam_search` for an engine with several chunks per stage."""
    return search_through(ChunkedStepDecoder(engine), engine, batch, engine.module.beam_search, search)


@torch.no_grad()
def chunked_sample(engine, batch: Batch, **sampling) -> DecodeResult:
    """`pipelined_sample` (risk training's sampled candidates) over several chunks per stage."""
    return search_through(ChunkedStepDecoder(engine), engine, batch, sample_candidates, sampling)
