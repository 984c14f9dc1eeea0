"""What a task calls under the pipeline: a training step, an evaluation step, decoding.

The runner parks a step's gradients between the engine's forward+backward (inside Lightning's
`training_step`) and Lightning's `backward`, checks the stage against its memory budget, and
turns a silent neighbour's receive time-out into a sentence naming the stage.
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import Tensor

from giantpipe.models.contract import DecodeResult
from giantpipe.strategies.chunked_decoding import chunked_beam_search, chunked_sample
from giantpipe.strategies.engine import PipelineEngine
from giantpipe.strategies.faults import maybe_inject
from giantpipe.strategies.memory_model import peak_memory_mb
from giantpipe.strategies.pipelined_decoding import pipelined_beam_search, pipelined_sample


class PipelineRunner:
    """The task's runner under the pipeline: each step runs the engine's schedule."""

    def __init__(self, engine: PipelineEngine, timeout_s: float = 1800.0, memory_budget_mb: float | None = None):
        self.engine, self.timeout_s, self.memory_budget_mb = engine, timeout_s, memory_budget_mb
        self.parked: list[Tensor | None] | None = None
        self.steps = 0
        self.undo_fault = None  # removes a fault that lasts one step (kind=nan, nangrad)

    def train_loss(self, batch) -> Tensor:
        params = list(self.engine.parameters())
        for p in params:  # the previous step's gradients are still there: Lightning zeroes later
            p.grad = None
        if self.undo_fault is not None:
            self.undo_fault = self.undo_fault()
        local = [self.engine.module.layers[i] for i in self.engine.layer_indices]
        self.undo_fault = maybe_inject(self.engine.stage, self.steps, self.timeout_s, local)
        self.steps += 1
        with peers_named(self.engine):
            loss = self.engine.train_step(batch)
        self.parked = [p.grad for p in params]
        for p in params:
            p.grad = None
        check_stage_memory(self.engine, self.memory_budget_mb)
        return loss

    def eval_loss(self, batch) -> Tensor:
        with peers_named(self.engine):
            return self.engine.eval_step(batch)

    def decode(self, batch, **search) -> DecodeResult:
        """Beam search through the pipeline (all its ranks together); every rank gets the
        result one device would (strategies/pipelined_decoding.py)."""
        if self.engine.virtual_stages > 1:  # forward only, chunk by chunk
            return chunked_beam_search(self.engine, batch, **search)
        return pipelined_beam_search(self.engine, batch, **search)

    def sample(self, batch, **sampling) -> DecodeResult:
        """Sampled candidates through the pipeline, the same as one device's."""
        if self.engine.virtual_stages > 1:
            return chunked_sample(self.engine, batch, **sampling)
        return pipelined_sample(self.engine, batch, **sampling)

    def restore_gradients(self, scale: float) -> None:
        if self.parked is None:
            return
        for p, g in zip(self.engine.parameters(), self.parked):
            if g is None:
                continue
            g = g * scale if scale != 1.0 else g
            p.grad = g if p.grad is None else p.grad + g
        self.parked = None


def check_stage_memory(engine: PipelineEngine, budget_mb: float | None) -> None:
    """A stage whose process passed `strategy.memory_budget_mb` (peak resident memory; on CUDA,
    its tensors' peak) fails, named."""
    if budget_mb is None:
        return
    peak = peak_memory_mb(engine.device)
    if peak > budget_mb:
        kind = "allocated on the GPU" if engine.device.type == "cuda" else "resident"
        raise MemoryError(
            f"stage {engine.stage} (rank {engine.rank}) reached {peak:.0f} MiB {kind}, over "
            f"strategy.memory_budget_mb={budget_mb:.0f}; run giantpipe-plan with the same overrides for a "
            f"configuration that fits (more stages, strategy.checkpoint=always, strategy.balance=memory)"
        )


@contextmanager
def peers_named(engine: PipelineEngine):
    """Turn gloo's "Timed out waiting 10000ms for recv" into which stages went silent."""
    try:
        yield
    except RuntimeError as err:
        if "Timed out" not in str(err) and "timed out" not in str(err):
            raise
        stage = engine.stage
        peers = [s for s in (stage - 1, stage + 1) if 0 <= s < engine.num_stages]
        raise RuntimeError(
            f"stage {stage} got no answer from stage {' or '.join(map(str, peers))} within strategy.timeout_s: "
            "that stage died, hung or is unreachable"
        ) from err
