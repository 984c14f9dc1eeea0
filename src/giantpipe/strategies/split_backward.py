"""A stage's backward in two halves: input gradients now, weight gradients later.

The previous stage waits for this stage's input gradients, not for its weight gradients. So a
stage that has a previous stage runs each micro-batch's backward as

    I  input gradients, layer by layer from the top (sent to the previous stage at once)
    W  weight gradients of the same layers (deferred: run while nothing waits on them)

which takes W off the pipeline's critical path (the B/W split of zero-bubble pipeline
schedules). On two stages of equal cost, GPipe's cool-down shrinks from one full backward box
to one input-gradient box, and the last stage's final weight gradients overlap the first
stage's final backward.

To compute I without W and then W without recomputing I, the forward is cut at every layer
boundary: each layer's floating inputs that need gradients enter it as fresh leaves
(`detach().requires_grad_()`), so each layer has its own autograd graph. I asks autograd
for the leaves' gradients only (retaining the graph; operators skip the weight half, e.g.
`addmm` computes only `grad @ W.T`); W replays each layer's graph from its output gradients
into its parameters only (`backward(inputs=params)`), so parameter gradients accumulate in
`.grad` exactly as a fused backward would.

What both halves traverse runs twice. That is cheap when a layer's parameters sit right under
its outputs (a Linear + ReLU: only ReLU's backward repeats; `grad @ W.T` runs in I and
`grad.T @ x` in W), and costly when W must pass gradients through heavy operators to reach
deeper parameters (a Transformer block: W would redo the feed-forward and attention input
gradients; an LSTM or a custom `autograd.Function` computes all its gradients in one kernel
whatever is asked). `splits_cleanly` reads a layer's graph once, on its first forward: a
layer whose split would repeat a heavy operator stays whole (its I computes its weight
gradients too, and it has no W). Measured on one core (CPU time, per micro-batch stage):
whole-layer splitting costs +43% on the giant net's blocks, +25% on `seq`'s and +40% on GNMT's
decoder, and the whole/split choice brings all three back to the fused cost.

Tensors a layer passes through untouched are its own leaves in its output: their gradient
flows straight through I (autograd's output-is-input rule). Gradients equal a fused backward's
up to float summation order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from giantpipe.models.contract import Carry, LayeredModel
from giantpipe.strategies.comm import wants_grad

LOSS_KEY = "loss"
# backward nodes that compute all their gradients in one kernel, whatever is asked of them
_ALL_AT_ONCE = re.compile(r"Rnn|Lstm|Gru")
# backward nodes too costly to run twice: products, convolutions, attention, normalizations
_HEAVY = re.compile(
    r"mm|matmul|linear|conv|attention|norm|softmax|einsum|embedding|cdist|fft", re.IGNORECASE
)


@dataclass
class Segment:
    """One layer (or the loss) of one micro-batch: leaves in, outputs out, its parameters."""

    leaves: dict[str, Tensor]  # inputs that get gradients, as leaves of this segment's graph
    outputs: dict[str, Tensor]
    params: list[nn.Parameter]
    whole: bool = False  # its backward cannot be split: I computes the weight gradients too
    grad_outputs: tuple[list[Tensor], list[Tensor]] = field(default_factory=lambda: ([], []))


def _cut(carry: Carry) -> Carry:
    """The carry with every tensor that wants a gradient replaced by a fresh leaf."""
    return {k: t.detach().requires_grad_() if wants_grad(t) else t for k, t in carry.items()}


def splits_cleanly(outputs: list[Tensor], leaves: list[Tensor], params: list[Tensor]) -> bool:
    """Whether a segment's backward splits into an input half and a weight half that repeat no
    heavy work. I runs the nodes that lead to a leaf, W those that lead to a parameter; a node
    on both runs twice. It may, if it computes only the gradients asked of it and is light, or
    heavy but with no input edge that both halves need (a Linear's `addmm`: I takes the
    activation edge, W the weight edge). A gradient-needing leaf that is neither an input nor a
    parameter of the segment (a parameter of another layer) would be lost: no split."""
    leaf_ids, param_ids = {id(t) for t in leaves}, {id(t) for t in params}
    reach: dict = {}  # node -> (leads to a leaf, leads to a parameter)

    def visit(root) -> bool:  # iterative post-order; False: a foreign leaf was found
        stack = [(root, False)]
        while stack:
            node, done = stack.pop()
            if node in reach:
                continue
            if done:
                edges = [reach[c] for c, _ in node.next_functions if c is not None]
                reach[node] = (any(e[0] for e in edges), any(e[1] for e in edges))
                continue
            variable = getattr(node, "variable", None)
            if variable is not None:  # AccumulateGrad
                if id(variable) not in leaf_ids | param_ids:
                    return False
                reach[node] = (id(variable) in leaf_ids, id(variable) in param_ids)
                continue
            stack.append((node, True))
            stack.extend((c, False) for c, _ in node.next_functions if c is not None)
        return True

    roots = [t.grad_fn for t in outputs if t.grad_fn is not None]
    if not all(visit(root) for root in roots):
        return False
    for node, (to_leaf, to_param) in reach.items():
        if not (to_leaf and to_param):
            continue
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            return False  # a custom autograd.Function returns every gradient
        name = node.name()
        if _ALL_AT_ONCE.search(name):
            return False
        if _HEAVY.search(name):
            edges = [reach[c] for c, _ in node.next_functions if c is not None]
            if any(leaf and param for leaf, param in edges):
                return False  # an input edge both halves need: the heavy part runs twice
    return True


def forward_cut(
    model: LayeredModel,
    indices: range,
    carry: Carry,
    params: dict[int, list[nn.Parameter]],
    splittable: dict[int, bool],
) -> tuple[Carry, list[Segment]]:
    """Run layers `indices` on `carry` (whose gradient-wanting tensors are leaves already: a
    received carry), each layer on its own graph. Returns the output carry and the segments.
    `splittable` caches, per layer index, whether its backward splits cleanly (filled here on a
    layer's first forward)."""
    segments = []
    for n, i in enumerate(indices):
        if n:
            carry = _cut(carry)
        leaves = {k: t for k, t in carry.items() if wants_grad(t)}
        assert all(t.is_leaf for t in leaves.values()), "a stage's input must be leaves"
        out = model.layers[i](dict(carry))  # a copy: a layer may assign into its carry
        if i not in splittable:
            outs = [t for t in out.values() if t.requires_grad]
            splittable[i] = splits_cleanly(outs, list(leaves.values()), params[i])
        segments.append(Segment(leaves, out, params[i], whole=not splittable[i]))
        carry = out
    return carry, segments


def loss_cut(out: Carry, loss_of) -> tuple[Tensor, Segment]:
    """The loss `loss_of(carry)` of the stage's output on a graph of its own (last stage)."""
    carry = _cut(out)
    loss = loss_of(carry)
    leaves = {k: t for k, t in carry.items() if wants_grad(t)}
    whole = loss.requires_grad and not splits_cleanly([loss], list(leaves.values()), [])
    return loss, Segment(leaves, {LOSS_KEY: loss}, [], whole=whole)


def input_grads(segments: list[Segment], grads: dict[str, Tensor]) -> dict[str, Tensor | None]:
    """The I half: from the gradients of the last segment's outputs (by key) down to the first
    segment's leaves; returns their gradients by key (None: no gradient reaches it). Each
    segment keeps its output gradients for `weight_grads`."""
    for seg in reversed(segments):
        outs, gouts = [], []
        for key, t in seg.outputs.items():
            g = grads.get(key)
            if g is not None and t.requires_grad:
                outs.append(t)
                gouts.append(g)
        seg.grad_outputs = (outs, gouts)
        if not outs:
            grads = {}
        elif seg.whole:  # a plain backward into every leaf; the leaves are this segment's own
            torch.autograd.backward(outs, gouts)
            grads = {k: t.grad for k, t in seg.leaves.items()}
            seg.grad_outputs = ([], [])
        elif seg.leaves:
            found = torch.autograd.grad(
                outs, list(seg.leaves.values()), gouts,
                retain_graph=bool(seg.params), allow_unused=True,
            )  # fmt: skip
            grads = dict(zip(seg.leaves, found, strict=True))
        else:
            grads = {}
    return grads


def weight_grads(segments: list[Segment]) -> None:
    """The W half: accumulate every segment's parameter gradients into `.grad`, top first (the
    order a fused backward accumulates in), and free the graphs."""
    for seg in reversed(segments):
        outs, gouts = seg.grad_outputs
        pairs = [(t, g) for t, g in zip(outs, gouts, strict=True) if t.grad_fn is not None]
        if seg.params and pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs], inputs=seg.params)
        seg.grad_outputs = ([], [])
    segments.clear()
