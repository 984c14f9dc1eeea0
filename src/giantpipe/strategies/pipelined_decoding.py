"""Beam search when the decoder spans several pipeline stages, with one device's results.

Every rank of a pipeline runs the same `beam_search` bookkeeping on the same batch; only the
model work is spread out. For a 2-stage GNMT cut inside the decoder:

    stage 0 [src emb, enc 1..n, tgt emb, dec 1]      stage 1 [dec 2..m, projection]
    encoder pass:  {src, src_len} -> {memory, src_mask, src_len}   (kept: stage 0 holds dec 1)
    step t:        {tgt_in (N,1)} -> dec 1 -> {y, context, attn} ==send==> dec 2..m -> projection
                   log-probs (N,V) and attention (N,S) <==broadcast== last stage
    reorder:       every rank keeps rows `beam_indices` of its own layers' states

- The encoder pass runs the encoder layers stage by stage; the carry travels on from stage 0
  to the stage holding the first decoder layer that reads the encoder outputs (the attention
  layer), so `memory` reaches it wherever the cut is. That stage then broadcasts the encoded
  source lengths (a pyramidal listener shortens them) to the whole pipeline.
- Each step, the stage holding the target embedding starts the one-token step carry, each
  stage steps its local decoder layers (`step_layers` with their own recurrent state) and
  sends the carry on; the last stage turns logits into log-probabilities and broadcasts them
  with the attention weights (for the coverage penalty) to every rank of the pipeline.
- Because every rank receives the very same tensors, every rank's top-k, finished lists and
  reorders are identical to one another and to a single-device search.
- Sampled candidates (`pipelined_sample`, for risk training) run the same steps: every rank
  draws the same tokens from the shared log-probabilities and keyed noise.

Models provide `encoder_indices`, `decoder_indices`, `first_carry`, `init_step_states`,
`step_layers` and `reorder_step_states` (GNMT, LAS); this module never looks inside a layer.
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from giantpipe.models.candidate_sampling import sample_candidates
from giantpipe.models.contract import Batch, Carry, DecodeResult, batch_size

State = dict[int, dict[str, Tensor]]


class PipelinedStepDecoder:
    """The `StepDecoder` protocol for this rank's share of a pipelined decoder.

    Args:
        model: the (partly materialized) model; only this stage's layers are used.
        stage_ranges: every stage's layer indices (contiguous), stage 0 first.
        stage: this rank's stage.
        prev, next: links to the neighbouring stages (`comm.Link`), None at the ends.
        group: the pipeline's process group (None with one stage).
        rank_of_stage: the global rank of each stage of this pipeline.
        device: where this stage's layers live.
    """

    def __init__(self, model, stage_ranges: list[range], stage: int, prev, next, group,
                 rank_of_stage: list[int], device: torch.device | str = "cpu") -> None:
        self.model, self.stage, self.num_stages = model, stage, len(stage_ranges)
        self.prev, self.next, self.group = prev, next, group
        self.rank_of_stage, self.device = rank_of_stage, torch.device(device)
        local = set(stage_ranges[stage])
        self.local_decoder = [i for i in model.decoder_indices if i in local]
        self.local_encoder = [i for i in model.encoder_indices if i in local]
        stage_of = {i: s for s, layers in enumerate(stage_ranges) for i in layers}
        self.first_step_stage = stage_of[model.decoder_indices[0]]  # holds the target embedding
        self.memory_stage = stage_of[model.decoder_indices[1]]  # holds the attention layer
        self._shape: tuple[int, int] | None = None  # (vocab, source positions) once known

    # ------------------------------------------------------------------ encoder pass
    def encode(self, batch: Batch) -> tuple[Carry, Tensor]:
        """Run the encoder through the stages; return (what this rank's decoder layers need to
        initialize, the encoded source lengths on every rank)."""
        carry: Carry | None = None
        if self.stage <= self.memory_stage:
            if self.stage == 0:
                carry = {k: v for k, v in self.model.first_carry(batch).items()
                         if not k.startswith("tgt")}
            else:
                carry = self.prev.recv_carry()
            carry = self.model.run_layers(carry, self.local_encoder)
            if self.stage < self.memory_stage:
                self.next.send_carry(carry)
        src_len = carry["src_len"] if self.stage == self.memory_stage else None
        src_len = self._broadcast_from(self.memory_stage, src_len, batch_size(batch), torch.long)
        if self.stage == self.memory_stage:
            return carry, src_len
        return {"src_len": src_len}, src_len

    # ------------------------------------------------------------------ StepDecoder protocol
    def init_state(self, encoded: Carry, beam_size: int) -> State:
        self._shape = None
        return self.model.init_step_states(encoded, beam_size, self.local_decoder)

    def step(self, tokens: Tensor, state: State) -> tuple[Tensor, Tensor | None, State]:
        out = None
        if self.stage >= self.first_step_stage:
            carry = ({"tgt_in": tokens.unsqueeze(1)} if self.stage == self.first_step_stage
                     else self.prev.recv_carry())
            carry, state = self.model.step_layers(carry, state, self.local_decoder)
            if self.stage < self.num_stages - 1:
                self.next.send_carry(carry)
            else:
                out = carry
        return (*self._share_outputs(out, tokens.numel()), state)

    def reorder(self, state: State, beam_indices: Tensor) -> State:
        return self.model.reorder_step_states(state, beam_indices)

    def wait(self) -> None:
        """Release the buffers of sends still in flight (call once the search is over)."""
        for link in (self.prev, self.next):
            if link is not None:
                link.wait()

    # ------------------------------------------------------------------ collectives
    def _share_outputs(self, out: Carry | None, rows: int) -> tuple[Tensor, Tensor | None]:
        """The last stage's (log-probs, attention) on every rank of the pipeline: one message."""
        last = self.num_stages - 1
        packed = None
        if out is not None:
            log_probs = F.log_softmax(out["logits"][:, 0].float(), dim=-1)
            attn = out["attn"][:, 0].float() if "attn" in out else log_probs.new_zeros(rows, 0)
            packed = torch.cat([log_probs, attn], dim=1)
        if self._shape is None:  # once per search: vocabulary and source width
            shape = None if packed is None else torch.tensor([log_probs.size(1), attn.size(1)])
            self._shape = tuple(self._broadcast_from(last, shape, 2, torch.long).tolist())
        vocab, width = self._shape
        packed = self._broadcast_from(last, packed, (rows, vocab + width), torch.float32)
        return packed[:, :vocab], (packed[:, vocab:] if width else None)

    def _broadcast_from(self, stage: int, tensor: Tensor | None, shape, dtype) -> Tensor:
        if self.group is None or self.num_stages == 1:
            assert tensor is not None
            return tensor
        if self.stage != stage:
            tensor = torch.empty(shape, dtype=dtype, device=self.device)
        tensor = tensor.to(self.device, dtype).contiguous()
        dist.broadcast(tensor, src=self.rank_of_stage[stage], group=self.group)
        return tensor


_decoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoder_for_engine(engine) -> PipelinedStepDecoder:
    """The `PipelinedStepDecoder` of this rank of a `PipelineEngine` (made once per engine:
    the first call gathers every stage's layer range, collectively over the pipeline)."""
    decoder = _decoders.get(engine)
    if decoder is None:
        group = engine.groups.pipeline if engine.num_stages > 1 else None
        ranges = [engine.layer_indices]
        if group is not None:
            own = torch.tensor([engine.stage, engine.layer_indices.start,
                                engine.layer_indices.stop], device=engine.device)
            parts = [torch.zeros_like(own) for _ in range(engine.num_stages)]
            dist.all_gather(parts, own, group=group)  # in group-rank order, not stage order
            ranges = [range(int(a), int(b)) for _, a, b in sorted(p.tolist() for p in parts)]
        decoder = PipelinedStepDecoder(
            engine.module, ranges, engine.stage, engine._prev, engine._next, group,
            engine.topology.pipeline_ranks(engine.replica), engine.device,
        )
        _decoders[engine] = decoder
    return decoder


@torch.no_grad()
def pipelined_beam_search(engine, batch: Batch, **search) -> DecodeResult:
    """Beam search over `batch` through the engine's pipeline; every rank of the pipeline calls
    it together and gets the same result, equal to `beam_search` on one device. `search` takes
    `beam_search`'s keyword arguments (bos_id, eos_id, beam_size, alpha, beta, max_len, ...)."""
    return search_through(decoder_for_engine(engine), engine, batch, engine.module.beam_search, search)


@torch.no_grad()
def pipelined_sample(engine, batch: Batch, **sampling) -> DecodeResult:
    """`sample_candidates` through the engine's pipeline (every rank together, with the same
    `keys`): the same samples as one device, since every rank sees the last stage's
    log-probabilities and draws from the same keyed noise."""
    return search_through(decoder_for_engine(engine), engine, batch, sample_candidates, sampling)


def search_through(decoder, engine, batch: Batch, search_fn, kwargs: dict) -> DecodeResult:
    """Run `search_fn` (beam search, sampling) over a step decoder that spans the pipeline."""
    batch = {k: v.to(engine.device) for k, v in batch.items()}
    try:
        encoded, src_len = decoder.encode(batch)
        return search_fn(decoder, encoded, src_len, **kwargs)
    finally:
        decoder.wait()
