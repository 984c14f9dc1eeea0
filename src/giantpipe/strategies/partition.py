"""Cutting L layers into N contiguous composite layers (stages), and choosing where to cut.

A balance is a list of layer counts, one per stage: `[3, 2, 3]` puts layers 0-2 on stage 0,
3-4 on stage 1 and 5-7 on stage 2. It is either given, or chosen to minimize the slowest
stage's cost, where the per-layer cost is the parameter count (`model.layer_cost`), the
measured forward+backward time, or the measured parameter + activation bytes. Measured with the
task's loss, the last layer's cost includes it: the last stage always computes the loss, and
with a large vocabulary its log-softmax costs more than the projection before it.

Measuring never needs the whole model in memory: layers still on the meta device are
materialized one at a time (with the same per-layer seeds as training) and dropped again.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from giantpipe.models.contract import Batch, Carry, LayeredModel, SumLoss, materialize
from giantpipe.strategies.rules import (
    BALANCE_MODES,
    check_balance_mode,
    check_stage_count,
    validate_balance,
)
from giantpipe.strategies.schedule_actions import owner

__all__ = ["BALANCE_MODES", "validate_balance", "stage_ranges", "balance_by_cost", "balance_chunks",
           "min_max_partition", "auto_balance", "measure_costs", "partition_table"]

def stage_ranges(balance: Sequence[int]) -> list[range]:
    """The layer indices of each stage."""
    ranges, start = [], 0
    for count in balance:
        ranges.append(range(start, start + count))
        start += count
    return ranges


def balance_by_cost(costs: Sequence[float], num_stages: int) -> list[int]:
    """The contiguous partition of `costs` into `num_stages` non-empty parts with the smallest
    maximum part sum (the linear-partition problem)."""
    prefix = _prefix_sums(costs)
    return min_max_partition(len(costs), num_stages, lambda stage, start, stop: prefix[stop] - prefix[start])


def _prefix_sums(costs: Sequence[float]) -> list[float]:
    """prefix[j] = the cost of layers 0..j-1, so layers a..b-1 cost prefix[b] - prefix[a]."""
    return list(itertools.accumulate((float(c) for c in costs), initial=0.0))


EXHAUSTIVE = 20_000  # partitions balance_chunks compares one by one


def balance_chunks(costs: Sequence[float], num_ranks: int, chunks: int = 1, placement: str = "looped") -> list[int]:
    """The partition of `costs` into `num_ranks` x `chunks` contiguous virtual stages whose
    busiest *rank* (the sum of the chunks it holds under `placement`, schedule_actions.owner)
    is least, then whose largest chunk is least. A rank computes its chunks one after another,
    so the step follows its sum, not the largest chunk: under a V (rank r holds chunks r and
    2N-1-r) the chunk-wise optimum can leave one rank twice the other's work when the ends of
    the model are light (embeddings, a small head).

    Exact (every cut) while there are at most `EXHAUSTIVE` partitions; beyond that a descent
    from the chunk-wise optimum that moves one cut at a time, in steps halving down to one
    layer, while the objective falls."""
    if chunks == 1:
        return balance_by_cost(costs, num_ranks)
    n, parts = len(costs), num_ranks * chunks
    check_stage_count(parts, n)
    prefix = _prefix_sums(costs)
    holder = [owner(k, num_ranks, placement)[0] for k in range(parts)]

    def objective(cuts: Sequence[int]) -> tuple[float, float]:
        sums = [prefix[b] - prefix[a] for a, b in zip(cuts, cuts[1:])]
        per_rank = [0.0] * num_ranks
        for k, part in enumerate(sums):
            per_rank[holder[k]] += part
        return max(per_rank), max(sums)

    if math.comb(n - 1, parts - 1) <= EXHAUSTIVE:
        inner = min(itertools.combinations(range(1, n), parts - 1),
                    key=lambda c: objective((0, *c, n)))  # fmt: skip
        cuts = [0, *inner, n]
    else:
        cuts = [0, *itertools.accumulate(balance_by_cost(costs, parts))]  # the chunk-wise optimum
        best, step = objective(cuts), max(1, n // (2 * parts))
        while step:
            moved = False
            for k in range(1, parts):
                for delta in (-step, step):
                    trial = cuts[k] + delta
                    if cuts[k - 1] < trial < cuts[k + 1]:
                        candidate = [*cuts[:k], trial, *cuts[k + 1 :]]
                        value = objective(candidate)
                        if value < best:
                            cuts, best, moved = candidate, value, True
            if not moved:
                step //= 2
    return [b - a for a, b in zip(cuts, cuts[1:])]


def min_max_partition(num_layers: int, num_stages: int, part_cost: Callable[[int, int, int], float]) -> list[int]:
    """The balance of `num_layers` layers into `num_stages` contiguous non-empty parts whose
    largest `part_cost(stage, start, stop)` (layers start..stop-1 on `stage`) is smallest: a
    dynamic programme over cut points, O(N·L²) calls at most. `part_cost` must not decrease
    as a part grows: the search stops extending a part once it costs more than the best."""
    check_stage_count(num_stages, num_layers)
    inf = float("inf")
    # best[k][j]: smallest largest part of the first j layers in k parts; cut[k][j]: start of the last
    best = [[inf] * (num_layers + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (num_layers + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for j in range(k, num_layers - (num_stages - k) + 1):
            for i in range(j - 1, k - 2, -1):  # part k-1 holds layers i..j-1
                if best[k - 1][i] >= best[k][j]:
                    continue
                cost = part_cost(k - 1, i, j)
                if cost >= best[k][j]:
                    break  # an earlier cut only makes this part larger
                best[k][j], cut[k][j] = max(best[k - 1][i], cost), i
    balance, j = [], num_layers
    for k in range(num_stages, 0, -1):
        balance.append(j - cut[k][j])
        j = cut[k][j]
    return balance[::-1]


def param_costs(model: LayeredModel) -> list[float]:
    return [model.layer_cost(i) for i in range(len(model.layers))]


def measure_costs(
    model: LayeredModel,
    sample: Batch,
    by: str,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    repeats: int = 3,
    loss_fn: SumLoss | None = None,
) -> list[float]:
    """Per-layer cost on a sample (micro-)batch: `time` in seconds (median of `repeats`
    forward+backward runs) or `memory` in bytes (parameters + tensors saved for backward).
    With `loss_fn`, the last layer's cost includes `loss_fn(out, sample)`: its forward and
    backward, or the tensors it saves."""
    if by not in ("time", "memory"):
        raise ValueError(f"measure_costs measures 'time' or 'memory', not {by!r}")
    sample = _to_device(sample, device)
    carry = _to_device(model.first_carry(sample), device)
    last = len(model.layers) - 1
    costs = []
    for i in range(len(model.layers)):
        head = (lambda out: loss_fn(out, sample)) if loss_fn is not None and i == last else None
        with _materialized(model, i, device, seed):
            if by == "time":
                costs.append(_layer_time(model, i, carry, repeats, head))
            else:
                costs.append(_layer_memory(model, i, carry, head))
            with torch.no_grad():
                carry = model.run_layers(carry, [i])
    return costs


def auto_balance(
    model: LayeredModel,
    num_stages: int,
    by: str = "params",
    sample: Batch | None = None,
    *,
    chunks: int = 1,
    placement: str = "looped",
    **measure_kwargs,
) -> list[int]:
    """Balance minimizing the busiest stage, by `params`, measured `time` or `memory`: one
    layer count per virtual stage (`num_stages` x `chunks`, placed as `placement` says)."""
    check_balance_mode(by)
    if by == "params":
        costs = param_costs(model)
    elif sample is None:
        raise ValueError(f"balance by {by} measures the layers on a sample batch: pass sample=")
    else:
        costs = measure_costs(model, sample, by, **measure_kwargs)
    return balance_chunks(costs, num_stages, chunks, placement)


def partition_table(
    model: LayeredModel,
    balance: Sequence[int],
    costs: Sequence[float] | None = None,
    ranks: Sequence[Sequence[int]] | None = None,
    *,
    plain: bool = False,
):
    """The partition as a table (stage, layers, params, cost, ranks): a rich Table, or text."""
    costs = list(costs) if costs is not None else param_costs(model)
    header = ["stage", "layers", "params", "cost", "ranks"]
    rows = []
    for s, layers in enumerate(stage_ranges(balance)):
        params = sum(p.numel() for i in layers for p in model.layers[i].parameters())
        span = f"{layers.start}" if len(layers) == 1 else f"{layers.start}-{layers[-1]}"
        cost = sum(costs[i] for i in layers)
        where = ",".join(map(str, ranks[s])) if ranks is not None else "-"
        rows.append([str(s), span, f"{params:,}", f"{cost:.4g}", where])
    if plain:
        widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
        return "\n".join(
            "  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in [header, *rows]
        )
    from rich.table import Table

    table = Table(title=f"partition of {len(model.layers)} layers into {len(balance)} stages")
    for name in header:
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(*row)
    return table


# -- measuring --------------------------------------------------------------------------------


def _to_device(tensors: dict[str, Tensor], device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in tensors.items()}


@contextmanager
def _materialized(model: LayeredModel, index: int, device, seed: int):
    """Layer `index` on `device` for the duration; back on meta afterwards if it came from there."""
    layer = model.layers[index]
    on_meta = any(t.is_meta for t in [*layer.parameters(), *layer.buffers()])
    if on_meta:
        materialize(model, [index], device, seed)
    try:
        yield layer
    finally:
        if on_meta:
            layer.to("meta")


def _leaf_inputs(carry: Carry) -> Carry:
    return {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in carry.items()}


Head = Callable[[Carry], Tensor]  # the last layer's output -> the loss


def _backward_outputs(out: Carry, head: Head | None = None) -> None:
    if head is not None:
        loss = head(out)
        if loss.requires_grad:
            loss.backward()
        return
    outs = [v for v in out.values() if v.requires_grad]
    if outs:
        torch.autograd.backward(outs, [torch.ones_like(v) for v in outs])


def _layer_time(model: LayeredModel, index: int, carry: Carry, repeats: int, head: Head | None = None) -> float:
    sync: Callable[[], None] = lambda: None  # noqa: E731
    device = next(iter(carry.values())).device
    if device.type == "cuda":
        sync = torch.cuda.synchronize
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        inputs = _leaf_inputs(carry)
        sync()
        start = time.perf_counter()
        _backward_outputs(model.run_layers(inputs, [index]), head)
        sync()
        times.append(time.perf_counter() - start)
    model.layers[index].zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def _layer_memory(model: LayeredModel, index: int, carry: Carry, head: Head | None = None) -> float:
    layer = model.layers[index]
    param_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    saved: dict[tuple[int, int], int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        saved[(storage.data_ptr(), t.device.index or 0)] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.run_layers(_leaf_inputs(carry), [index])
        loss = head(out) if head is not None else None
    parameter_storages = {
        (p.untyped_storage().data_ptr(), p.device.index or 0) for p in layer.parameters()
    }
    activation_bytes = sum(n for key, n in saved.items() if key not in parameter_storages)
    del out, loss
    return float(param_bytes + activation_bytes)
