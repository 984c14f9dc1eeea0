"""A stage's backward in two halves: input gradients now, weight gradients later.

The previous stage waits for this stage's input gradients, not for its weight gradients. So a
stage that has a previous stage runs each micro-batch's backward as

    I  the whole backward except the weight products of its linear layers (the input
       gradients are then sent to the previous stage at once)
    W  those weight products, `weight.grad += grad_out^T @ input` (deferred: run while
       nothing waits on them)

which takes W off the pipeline's critical path (the B/W split of zero-bubble pipeline
schedules). On two stages of equal cost, GPipe's cool-down shrinks from one full backward box
to one input-gradient box, and the last stage's final weight gradients overlap the first
stage's final backward.

How: `arm_linear_layers` gives each `nn.Linear` of the stage a forward that, inside
`defer_weight_grads(store)` (the engine's training forwards), multiplies by a *detached*
weight, so autograd computes only the input and bias gradients, and hooks the output: its
gradient, with the weight and the input, goes to the micro-batch's `WeightGradStore`, whose
`run` does the weight products later. Outside that context (evaluation, decoding,
re-materialized micro-batches) the layers run `F.linear` as before. Nothing runs twice: I is
the fused backward minus the weight products, W is exactly them. Everything else (LSTMs,
attention kernels, normalizations, embeddings, custom autograd Functions, `F.linear` called
directly) keeps its gradients in I. Only the linear layers are touched, so the other
operators pay nothing per call (a torch-function mode would cost every operator a Python
call: +19% forward time at 16 micro-batches of the giant net).
Gradients equal a fused backward's up to float summation order.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class WeightGradStore:
    """The deferred weight products of one micro-batch's backward."""

    work: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)

    @torch.no_grad()
    def run(self) -> None:
        """Accumulate every deferred weight gradient into `.grad` (as autograd would: the
        first gradient is stored, later ones added) and drop the saved tensors. Under
        autocast the product runs in the output gradient's dtype, as autograd's would, and
        lands in the weight's. Without a graph: a `.grad` that recorded the product would keep
        every micro-batch's output gradient alive, and chain the steps it accumulates over."""
        for weight, inputs, grad_out in self.work:
            grad_out = grad_out.reshape(-1, grad_out.shape[-1]).t()
            inputs = inputs.reshape(-1, inputs.shape[-1]).to(grad_out.dtype)
            if weight.grad is None:
                weight.grad = grad_out.mm(inputs).to(weight.dtype)
            elif weight.grad.dtype == grad_out.dtype:  # one product into .grad: no temporary
                weight.grad.addmm_(grad_out, inputs)
            else:
                weight.grad.add_(grad_out.mm(inputs).to(weight.dtype))
        self.work.clear()


_active: list[WeightGradStore] = []  # the store of the forward running now, if any


@contextmanager
def defer_weight_grads(store: WeightGradStore) -> Iterator[None]:
    """Within it, armed linear layers defer their weight gradients to `store`."""
    _active.append(store)
    try:
        yield
    finally:
        _active.pop()


def _linear_forward(layer: nn.Linear, inputs: Tensor) -> Tensor:
    weight, bias = layer.weight, layer.bias
    output_gets_grad = inputs.requires_grad or (bias is not None and bias.requires_grad)
    # with no other gradient path to the output, the weight's is the only one: keep it fused
    if not (_active and weight.requires_grad and output_gets_grad and torch.is_grad_enabled()):
        return F.linear(inputs, weight, bias)
    # a detached weight: autograd computes the input and bias gradients only; the output's
    # gradient hook hands the weight product to the store
    out = F.linear(inputs, weight.detach(), bias)
    work, kept = _active[-1].work, inputs.detach()  # W needs its values, not its graph
    out.register_hook(lambda grad_out: work.append((weight, kept, grad_out)))
    return out


def arm_linear_layers(module: nn.Module) -> int:
    """Give `module`'s `nn.Linear` layers (not subclasses with their own forward) the forward
    that `defer_weight_grads` redirects. Returns how many were armed."""
    armed = 0
    for layer in module.modules():
        if isinstance(layer, nn.Linear) and type(layer).forward is nn.Linear.forward:
            layer.forward = partial(_linear_forward, layer)
            armed += 1
    return armed
