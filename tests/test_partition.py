"""Partition: explicit balances are checked, automatic ones minimize the slowest stage."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from rich.table import Table
from torch import nn

from giantpipe.models.contract import LayeredModel
from giantpipe.strategies import partition
from giantpipe.strategies.partition import (
    auto_balance,
    balance_by_cost,
    balance_chunks,
    measure_costs,
    partition_table,
    stage_ranges,
    validate_balance,
)
from giantpipe.strategies.schedule_actions import owner
from pipeline_harness import ToyLoss, ToySeq2Seq, make_batches


def brute_force_best(costs: list[int], num_stages: int) -> int:
    """The smallest slowest-stage cost over every contiguous split into non-empty stages."""
    best = None
    for cuts in itertools.combinations(range(1, len(costs)), num_stages - 1):
        bounds = (0, *cuts, len(costs))
        worst = max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds))
        best = worst if best is None else min(best, worst)
    return best


@given(st.lists(st.integers(0, 20), min_size=1, max_size=9), st.data())
def test_balance_by_cost_is_optimal(costs, data):
    num_stages = data.draw(st.integers(1, len(costs)))
    balance = balance_by_cost(costs, num_stages)
    validate_balance(balance, len(costs), num_stages)
    worst = max(sum(costs[i] for i in layers) for layers in stage_ranges(balance))
    assert worst == brute_force_best(costs, num_stages)


def rank_loads(costs, balance, num_ranks, placement) -> list[float]:
    loads = [0.0] * num_ranks
    for k, layers in enumerate(stage_ranges(balance)):
        loads[owner(k, num_ranks, placement)[0]] += sum(costs[i] for i in layers)
    return loads


def test_a_v_balances_each_ranks_two_chunks_together():
    # a giant net by parameters: light embedding and head around six equal blocks. Cut chunk by
    # chunk ([2, 2, 2, 2]), the V gives rank 0 the embedding, a block, a block and the head
    # (2.33) and rank 1 four blocks (4); balanced per rank, the busier holds 3.33
    costs = [0.16, 1, 1, 1, 1, 1, 1, 0.17]
    assert max(rank_loads(costs, balance_by_cost(costs, 4), 2, "vshape")) == pytest.approx(4.0)
    balance = balance_chunks(costs, 2, 2, "vshape")
    assert max(rank_loads(costs, balance, 2, "vshape")) == pytest.approx(3.33)
    assert balance_chunks(costs, 2, 1) == balance_by_cost(costs, 2)  # V = 1: as before


@given(st.lists(st.integers(1, 20), min_size=4, max_size=9), st.sampled_from(["looped", "vshape"]))
def test_chunk_balance_is_optimal_per_rank(costs, placement):
    balance = balance_chunks(costs, 2, 2, placement)
    validate_balance(balance, len(costs), 4)
    best = min(
        max(rank_loads(costs, [b - a for a, b in itertools.pairwise((0, *cuts, len(costs)))], 2, placement))
        for cuts in itertools.combinations(range(1, len(costs)), 3)
    )  # fmt: skip
    assert max(rank_loads(costs, balance, 2, placement)) == best


def test_chunk_balance_descends_when_there_are_too_many_cuts_to_try(monkeypatch):
    # 400 layers, light ends: the descent reaches the exhaustive search's balance of the ranks
    monkeypatch.setattr(partition, "EXHAUSTIVE", 0)
    costs = [5.0] + [1.0] * 398 + [5.0]
    balance = balance_chunks(costs, 4, 2, "vshape")
    validate_balance(balance, 400, 8)
    loads = rank_loads(costs, balance, 4, "vshape")
    assert max(loads) - min(loads) <= 1.0 and max(loads) <= sum(costs) / 4 + 1.0


@pytest.mark.parametrize(
    ("balance", "num_stages", "message"),
    [
        ([3, 3], None, "covers 6 layers but the model has 8: make the counts sum to 8"),
        ([4, 0, 4], None, "empty stage: every stage needs at least one layer"),
        ([1] * 9, None, "use at most 8 stages"),
        ([4, 4], 3, "has 2 entries but the pipeline has 3 stages"),
        ([], None, "balance is empty"),
    ],
)
def test_bad_balance_says_the_fix(balance, num_stages, message):
    with pytest.raises(ValueError, match=message):
        validate_balance(balance, 8, num_stages)


def test_too_many_stages_for_automatic_balance():
    with pytest.raises(ValueError, match="cannot split 3 layers into 4 stages"):
        balance_by_cost([1, 1, 1], 4)


def meta_toy() -> ToySeq2Seq:
    with torch.device("meta"):
        return ToySeq2Seq(d=16)


def test_balance_by_params_works_on_the_meta_device():
    model = meta_toy()
    balance = auto_balance(model, 3, by="params")
    costs = [model.layer_cost(i) for i in range(len(model.layers))]
    worst = max(sum(costs[i] for i in r) for r in stage_ranges(balance))
    assert worst == brute_force_best([int(c) for c in costs], 3)


class Widening(LayeredModel):
    """Layer i maps width 4 to width 4·2^i: later layers hold more parameters and activations."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Step(4 * 2**i, 4 * 2 ** (i + 1)) for i in range(4))


class Step(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, carry):
        return {"h": torch.relu(self.lin(carry["h"]))}


def test_measured_memory_grows_with_the_layer_and_leaves_layers_on_meta():
    with torch.device("meta"):
        model = Widening()
    costs = measure_costs(model, {"h": torch.randn(16, 4)}, "memory", seed=0)
    assert costs == sorted(costs) and costs[0] > 0
    assert all(p.is_meta for p in model.parameters()), "measuring materialized the whole model"
    assert auto_balance(model, 2, by="memory", sample={"h": torch.randn(16, 4)}) == [3, 1]


def test_measured_time_covers_every_layer():
    model = meta_toy()
    sample = make_batches(1, 4, seed=0)[0]
    costs = measure_costs(model, sample, "time", repeats=2)
    assert len(costs) == len(model.layers) and all(c > 0 for c in costs)
    assert all(p.is_meta for p in model.parameters())
    assert sum(auto_balance(model, 4, by="time", sample=sample, repeats=1)) == len(model.layers)


def test_measured_costs_count_the_loss_on_the_last_layer():
    """The last stage computes the loss (Megatron: --account-for-loss-in-pipeline-split): with
    the task's loss, the last layer's measured time and memory include it, and only its."""
    model, sample = meta_toy(), make_batches(1, 4, seed=0)[0]
    calls = []

    def wide_loss(out, batch):  # saves a tensor 64 times the logits for its backward
        calls.append(len(calls))
        wide = out["logits"].repeat(1, 1, 64)
        return ToyLoss()(out, batch) + (wide * wide).sum() * 1e-9

    plain = measure_costs(model, sample, "memory")
    with_loss = measure_costs(model, sample, "memory", loss_fn=wide_loss)
    assert with_loss[:-1] == plain[:-1]
    logits_bytes = 8 * sample["y"].numel() * model.layers[-1].out.out_features  # float64
    assert with_loss[-1] >= plain[-1] + 64 * logits_bytes
    calls.clear()
    measure_costs(model, sample, "time", repeats=2, loss_fn=wide_loss)
    assert len(calls) == 3  # the last layer's warm-up and 2 timed runs, no other layer
    assert all(p.is_meta for p in model.parameters())


def test_measured_balance_needs_a_sample():
    with pytest.raises(ValueError, match="pass sample="):
        auto_balance(meta_toy(), 2, by="time")
    with pytest.raises(ValueError, match="unknown balance mode 'flops'"):
        auto_balance(meta_toy(), 2, by="flops")


def test_partition_table_lists_stages_layers_params_and_ranks():
    model = meta_toy()
    text = partition_table(model, [3, 3, 4], ranks=[[0, 3], [1, 4], [2, 5]], plain=True)
    lines = text.splitlines()
    assert lines[0].split() == ["stage", "layers", "params", "cost", "ranks"]
    assert lines[1].split()[:2] == ["0", "0-2"] and lines[3].split()[1] == "6-9"
    assert lines[2].split()[-1] == "1,4"
    params = sum(p.numel() for i in range(3) for p in model.layers[i].parameters())
    assert lines[1].split()[2] == f"{params:,}"
    table = partition_table(model, [3, 3, 4])
    assert isinstance(table, Table) and table.row_count == 3
