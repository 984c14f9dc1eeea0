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
from giantpipe.strategies.partition import (
    auto_balance,
    balance_by_cost,
    measure_costs,
    partition_table,
    stage_ranges,
    validate_balance,
)
from pipeline_harness import ToySeq2Seq, make_batches


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
