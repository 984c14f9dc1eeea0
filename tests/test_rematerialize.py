"""A re-materialized chunk: the gradients of a plain run, and nothing but its input kept in flight."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from giantpipe.strategies.rematerialize import rematerialized


class Chunk(nn.Module):
    """Two layers with plain (global-RNG) dropout; passes a mask, lengths and an encoder output on."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, carry):
        h = F.dropout(torch.tanh(self.a(carry["h"])), 0.5, True)
        h = self.b(h) + carry["enc"].sum(-1)[:, None, None]
        return {**carry, "h": h * carry["mask"].unsqueeze(-1)}


def carry(requires_grad: bool):
    g = torch.Generator().manual_seed(1)
    return {
        "h": torch.randn(3, 5, 8, generator=g, dtype=torch.float64).requires_grad_(requires_grad),
        "enc": torch.randn(3, 4, generator=g, dtype=torch.float64).requires_grad_(requires_grad),
        "mask": torch.rand(3, 5, generator=g) > 0.3,
        "lengths": torch.tensor([5, 4, 2]),
        "features": torch.randn(3, 2, generator=g, dtype=torch.float64),  # data: no gradient
    }


def grads(chunk, inputs, remat: bool):
    chunk.zero_grad()
    torch.manual_seed(7)
    out = rematerialized(chunk, inputs) if remat else chunk(inputs)
    torch.manual_seed(99)  # the recompute must not draw from the RNG as it is by then
    (out["h"].square().sum() + 3 * out["enc"].sum()).backward()
    return out, [p.grad.clone() for p in chunk.parameters()], [
        inputs[k].grad.clone() if inputs[k].grad is not None else None for k in ("h", "enc")
    ]


def test_gradients_equal_a_plain_run_with_dropout_and_pass_through_tensors():
    chunk = Chunk().double()
    for requires_grad in (True, False):  # a middle stage, and the first (no input wants grad)
        plain, plain_params, plain_inputs = grads(chunk, carry(requires_grad), remat=False)
        remat, remat_params, remat_inputs = grads(chunk, carry(requires_grad), remat=True)
        torch.testing.assert_close(remat["h"], plain["h"])
        for a, b in zip(remat_params + remat_inputs, plain_params + plain_inputs, strict=True):
            torch.testing.assert_close(a, b)
        assert remat.keys() == plain.keys()
        assert remat["mask"].dtype == torch.bool and not remat["lengths"].requires_grad
        assert not remat["features"].requires_grad  # a pass-through keeps its input's flag
        assert remat["enc"].requires_grad == requires_grad


def test_a_micro_batch_in_flight_holds_one_node_and_its_input():
    chunk = Chunk().double()
    out = rematerialized(chunk, carry(True))
    node = out["h"].grad_fn
    assert type(node).__name__ == "_RematerializeBackward"  # not the chunk's ops: no graph kept
    saved = [t for t in node.saved_tensors]
    assert len(saved) == 5 and all(t.shape == v.shape for t, v in zip(saved, carry(True).values(), strict=True))


def test_the_recompute_context_is_entered_in_backward_only():
    entered = []

    @contextmanager
    def context():
        entered.append("recompute")
        yield

    out = rematerialized(Chunk().double(), carry(True), context)
    assert entered == []
    out["h"].sum().backward()
    assert entered == ["recompute"]
