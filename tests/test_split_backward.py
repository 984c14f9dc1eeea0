"""The split backward (input gradients, then weight gradients) equals one fused backward."""

from __future__ import annotations

import torch
from torch import nn

from giantpipe.models.contract import LayeredModel, build_materialized
from giantpipe.strategies.split_backward import forward_cut, input_grads, loss_cut, weight_grads
from pipeline_harness import Block, ToyLoss, ToySeq2Seq, make_batches

# layers 3..8 of the toy: blocks, then attention over `enc`, which enters the stage made by
# layer 2 and passes through the blocks untouched (the GNMT encoder-outputs pattern)
STAGE = range(3, 9)


def stage_input(model, batch):
    """The carry entering layer 3, as leaves (what a stage receives)."""
    with torch.no_grad():
        carry = model.run_layers(model.first_carry(batch), range(3))
    return {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in carry.items()}


def test_input_then_weight_gradients_equal_a_fused_backward():
    model = build_materialized(lambda: ToySeq2Seq(), seed=5)
    batch = make_batches(1, 6, seed=4)[0]
    params = {i: list(model.layers[i].parameters()) for i in STAGE}
    # d(loss)/d(h) and d(loss)/d(enc) as the next stage would send them
    head = torch.randn(6, batch["mask"].shape[1], 8, dtype=torch.float64)

    fused_in = stage_input(model, batch)
    out = model.run_layers(dict(fused_in), STAGE)
    torch.autograd.backward([out["h"], out["enc"]], [head, head.flip(0)])
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    split_in = stage_input(model, batch)
    splittable: dict[int, bool] = {}
    out, segments = forward_cut(model, STAGE, split_in, params, splittable)
    # blocks split (their Linear's input edge leads to no weight); attention stays whole (its
    # query product's input edge leads to the query weights: W would redo it)
    assert splittable == {3: True, 4: True, 5: True, 6: False, 7: True, 8: False}
    found = input_grads(segments, {"h": head, "enc": head.flip(0)})
    for i in STAGE:
        touched = [p.grad is not None for p in params[i]]
        assert touched == [not splittable[i]] * len(touched), f"layer {i} after the I half"
    for key in ("h", "enc"):
        assert torch.allclose(found[key], fused_in[key].grad, atol=1e-12), key
    weight_grads(segments)
    assert not segments
    split_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert split_grads.keys() == fused_grads.keys() and split_grads
    for name, grad in fused_grads.items():
        assert torch.allclose(split_grads[name], grad, atol=1e-12), name


def test_loss_segment_on_the_last_stage():
    model = build_materialized(lambda: ToySeq2Seq(), seed=5)
    batch = make_batches(1, 6, seed=4)[0]
    last = range(3, 10)
    params = {i: list(model.layers[i].parameters()) for i in last}

    fused_in = stage_input(model, batch)
    (ToyLoss()(model.run_layers(dict(fused_in), last), batch) / 7).backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    split_in = stage_input(model, batch)
    out, segments = forward_cut(model, last, split_in, params, {})
    loss, segment = loss_cut(out, lambda carry: ToyLoss()(carry, batch) / 7)
    found = input_grads([*segments, segment], {"loss": torch.ones_like(loss)})
    weight_grads(segments)
    assert torch.allclose(found["h"], fused_in["h"].grad, atol=1e-6)
    for name, grad in fused_grads.items():
        assert torch.allclose(model.get_parameter(name).grad, grad, atol=1e-6), name


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 8, batch_first=True)  # float32 on CPU: one oneDNN kernel

    def forward(self, carry):
        return {**carry, "h": self.lstm(carry["h"])[0]}


class Twice(torch.autograd.Function):
    """A custom Function: its backward returns every gradient whatever is asked."""

    @staticmethod
    def forward(ctx, h, weight):
        ctx.save_for_backward(h, weight)
        return h * weight

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        return grad * weight, (grad * h).sum((0, 1))


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, 8))

    def forward(self, carry):
        return {**carry, "h": Twice.apply(carry["h"], self.weight)}


class Mixed(LayeredModel):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(
            [Block(8, torch.float32, 0.0), Recurrent(), Scale(), Block(8, torch.float32, 0.0)]
        )


def test_layers_whose_backward_cannot_split_stay_whole():
    torch.manual_seed(0)
    model = Mixed()
    mask = torch.ones(3, 5, dtype=torch.bool)
    h, head = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    layers = range(4)

    fused_in = {"h": h.clone().requires_grad_(), "mask": mask}
    model.run_layers(dict(fused_in), layers)["h"].backward(head)
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    split_in = {"h": h.clone().requires_grad_(), "mask": mask}
    params = {i: list(model.layers[i].parameters()) for i in layers}
    splittable: dict[int, bool] = {}
    out, segments = forward_cut(model, layers, split_in, params, splittable)
    # the blocks split (a Linear under a residual); the LSTM and the custom Function do not
    assert splittable == {0: True, 1: False, 2: False, 3: True}
    found = input_grads(segments, {"h": head})
    weight_grads(segments)
    assert torch.allclose(found["h"], fused_in["h"].grad, atol=1e-6)
    for name, grad in fused_grads.items():
        assert torch.allclose(model.get_parameter(name).grad, grad, atol=1e-6), name
