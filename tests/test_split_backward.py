"""The split backward (input gradients, then weight gradients) equals one fused backward."""

from __future__ import annotations

import torch
from torch import nn

from giantpipe.models.contract import LayeredModel, build_materialized
from giantpipe.strategies.split_backward import (
    WeightGradStore,
    arm_linear_layers,
    defer_weight_grads,
)
from pipeline_harness import Block, ToyLoss, ToySeq2Seq, make_batches

# layers 3..8 of the toy: blocks, then attention over `enc`, which enters the stage made by
# layer 2 and passes through the blocks untouched (the GNMT encoder-outputs pattern)
STAGE = range(3, 9)


def stage_input(model, batch):
    """The carry entering layer 3, as leaves (what a stage receives)."""
    with torch.no_grad():
        carry = model.run_layers(model.first_carry(batch), range(3))
    return {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in carry.items()}


def linear_weights(model, layers):
    """The parameters whose gradients wait for W: every nn.Linear's weight."""
    return {
        id(m.weight) for i in layers for m in model.layers[i].modules() if isinstance(m, nn.Linear)
    }


def test_input_then_weight_gradients_equal_a_fused_backward():
    model = build_materialized(lambda: ToySeq2Seq(), seed=5)
    batch = make_batches(1, 6, seed=4)[0]
    # d(loss)/d(h) and d(loss)/d(enc) as the next stage would send them
    head = torch.randn(6, batch["mask"].shape[1], 8, dtype=torch.float64)

    fused_in = stage_input(model, batch)
    out = model.run_layers(dict(fused_in), STAGE)
    torch.autograd.backward([out["h"], out["enc"]], [head, head.flip(0)])
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    for i in STAGE:
        arm_linear_layers(model.layers[i])
    split_in, store = stage_input(model, batch), WeightGradStore()
    with defer_weight_grads(store):
        out = model.run_layers(dict(split_in), STAGE)
    torch.autograd.backward([out["h"], out["enc"]], [head, head.flip(0)])  # I
    deferred = linear_weights(model, STAGE)
    assert len(store.work) == len(deferred) > 0
    for name, p in model.named_parameters():
        if name in fused_grads:  # linear weights wait for W; biases and the rest are done
            assert (p.grad is None) == (id(p) in deferred), name
    for key in ("h", "enc"):
        assert torch.allclose(split_in[key].grad, fused_in[key].grad, atol=1e-12), key
    store.run()  # W
    assert not store.work
    split_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert split_grads.keys() == fused_grads.keys() and split_grads
    for name, grad in fused_grads.items():
        assert torch.allclose(split_grads[name], grad, atol=1e-12), name


def test_loss_on_the_last_stage_and_accumulation_across_micro_batches():
    model = build_materialized(lambda: ToySeq2Seq(), seed=5)
    batches = make_batches(2, 6, seed=4)
    last = range(3, 10)

    for batch in batches:
        fused_in = stage_input(model, batch)
        (ToyLoss()(model.run_layers(dict(fused_in), last), batch) / 7).backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    for i in last:
        arm_linear_layers(model.layers[i])
    stores = []
    for batch in batches:  # I of both micro-batches, then W of both (W lags behind I)
        split_in, store = stage_input(model, batch), WeightGradStore()
        with defer_weight_grads(store):
            out = model.run_layers(dict(split_in), last)
        (ToyLoss()(out, batch) / 7).backward()
        stores.append(store)
    for store in stores:
        store.run()
    for name, grad in fused_grads.items():
        assert torch.allclose(model.get_parameter(name).grad, grad, atol=1e-12), name


def test_weight_gradients_record_no_graph_and_hold_nothing_after_w():
    """W's products are plain tensors: a `.grad` with a graph would keep every micro-batch's
    output gradient alive until zero_grad and chain the steps accumulated into it."""
    model = build_materialized(lambda: ToySeq2Seq(), seed=5)
    for i in STAGE:
        arm_linear_layers(model.layers[i])
    for batch in make_batches(2, 6, seed=4):  # two micro-batches accumulate into .grad
        split_in, store = stage_input(model, batch), WeightGradStore()
        with defer_weight_grads(store):
            out = model.run_layers(dict(split_in), STAGE)
        torch.autograd.backward([out["h"], out["enc"]], [torch.ones_like(out["h"])] * 2)
        assert all(not inputs.requires_grad for _, inputs, _ in store.work)
        store.run()
    grads = [model.get_parameter(n).grad for n in linear_weight_names(model, STAGE)]
    assert grads and all(g is not None and g.grad_fn is None and not g.requires_grad for g in grads)


def linear_weight_names(model, layers):
    return [f"layers.{i}.{name}.weight" for i in layers
            for name, m in model.layers[i].named_modules() if isinstance(m, nn.Linear)]  # fmt: skip


def test_only_armed_layers_with_gradients_defer_and_only_inside_the_context():
    torch.manual_seed(0)
    mine, foreign = nn.Linear(4, 4), nn.Linear(4, 4)
    assert arm_linear_layers(mine) == 1
    x = torch.randn(3, 4, requires_grad=True)
    expected = torch.autograd.grad(foreign(mine(x)).sum(), mine.weight)[0]
    mine(x).sum().backward()  # outside the context: a plain linear layer
    assert torch.equal(mine.weight.grad, expected.new_ones(4, 1) * x.sum(0))
    mine.zero_grad(set_to_none=True)
    store = WeightGradStore()
    with defer_weight_grads(store):
        y = foreign(mine(x)).sum()
        with torch.no_grad():
            mine(x)  # no graph: nothing to defer
        lone = nn.Linear(4, 4, bias=False)  # no input gradient, no bias: nothing to defer
        arm_linear_layers(lone)
        lone(x.detach()).sum().backward()
    assert lone.weight.grad is not None
    y.backward()
    assert mine.weight.grad is None and mine.bias.grad is not None
    assert foreign.weight.grad is not None
    assert len(store.work) == 1
    store.run()
    assert torch.allclose(mine.weight.grad, expected, atol=1e-6)


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


def test_layers_without_linear_weights_keep_their_gradients_in_the_input_half():
    torch.manual_seed(0)
    model = Mixed()
    mask = torch.ones(3, 5, dtype=torch.bool)
    h, head = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    layers = range(4)

    fused_in = {"h": h.clone().requires_grad_(), "mask": mask}
    model.run_layers(dict(fused_in), layers)["h"].backward(head)
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    assert arm_linear_layers(model) == 2
    split_in, store = {"h": h.clone().requires_grad_(), "mask": mask}, WeightGradStore()
    with defer_weight_grads(store):
        out = model.run_layers(dict(split_in), layers)
    out["h"].backward(head)
    # the LSTM and the custom Function have every gradient after I; the blocks' weights wait
    waiting = {n for n, p in model.named_parameters() if p.grad is None}
    assert waiting == {"layers.0.lin.weight", "layers.3.lin.weight"}
    assert torch.allclose(split_in["h"].grad, fused_in["h"].grad, atol=1e-6)
    store.run()
    for name, grad in fused_grads.items():
        assert torch.allclose(model.get_parameter(name).grad, grad, atol=1e-6), name


def test_weight_products_under_autocast_match_autograd():
    """bf16-mixed (the default precision on GPU): the output gradient is bf16, the weight and
    the saved input float32."""
    torch.manual_seed(0)
    fused, split = nn.Linear(8, 8), nn.Linear(8, 8)
    split.load_state_dict(fused.state_dict())
    arm_linear_layers(split)
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused(x).float().square().sum().backward()
        store = WeightGradStore()
        with defer_weight_grads(store):
            out = split(x)
    out.float().square().sum().backward()
    store.run()
    assert split.weight.grad.dtype == torch.float32
    assert torch.allclose(split.weight.grad, fused.weight.grad, rtol=1e-2, atol=1e-2)
    assert torch.allclose(split.bias.grad, fused.bias.grad, rtol=1e-2, atol=1e-2)
