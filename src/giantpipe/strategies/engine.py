"""The pipeline engine: one process runs one stage (composite layer) of one replica.

    train_step(batch)
      split the batch into M micro-batches           (model.split; every stage has the batch)
      for each action of this stage's schedule:
        F i: carry <- first_carry(mb_i) or recv from the previous stage
             out <- local layers (re-materialized in backward if checkpointed)
             last stage: loss_i = loss_fn(out, mb_i) / normalizer(whole batch); else send out
        B i: last stage: backward(loss_i); else backward(out_i, recv'd output gradients)
             send the input gradients to the previous stage
      all-reduce (sum) gradients over the stage's replicas; all-reduce the loss over the world

The loss of each replica is divided by the normalizer of the *global* batch (summed over
replicas), so summing replicas' gradients gives exactly the gradients of the global batch,
even when replicas hold different numbers of tokens; with equal normalizers this is the usual
average. Gradients accumulate into `.grad` like `loss.backward()`: zero them between steps.

Re-materialization (torchgpipe's names): `always` checkpoints every micro-batch, `except_last`
all but the last (whose backward comes first in GPipe, so keeping it costs nothing extra),
`never` none. Recomputation is torch.utils.checkpoint (non-reentrant, preserve_rng_state):
the forward's CPU and device RNG states are stashed and restored for the recompute, so
dropout masks are the same, and BatchNorm running statistics are restored after it so they
are updated once per micro-batch.

Split backward (`split_backward=True`, the default): on every stage but the first, the first
and the last backward of a step run without their linear layers' weight products, send the
input gradients at once, and run those products later (split_backward.py): at most
`DEFERRED_WEIGHT_GRADS` micro-batches' weight products wait, and the rest run at the step's
end. Re-materialized micro-batches keep the fused backward.

Receives go ahead of need: at a step's start a stage announces its M incoming carries
(`Link.expect_carries`), and each backward's output gradients are posted as soon as the one
before them arrived (`Link.post_grads`), so data crosses while the stage computes instead of
on the critical path; sends never block.

Observability: with `timeline=True` (or `engine.timeline = True`) every step records, per
rank, when each micro-batch's forward, backward and recompute ran and when this stage sent,
received and waited (`timeline.StepTimeline`, in `engine.last_timeline`), and the stage's peak
memory. Off (the default), each action costs one `is None` test more.

A stage that dies leaves its neighbours blocked in a receive or a collective; they raise
once the process group's timeout passes (gloo) or the NCCL watchdog fires. A step that
raised leaves the pipeline out of step: end the run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from time import perf_counter

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint, noop_context_fn

from giantpipe.models.contract import Batch, Carry, LayeredModel, SumLoss, batch_size, materialize
from giantpipe.strategies.comm import Link, wants_grad
from giantpipe.strategies.partition import stage_ranges, validate_balance
from giantpipe.strategies.schedule import Action, Phase, forward_only_stage, stage_actions
from giantpipe.strategies.split_backward import (
    WeightGradStore,
    arm_linear_layers,
    defer_weight_grads,
)
from giantpipe.strategies.timeline import StepTimeline, TimelineRecorder
from giantpipe.strategies.topology import PipelineGroups, Topology

CHECKPOINT_MODES = ("always", "except_last", "never")
BUCKET_BYTES = 25 * 2**20


@dataclass
class _Step:
    """What one mini-batch's actions share: its micro-batches, the stash between F and B."""

    micro_batches: list[Batch] | None
    training: bool
    normalizer: float | None = None  # set on the last stage when a loss is computed
    keep_outputs: bool = False
    # micro-batch -> (inputs wanting gradients, sent tensors or the loss, deferred weight
    # products or None)
    stash: dict[int, tuple[list[Tensor], object, WeightGradStore | None]] = field(
        default_factory=dict
    )
    weight_work: list[tuple[int, WeightGradStore]] = field(default_factory=list)  # deferred W
    loss: Tensor | None = None
    outputs: list[Carry] = field(default_factory=list)
    backward_order: list[int] = field(default_factory=list)  # this stage's backwards, in order
    grads_posted: int = 0  # backwards whose gradient receive is posted
    grads_taken: int = 0  # ... and already received


class PipelineEngine:
    """Runs this process's stage of a pipelined model: train, evaluate, or forward a batch.

    `model` may be built on the meta device (then `seed` initializes this stage's layers,
    exactly as a whole-model `materialize` would) or fully built; either way the engine takes
    it over, materializes only this stage's layers on `device` and leaves the others on meta.
    Every rank of the world builds an engine together (subgroups are created collectively).
    """

    GRADS_AHEAD = 1  # gradient receives posted before the backward that needs them
    # micro-batches whose weight gradients may wait after their input gradients were sent; one
    # lets the last stage's final weight gradients overlap the previous stage's final backward
    DEFERRED_WEIGHT_GRADS = 1

    def __init__(
        self,
        model: LayeredModel,
        loss_fn: SumLoss,
        balance: Sequence[int],
        *,
        micro_batches: int,
        topology: Topology | None = None,
        schedule: str = "gpipe",
        checkpoint: str = "except_last",
        device: torch.device | str = "cpu",
        seed: int = 0,
        groups: PipelineGroups | None = None,
        timeline: bool = False,
        split_backward: bool = True,
    ) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        rank = dist.get_rank() if distributed else 0
        world_size = dist.get_world_size() if distributed else 1
        balance = validate_balance(balance, len(model.layers))
        _check_parameters(model, balance)
        if not distributed and (len(balance) > 1 or (topology and topology.world_size > 1)):
            raise ValueError(
                "a pipeline of several processes needs torch.distributed: initialize the "
                "process group (one process per stage and replica) before building the engine"
            )
        topology = topology or Topology.for_world(len(balance), world_size)
        topology.check_world_size(world_size)
        if topology.num_stages != len(balance):
            raise ValueError(
                f"balance {balance} has {len(balance)} stages but the topology has "
                f"{topology.num_stages}: give one layer count per stage"
            )
        if checkpoint not in CHECKPOINT_MODES:
            raise ValueError(
                f"unknown checkpoint mode {checkpoint!r}; choose one of {CHECKPOINT_MODES}"
            )
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be at least 1, got {micro_batches}")

        stage = topology.stage_of(rank)
        self._train_actions = stage_actions(schedule, stage, topology.num_stages, micro_batches)
        self._forward_actions = forward_only_stage(stage, topology.num_stages, micro_batches)
        self._backward_order = [
            a.micro_batch for a in self._train_actions if a.phase is Phase.BACKWARD
        ]

        self.topology = topology
        self.rank, self.world_size = rank, world_size
        self.stage, self.replica = topology.coords(rank)
        self.num_stages = topology.num_stages
        self.is_first, self.is_last = self.stage == 0, self.stage == self.num_stages - 1
        self.micro_batches = micro_batches
        self.schedule = schedule
        self.checkpoint = checkpoint
        self.device = torch.device(device)
        self.loss_fn = loss_fn
        self.layer_indices = stage_ranges(balance)[self.stage]
        self.module = _place_layers(model, self.layer_indices, self.device, seed)
        # Split backwards: the first and the last of the step, where the previous stage waits
        # for this one (pipeline fill and drain); in between, the slower of the two stages sets
        # the pace whether or not the weight products wait. The first stage's input gradients
        # go nowhere: its backward stays fused.
        self._split_micro_batches: set[int] = set()
        if split_backward and not self.is_first:
            self._split_micro_batches = {self._backward_order[0], self._backward_order[-1]}
            for i in self.layer_indices:
                arm_linear_layers(self.module.layers[i])

        self.groups = groups or (topology.create_groups(rank) if distributed else PipelineGroups())
        prev_rank, next_rank = topology.prev_rank(rank), topology.next_rank(rank)
        self._prev = Link(prev_rank, self.device) if prev_rank is not None else None
        self._next = Link(next_rank, self.device) if next_rank is not None else None
        self._batchnorms = [
            m
            for i in self.layer_indices
            for m in model.layers[i].modules()
            if isinstance(m, _BatchNorm)
        ]
        self._recorder: TimelineRecorder | None = None
        self.last_timeline: StepTimeline | None = None  # the last step's, when recording
        self.timeline = timeline

    @property
    def timeline(self) -> bool:
        """Whether steps record their timeline into `last_timeline` (see timeline.py)."""
        return self._recorder is not None

    @timeline.setter
    def timeline(self, on: bool) -> None:
        if on and self._recorder is None:
            self._recorder = TimelineRecorder(
                self.rank, self.stage, self.replica, self.num_stages, self.micro_batches,
                self.schedule, self.device,
            )  # fmt: skip
            self._recorder.watch_backward(self.parameters())
        elif not on and self._recorder is not None:
            self._recorder.close()
            self._recorder = None

    # -- the local composite layer ------------------------------------------------------------

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This stage's parameters, named as in the whole model (`layers.3.weight`)."""
        for i in self.layer_indices:
            for name, p in self.module.layers[i].named_parameters():
                yield f"layers.{i}.{name}", p

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, p in self.named_parameters():
            yield p

    # -- steps ------------------------------------------------------------------------------------

    def train_step(self, batch: Batch, *, sync_gradients: bool = True) -> Tensor:
        """Forward and backward one mini-batch through the pipeline; return its loss (detached,
        the same on every rank). With `sync_gradients=False` the replicas' gradients are not
        all-reduced (gradient accumulation: call `all_reduce_gradients` at the end)."""
        if self._recorder is not None:
            self._recorder.start("train")
        step = self._start(batch, training=True, loss=True)
        for action in self._train_actions:
            self._run_action(action, step)
        self._run_weight_grads(step, keep=0)
        self._wait_sends()
        if sync_gradients:
            self.all_reduce_gradients()
        return self._finish(self._reduce_loss(step))

    @torch.no_grad()
    def eval_step(self, batch: Batch) -> Tensor:
        """The mini-batch loss without gradients, the same on every rank. The caller chooses
        train()/eval() mode of the model (Lightning does)."""
        if self._recorder is not None:
            self._recorder.start("eval")
        step = self._start(batch, training=False, loss=True)
        for action in self._forward_actions:
            self._run_action(action, step)
        self._wait_sends()
        return self._finish(self._reduce_loss(step))

    @torch.no_grad()
    def forward(self, batch: Batch) -> Carry | None:
        """The last stage's output carry for the batch (micro-batches joined by `model.merge`);
        None on the other stages."""
        if self._recorder is not None:
            self._recorder.start("forward")
        step = self._start(batch, training=False, loss=False)
        step.keep_outputs = True
        for action in self._forward_actions:
            self._run_action(action, step)
        self._wait_sends()
        return self._finish(self.module.merge(step.outputs) if self.is_last else None)

    def all_reduce_gradients(self) -> None:
        """Sum this stage's gradients over its replicas (each replica's loss already carries the
        global normalizer). Parameters without a gradient count as zero."""
        group = self.groups.stage
        if group is None:
            return
        start = perf_counter()
        params = [p for p in self.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for grads in _buckets([p.grad for p in params], BUCKET_BYTES):
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=group)
            for grad, synced in zip(
                grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True
            ):
                grad.copy_(synced)
        if self._recorder is not None and self._recorder.recording:
            self._recorder.add("sync", -1, start, perf_counter())

    # -- one action -------------------------------------------------------------------------------

    def _run_action(self, action: Action, step: _Step) -> None:
        """Every forward and backward goes through here (the place for per-action timing)."""
        if action.phase is Phase.FORWARD:
            self._forward(action.micro_batch, step)
        else:
            self._backward(action.micro_batch, step)

    def _forward(self, i: int, step: _Step) -> None:
        rec = self._recorder
        if self.is_first:
            assert step.micro_batches is not None
            carry = self.module.first_carry(step.micro_batches[i])
            begin = perf_counter() if rec is not None else 0.0
        else:
            assert self._prev is not None
            begin = perf_counter() if rec is not None else 0.0
            carry = self._prev.recv_carry()
            if rec is not None:
                rec.add("recv", i, begin, begin := perf_counter())
        inputs = [t for t in carry.values() if wants_grad(t)]
        store = None
        if step.training and self._recompute(i):
            out = checkpoint(
                self._run_layers,
                carry,
                use_reentrant=False,
                preserve_rng_state=True,
                context_fn=self._context_fn(i),
            )
        elif step.training and i in self._split_micro_batches:
            store = WeightGradStore()
            with defer_weight_grads(store):
                out = self._run_layers(carry)
        else:
            out = self._run_layers(carry)
        if not self.is_last:
            assert self._next is not None
            if rec is not None:
                rec.add("forward", i, begin, begin := perf_counter())
                rec.sample_memory()
            sent = self._next.send_carry(out)
            if rec is not None:
                rec.add("send", i, begin, perf_counter())
            if step.training:
                step.stash[i] = (inputs, sent, store)
                self._post_grads_ahead(step)
            return
        if step.keep_outputs:
            step.outputs.append(out)
        if step.normalizer is not None:
            assert step.micro_batches is not None
            loss = self.loss_fn(out, step.micro_batches[i]) / step.normalizer
            step.loss = loss.detach() if step.loss is None else step.loss + loss.detach()
            if step.training:
                step.stash[i] = (inputs, loss, store)
        if rec is not None:
            rec.add("forward", i, begin, perf_counter())
            rec.sample_memory()

    def _backward(self, i: int, step: _Step) -> None:
        rec = self._recorder
        inputs, roots, store = step.stash.pop(i)
        begin = perf_counter() if rec is not None else 0.0
        if isinstance(roots, Tensor):  # the last stage's loss
            if roots.requires_grad:
                torch.autograd.backward(roots)
        else:
            assert self._next is not None
            grads = self._next.recv_grads(roots)
            step.grads_taken += 1
            self._post_grads_ahead(step)  # the next backward's gradients arrive meanwhile
            if rec is not None:
                rec.add("recv", i, begin, begin := perf_counter())
                rec.sample_memory()
            if roots:
                torch.autograd.backward(roots, grads)
        if rec is not None:
            rec.add("backward", i, begin, begin := perf_counter())
            rec.sample_memory()
        if self._prev is not None:
            self._prev.send_grads(
                [t.grad if t.grad is not None else torch.zeros_like(t) for t in inputs]
            )
            if rec is not None:
                rec.add("send", i, begin, perf_counter())
        if store is not None:
            step.weight_work.append((i, store))
            self._run_weight_grads(step, keep=self.DEFERRED_WEIGHT_GRADS)

    def _run_weight_grads(self, step: _Step, keep: int) -> None:
        """Run the deferred weight products, oldest micro-batch first, until `keep` are left."""
        rec = self._recorder
        while len(step.weight_work) > keep:
            i, store = step.weight_work.pop(0)
            begin = perf_counter() if rec is not None else 0.0
            store.run()
            if rec is not None:
                rec.add("weight", i, begin, perf_counter())
                rec.sample_memory()

    def _post_grads_ahead(self, step: _Step) -> None:
        """Post the gradient receive of the next backwards whose forward is done, so the
        gradients travel while this stage computes (they arrive in backward order)."""
        assert self._next is not None
        order = step.backward_order
        while (
            step.grads_posted < len(order)
            and step.grads_posted - step.grads_taken < self.GRADS_AHEAD
            and order[step.grads_posted] in step.stash
        ):
            _, sent, _ = step.stash[order[step.grads_posted]]
            self._next.post_grads(sent)
            step.grads_posted += 1

    def _run_layers(self, carry: Carry) -> Carry:
        # a copy, so a layer that assigns into its carry cannot change what a recompute sees
        return self.module.run_layers(dict(carry), self.layer_indices)

    def _recompute(self, i: int) -> bool:
        if self.checkpoint == "always":
            return True
        return self.checkpoint == "except_last" and i < self.micro_batches - 1

    def _context_fn(self, i: int):
        """The recompute's context: keep BatchNorm statistics, and time it when recording."""
        rec = self._recorder
        if not self._batchnorms and rec is None:
            return noop_context_fn

        @contextmanager
        def recompute_context():  # entered when the backward recomputes, not before
            with ExitStack() as stack:
                if self._batchnorms:
                    stack.enter_context(_kept_buffers(self._batchnorms))
                if rec is not None:
                    stack.enter_context(rec.span("recompute", i))
                yield

        return lambda: (nullcontext(), recompute_context())

    # -- step set-up and results ------------------------------------------------------------------

    def _start(self, batch: Batch, *, training: bool, loss: bool) -> _Step:
        size = batch_size(batch)
        if size < self.micro_batches:
            raise ValueError(
                f"a batch of {size} cannot be split into {self.micro_batches} micro-batches: "
                f"use a batch of at least {self.micro_batches} or fewer micro-batches"
            )
        micro_batches = None
        if self.is_first or self.is_last:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            micro_batches = self.module.split(batch, self.micro_batches)
            if len(micro_batches) != self.micro_batches:
                raise ValueError(
                    f"model.split returned {len(micro_batches)} micro-batches, expected "
                    f"{self.micro_batches}"
                )
        step = _Step(micro_batches, training)
        if training:
            step.backward_order = self._backward_order
        if loss and self.is_last:
            step.normalizer = self._global_normalizer(batch)
        if self._prev is not None:
            self._prev.expect_carries(self.micro_batches)  # their receives go ahead of need
        return step

    def _global_normalizer(self, batch: Batch) -> float:
        normalizer = float(self.loss_fn.normalizer(batch))
        if self.groups.stage is not None:
            total = torch.tensor([normalizer], dtype=torch.float64, device=self.device)
            dist.all_reduce(total, group=self.groups.stage)
            normalizer = total.item()
        if normalizer <= 0:
            raise ValueError(
                f"the loss normalizer of the batch is {normalizer}; it must be positive"
            )
        return normalizer

    def _reduce_loss(self, step: _Step) -> Tensor:
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        if step.loss is not None:
            loss += step.loss.double()
        if self.world_size > 1:
            begin = perf_counter()
            dist.all_reduce(loss)
            if self._recorder is not None:
                self._recorder.add("sync", -1, begin, perf_counter())
        return loss.float()

    def _wait_sends(self) -> None:
        begin = perf_counter()
        for link in (self._prev, self._next):
            if link is not None:
                link.wait()
        if self._recorder is not None:
            self._recorder.add("wait", -1, begin, perf_counter())

    def _finish(self, result):
        """Close the step's timeline (when recording) and pass `result` through."""
        if self._recorder is not None:
            self.last_timeline = self._recorder.finish()
        return result


def _check_parameters(model: LayeredModel, balance: list[int]) -> None:
    """Every parameter must live in a layer, and a shared (tied) one inside a single stage."""
    outside = [name for name, _ in model.named_parameters() if not name.startswith("layers.")]
    if outside:
        raise ValueError(
            f"parameters outside model.layers cannot be placed on a stage: {outside[:5]}; "
            f"move them into the layer that uses them"
        )
    stage_of_param: dict[int, tuple[int, int]] = {}
    for stage, layers in enumerate(stage_ranges(balance)):
        for i in layers:
            for p in model.layers[i].parameters():
                first = stage_of_param.setdefault(id(p), (stage, i))
                if first[0] != stage:
                    raise ValueError(
                        f"layers {first[1]} and {i} share a parameter but sit on stages {first[0]} "
                        f"and {stage}; choose a balance that keeps them on one stage, or untie them"
                    )


def _on_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in [*module.parameters(), *module.buffers()])


def _place_layers(
    model: LayeredModel, local: range, device: torch.device, seed: int
) -> LayeredModel:
    """Materialize (or move) this stage's layers on `device`; every other layer goes to meta."""
    for i, layer in enumerate(model.layers):
        if i in local:
            if _on_meta(layer):
                materialize(model, [i], device, seed)
            else:
                layer.to(device)
        elif not _on_meta(layer):
            layer.to("meta")
    return model


def _buckets(tensors: list[Tensor], max_bytes: int) -> Iterator[list[Tensor]]:
    """Consecutive runs of same-dtype tensors of at most `max_bytes` (one tensor at least)."""
    bucket: list[Tensor] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and (t.dtype != bucket[0].dtype or size + nbytes > max_bytes):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    if bucket:
        yield bucket


@contextmanager
def _kept_buffers(modules: list[nn.Module]):
    """Restore the modules' buffers on exit: a recompute must not update running statistics twice.
    The restore writes through `.data`, leaving the buffers' autograd version unchanged: a
    deferred weight-gradient half may still hold them saved (BatchNorm saves its running
    statistics, and the restore gives them back the very values it saved)."""
    saved = [(b, b.clone()) for m in modules for b in m.buffers(recurse=False)]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.data.copy_(value)
