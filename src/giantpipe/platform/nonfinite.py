"""No silent NaN: a non-finite loss or gradient stops the run, or skips that step's update.

`callbacks.nonfinite.action` (conf/callbacks/default.yaml), a callback as Lightning's own
`EarlyStopping(check_finite=True)` is:

    raise  (default) stop before the update with one line naming the step and the stage (and
           layer) where the non-finite value first appeared; the last checkpoint stays the
           last good one
    skip   drop that step's update (no weight or optimizer-state change), count it in
           `train/skipped_steps`, go on

What is checked: the loss and the global gradient norm. Where it first appeared: every local
layer's forward output is watched during training steps (a forward hook that folds `isfinite`
into one flag per layer, no host sync), so a NaN born in stage 0's second layer is named there,
not at the loss four stages later. If every forward output was finite, the loss is named (last
stage), else the gradients, in backward order: the last stage whose gradients are non-finite,
since gradients flow from the last stage to the first. Every rank gathers every rank's flags and takes the same
decision, so a pipeline stops (or skips) as one.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils._pytree import tree_leaves

from giantpipe.platform.config import ConfigError

ACTIONS = ("raise", "skip")


class NonFiniteError(ConfigError):
    """A non-finite loss or gradient; every rank of a run raises it together."""

    every_rank = True


class NonFiniteGuard(pl.Callback):
    def __init__(self, action: str = "raise"):
        if action not in ACTIONS:
            raise ConfigError(f"callbacks.nonfinite.action={action!r}: choose raise or skip")
        self.action = action
        self.skipped = 0
        self.layer_bad: Tensor | None = None  # per local layer: a non-finite output this step
        self.loss_bad: Tensor | None = None
        self.layer_ids: list[int] = []
        self.hooks: list = []
        self.watching = False

    # ------------------------------------------------------------ watching the forward
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        layers = getattr(getattr(pl_module, "model", None), "layers", None) or []
        self.layer_ids = [i for i, layer in enumerate(layers)
                          if any(not p.is_meta for p in layer.parameters())]
        self.layer_bad = torch.zeros(len(self.layer_ids), dtype=torch.bool, device=pl_module.device)
        for slot, i in enumerate(self.layer_ids):
            self.hooks.append(layers[i].register_forward_hook(self._watch(slot)))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def _watch(self, slot: int):
        def hook(module, args, output) -> None:
            if not self.watching:
                return
            for t in tree_leaves(output):
                if isinstance(t, Tensor) and t.is_floating_point():
                    self.layer_bad[slot] |= ~torch.isfinite(t.detach()).all()
        return hook

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.layer_bad.zero_()
        self.loss_bad = None
        self.watching = True

    def on_before_backward(self, trainer, pl_module, loss: Tensor) -> None:
        self.loss_bad = ~torch.isfinite(loss.detach())

    # ------------------------------------------------------------ deciding
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        self.watching = False
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        grad_bad = (~torch.isfinite(torch.nn.utils.get_total_norm(grads, 2.0, foreach=True))
                    if grads else torch.zeros((), dtype=torch.bool, device=pl_module.device))
        bad = self.layer_bad.tolist()  # one host sync per step
        first_layer = next((i for slot, i in enumerate(self.layer_ids) if bad[slot]), -1)
        loss_bad = self.loss_bad if self.loss_bad is not None else torch.zeros((), dtype=torch.bool)
        mine = torch.tensor([int(loss_bad), int(grad_bad), first_layer], device=pl_module.device)
        flags = gather(mine)  # [rank] -> flags
        where = locate(flags, stage_of(trainer))
        if where is None:
            if self.action == "skip":
                pl_module.log("train/skipped_steps", float(self.skipped), batch_size=1)
            return
        what, origin = where
        step = trainer.global_step
        if self.action == "raise":
            raise NonFiniteError(
                f"non-finite {what} at step {step}, first in {origin}; stopped before the update (the last "
                "checkpoint holds finite weights); callbacks.nonfinite.action=skip skips such steps instead"
            )
        for p in params:  # no gradient: the optimizer leaves the weights and its state alone
            p.grad = None
        self.skipped += 1
        pl_module.log("train/skipped_steps", float(self.skipped), batch_size=1)
        if trainer.is_global_zero:
            print(f"giantpipe-train: skipped the update of step {step}: non-finite {what}, first in {origin} "
                  f"({self.skipped} skipped so far)", flush=True)


def gather(t: Tensor) -> list[list[int]]:
    """Every rank's `t`, in rank order (just `t` in a one-process run)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [t.tolist()]
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


def stage_of(trainer: pl.Trainer):
    """rank -> pipeline stage (every rank is stage 0 without a pipeline)."""
    topology = getattr(trainer.strategy, "topology", None)
    return topology.stage_of if topology is not None else (lambda rank: 0)


def locate(flags: list[list[int]], stage_of) -> tuple[str, str] | None:
    """(what was non-finite, where it first appeared) from every rank's
    [loss non-finite, gradients non-finite, first local layer with a non-finite output or -1];
    None if the loss and the gradients are finite (layer outputs only locate: a carry may hold
    a legitimate -inf, an additive mask say)."""
    loss, grads = any(f[0] for f in flags), any(f[1] for f in flags)
    if not (loss or grads):
        return None
    what = "loss" if loss else "gradient norm"
    layers = [(layer, stage_of(rank)) for rank, (_, _, layer) in enumerate(flags) if layer >= 0]
    if layers:
        layer, stage = min(layers)
        return what, f"stage {stage} (the output of layer {layer})"
    if loss:
        return what, f"stage {max(stage_of(r) for r in range(len(flags)))} (the loss)"
    stages = [stage_of(rank) for rank, f in enumerate(flags) if f[1]]
    return what, f"stage {max(stages)} (its gradients, in backward order)"
