"""Re-materialization of one chunk on one micro-batch: a forward that records no graph.

torch.utils.checkpoint's non-reentrant form records the forward's autograd graph and swaps
each saved tensor for a placeholder. The tensors go, but the graph stays: a node per op, a
placeholder per saved tensor, and the heap between them, for every micro-batch in flight
until its backward. Measured on a 100-block giant net (d_model 128) with keyed dropout:
about 14 MiB per micro-batch in flight, against 64 KiB for the chunk's input; at 300 blocks
and M = 8 that was 0.4 GiB of a 2.2 GiB stage, which no memory model of live tensors predicts.

`rematerialized(run, carry)` is torchgpipe's design (a Checkpoint function, a "phony" input):
the forward runs without grad and keeps only the carry; the backward recomputes it with grad,
under the forward's RNG and autocast states and the caller's recompute context, and
back-propagates the output gradients through the recompute. So a micro-batch in flight holds
its input and one graph node, and the memory model's "boundary" term is what it holds.

The outputs: floating tensors the chunk computed want gradients (a forward without grad cannot
tell which of them depend on a parameter; a gradient for one that does not is zero and never
reaches a parameter). A tensor the chunk passes through unchanged keeps its input's
requires_grad.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch.utils.checkpoint import get_device_states, set_device_states

from giantpipe.models.contract import Carry


def rematerialized(
    run: Callable[[Carry], Carry],
    carry: Carry,
    recompute_context: Callable[[], AbstractContextManager] = nullcontext,
) -> Carry:
    """`run(carry)`, keeping only `carry` for the backward, which recomputes `run` (entering
    `recompute_context()` around the recompute)."""
    keys = list(carry)
    phony = torch.empty(0, requires_grad=True)  # makes the outputs part of the graph
    out_keys, *outputs = _Rematerialize.apply(run, recompute_context, keys, phony, *carry.values())
    return dict(zip(out_keys, outputs, strict=True))


class _Rematerialize(torch.autograd.Function):
    """forward: run without grad; backward: recompute with grad and back-propagate."""

    @staticmethod
    def forward(ctx, run, recompute_context, keys, phony, *values):
        ctx.run, ctx.recompute_context, ctx.keys = run, recompute_context, keys
        ctx.set_materialize_grads(False)  # outputs nobody used get no gradient, not zeros
        ctx.cpu_rng = torch.get_rng_state()
        ctx.devices, ctx.device_rngs = get_device_states(*values)  # the GPUs the carry is on
        ctx.device_type = next((v.device.type for v in values), "cpu")
        ctx.autocast = torch.is_autocast_enabled(ctx.device_type), torch.get_autocast_dtype(ctx.device_type)
        ctx.save_for_backward(*values)
        out = run(dict(zip(keys, values, strict=True)))
        inputs = {id(v): v for v in values}
        passed = [inputs[id(t)] for t in out.values() if id(t) in inputs]
        ctx.mark_non_differentiable(
            *(t for t in out.values() if not (t.is_floating_point() or t.is_complex())),
            *(t for t in passed if not t.requires_grad),
        )
        return (list(out), *out.values())

    @staticmethod
    def backward(ctx, _keys_grad, *grads):
        inputs = [v.detach().requires_grad_(v.requires_grad) for v in ctx.saved_tensors]
        enabled, dtype = ctx.autocast
        with torch.random.fork_rng(devices=ctx.devices):
            torch.set_rng_state(ctx.cpu_rng)
            set_device_states(ctx.devices, ctx.device_rngs)
            with (
                torch.enable_grad(),
                torch.autocast(ctx.device_type, dtype=dtype, enabled=enabled),
                ctx.recompute_context(),
            ):
                out = ctx.run(dict(zip(ctx.keys, inputs, strict=True)))
        pairs = [
            (t, g)
            for t, g in zip(out.values(), grads, strict=True)
            if g is not None and t.requires_grad
        ]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        return (None, None, None, None, *(x.grad if x.requires_grad else None for x in inputs))
