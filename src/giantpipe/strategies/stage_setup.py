"""Building a stage: the engine's arguments checked at the door, its layers placed, its links.

Everything here runs once, when a `PipelineEngine` is built; nothing here runs per step except
`kept_buffers` (around a recompute) and `all_reduce_gradients` (once per step with replicas).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn

from giantpipe.models.contract import LayeredModel, materialize
from giantpipe.strategies.comm import Link, LocalLink
from giantpipe.strategies.partition import stage_ranges, validate_balance
from giantpipe.strategies.rules import CHECKPOINT_MODES, check_checkpoint_mode
from giantpipe.strategies.schedule import owner, virtual_stage
from giantpipe.strategies.topology import Topology

REMAT_MODES = CHECKPOINT_MODES  # the rule and its choice list live in strategies/rules.py
BUCKET_BYTES = 25 * 2**20


def validated(
    model: LayeredModel,
    balance: Sequence[int],
    topology: Topology | None,
    remat_mode: str,
    micro_batches: int,
    distributed: bool,
    world_size: int,
    virtual_stages: int,
) -> tuple[list[int], Topology]:
    """Check the engine's arguments before anything is built; the balance and the topology."""
    balance = validate_balance(balance, len(model.layers))
    check_parameters(model, balance)
    if len(balance) % virtual_stages:
        raise ValueError(
            f"balance {balance} has {len(balance)} parts for virtual_stages={virtual_stages}: "
            f"give one layer count per virtual stage (stages x virtual_stages)"
        )
    num_stages = len(balance) // virtual_stages
    if not distributed and (num_stages > 1 or (topology and topology.world_size > 1)):
        raise ValueError(
            "a pipeline of several processes needs torch.distributed: initialize the "
            "process group (one process per stage and replica) before building the engine"
        )
    topology = topology or Topology.for_world(num_stages, world_size)
    topology.check_world_size(world_size)
    if topology.num_stages != num_stages:
        raise ValueError(
            f"balance {balance} has {num_stages} stages but the topology has "
            f"{topology.num_stages}: give one layer count per stage"
        )
    check_checkpoint_mode(remat_mode)
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be at least 1, got {micro_batches}")
    return balance, topology


def check_parameters(model: LayeredModel, balance: list[int]) -> None:
    """Every parameter must live in a layer, and a shared (tied) one inside a single stage."""
    outside = [name for name, _ in model.named_parameters() if not name.startswith("layers.")]
    if outside:
        raise ValueError(
            f"parameters outside model.layers cannot be placed on a stage: {outside[:5]}; "
            f"move them into the layer that uses them"
        )
    stage_of_param: dict[int, tuple[int, int]] = {}
    for stage, layers in enumerate(stage_ranges(balance)):
        for i in layers:
            for p in model.layers[i].parameters():
                first = stage_of_param.setdefault(id(p), (stage, i))
                if first[0] != stage:
                    raise ValueError(
                        f"layers {first[1]} and {i} share a parameter but sit on stages {first[0]} "
                        f"and {stage}; choose a balance that keeps them on one stage, or untie them"
                    )


def _on_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in [*module.parameters(), *module.buffers()])


def place_layers(
    model: LayeredModel, local: set[int], device: torch.device, seed: int
) -> LayeredModel:
    """Materialize (or move) this stage's layers on `device`; every other layer goes to meta."""
    for i, layer in enumerate(model.layers):
        if i in local:
            if _on_meta(layer):
                materialize(model, [i], device, seed)
            else:
                layer.to(device)
        elif not _on_meta(layer):
            layer.to("meta")
    return model


@contextmanager
def kept_buffers(modules: list[nn.Module]):
    """Restore the modules' buffers on exit: a recompute must not update running statistics twice.
    The restore writes through `.data`, leaving the buffers' autograd version unchanged: a
    deferred weight-gradient half may still hold them saved (BatchNorm saves its running
    statistics, and the restore gives them back the very values it saved)."""
    saved = [(b, b.clone()) for m in modules for b in m.buffers(recurse=False)]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.data.copy_(value)


def chunk_links(
    topology: Topology, stage: int, replica: int, chunks: int, placement: str, device
) -> list[tuple[int, Link | LocalLink | None, Link | LocalLink | None]]:
    """Per local chunk: (virtual stage, link to the previous one, link to the next one). A
    `Link` to another rank is tagged by its boundary (virtual stage k -> k+1 has tag k), so
    several chunks can talk to one neighbour; within this rank a `LocalLink` (ZB-V's turn)."""
    n, ranks = topology.num_stages, topology.pipeline_ranks(replica)
    last = n * chunks - 1
    local: dict[int, LocalLink] = {}

    def link(boundary: int, peer_stage: int) -> Link | LocalLink:
        if peer_stage == stage:
            return local.setdefault(boundary, LocalLink())
        return Link(ranks[peer_stage], device, tag=boundary)

    out = []
    for c in range(chunks):
        k = virtual_stage(stage, c, n, placement)
        prev = link(k - 1, owner(k - 1, n, placement)[0]) if k > 0 else None
        nxt = link(k, owner(k + 1, n, placement)[0]) if k < last else None
        out.append((k, prev, nxt))
    return out


def all_reduce_gradients(params: list[nn.Parameter], group) -> None:
    """Sum the parameters' gradients over `group` in flat buckets (a missing one counts as 0)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for grads in _buckets([p.grad for p in params], BUCKET_BYTES):
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=group)
        for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(synced)


def _buckets(tensors: list[Tensor], max_bytes: int) -> Iterator[list[Tensor]]:
    """Consecutive runs of same-dtype tensors of at most `max_bytes` (one tensor at least)."""
    bucket: list[Tensor] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and (t.dtype != bucket[0].dtype or size + nbytes > max_bytes):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    if bucket:
        yield bucket
