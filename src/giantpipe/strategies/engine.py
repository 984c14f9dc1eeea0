"""The pipeline engine: one process runs one stage of one replica (V chunks of the model).

    train_step(batch)
      split the batch into M micro-batches           (model.split; every stage has the batch)
      for each action of this stage's schedule (schedule.py), on (micro-batch i, chunk c):
        F: carry <- first_carry(mb_i) or recv from the previous virtual stage
           out <- chunk c's layers (re-materialized in backward if recomputed)
           last virtual stage: loss_i = loss_fn(out, mb_i) / normalizer(whole batch); else send
        B / BW: last virtual stage: backward(loss_i); else backward(out, recv'd output grads)
           (B leaves the linear layers' weight products to W), send the input gradients back
        W: the deferred weight products of (i, c)
      all-reduce (sum) gradients over the stage's replicas; all-reduce the loss over the world

The loss of each replica is divided by the normalizer of the *global* batch (summed over
replicas), so summing replicas' gradients gives exactly the gradients of the global batch,
even when replicas hold different numbers of tokens; with equal normalizers this is the usual
average. Gradients accumulate into `.grad` like `loss.backward()`: zero them between steps.

Chunks (`virtual_stages=V`): the balance lists N·V layer counts; stage r holds the virtual
stages its schedule places there (looped or V-shaped, schedule_actions.py). Neighbouring
virtual stages on two ranks talk over a `Link` tagged by their boundary; on one rank (the V's
turn) over a `LocalLink`.

Re-materialization (torchgpipe's names): `always` recomputes every micro-batch's forward in
its backward, `except_last` all but the last (whose backward comes first in GPipe, so keeping
it costs nothing extra), `never` none. A recomputed forward records no graph and keeps only its
input (rematerialize.py); its CPU and device RNG states are restored for the recompute, so
dropout masks are the same, and BatchNorm running statistics are restored after it so they
are updated once per micro-batch. A recomputed micro-batch's backward stays fused
(its W is empty): deferring would keep the linear layers' inputs alive through the recompute.

Split backward: the zero-bubble schedules split every backward into B and W. Under gpipe and
1f1b (`split_backward=True`, the default) the first and the last backward of a step on every
stage but the first are split (`schedule.split_ends`), where the previous stage waits for
this one; `split_backward=False` fuses every backward back.

Receives go ahead of need: at a step's start a stage announces its M incoming carries
(`Link.expect_carries`), and each backward's output gradients are posted as soon as the one
before them arrived (`Link.post_grads`), so data crosses while the stage computes instead of
on the critical path; sends never block.

Observability: the engine always holds a recorder (timeline.py) and times every action
through `recorder.span`; with `timeline=True` (or `engine.timeline = True`) every step records,
per rank, when each micro-batch's forward, backward, weight products and recompute ran and
when this stage sent, received and waited (`engine.last_timeline`), and the stage's peak
memory. Off (the default), the recorder is a no-op.

A stage that dies leaves its neighbours blocked in a receive or a collective; they raise
once the process group's timeout passes (gloo) or the NCCL watchdog fires. A step that
raised leaves the pipeline out of step: end the run.

(Over 400 lines on purpose: one class whose step methods read top to bottom as the schedule
runs; its set-up lives in stage_setup.py.)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from giantpipe.models.contract import Batch, Carry, LayeredModel, SumLoss, batch_size
from giantpipe.strategies.comm import Link, LocalLink, wants_grad
from giantpipe.strategies.partition import stage_ranges
from giantpipe.strategies.rematerialize import rematerialized
from giantpipe.strategies.schedule import (
    BACKWARDS,
    Action,
    Cost,
    Phase,
    check_schedule,
    forward_only_stage,
    make_schedule,
    owner,
    split_ends,
    validate,
    virtual_stage,
)
from giantpipe.strategies.split_backward import (
    WeightGradStore,
    arm_linear_layers,
    defer_weight_grads,
)
from giantpipe.strategies.stage_setup import (
    REMAT_MODES,
    all_reduce_gradients,
    chunk_links,
    kept_buffers,
    place_layers,
    validated,
)
from giantpipe.strategies.timeline import NULL_RECORDER, Recorder, StepTimeline, TimelineRecorder
from giantpipe.strategies.topology import PipelineGroups, Topology

CHECKPOINT_MODES = REMAT_MODES  # the name the config and the engine's keyword use


@dataclass
class _Stashed:
    """What a micro-batch's forward leaves for its backward (and its weight products)."""

    inputs: list[Tensor]  # received tensors that want gradients (sent back in B)
    sent: list[Tensor] | None = None  # tensors sent on, whose gradients come back
    loss: Tensor | None = None  # the last stage's share of the loss
    store: WeightGradStore | None = None  # deferred weight products, for W


@dataclass
class _Chunk:
    """One virtual stage this rank holds: its layers and its links to the neighbouring ones."""

    index: int  # local chunk (0 .. V-1)
    stage: int  # virtual stage (0 .. N·V-1)
    layers: range
    prev: Link | LocalLink | None
    next: Link | LocalLink | None
    is_first: bool
    is_last: bool


@dataclass
class _Step:
    """What one mini-batch's actions share: its micro-batches, the stash between F and B/W."""

    micro_batches: list[Batch] | None
    training: bool
    normalizer: float | None = None  # set on the last stage when a loss is computed
    keep_outputs: bool = False
    stash: dict[tuple[int, int], _Stashed] = field(default_factory=dict)  # (micro-batch, chunk)
    deferred: dict[tuple[int, int], WeightGradStore] = field(default_factory=dict)  # B done
    loss: Tensor | None = None
    outputs: list[Carry] = field(default_factory=list)
    grads_posted: list[int] = field(default_factory=list)  # per chunk: gradient receives posted
    grads_taken: list[int] = field(default_factory=list)  # ... and already received


class PipelineEngine:
    """Runs this process's stage of a pipelined model: train, evaluate, or forward a batch.

    `model` may be built on the meta device (then `seed` initializes this stage's layers,
    exactly as a whole-model `materialize` would) or fully built; either way the engine takes
    it over, materializes only this stage's layers on `device` and leaves the others on meta.
    Every rank of the world builds an engine together (subgroups are created collectively).
    """

    GRADS_AHEAD = 1  # gradient receives posted before the backward that needs them

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
        virtual_stages: int = 1,
    ) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        self.world_size = dist.get_world_size() if distributed else 1
        self.placement = check_schedule(schedule, virtual_stages).placement
        if virtual_stages > 1 and distributed and dist.get_backend() == "nccl":
            raise ValueError(
                "virtual_stages > 1 needs tagged point-to-point messages (several virtual "
                "stages talk over one pair of ranks) and NCCL ignores tags: use "
                "strategy.virtual_stages=1 on GPUs (zb_h1 and zb_h2 run at V=1)"
            )
        balance, topology = validated(
            model, balance, topology, checkpoint, micro_batches, distributed, self.world_size,
            virtual_stages,
        )  # fmt: skip
        self.topology = topology
        self.stage, self.replica = topology.coords(self.rank)
        self.num_stages = topology.num_stages
        self.virtual_stages = virtual_stages
        self.micro_batches = micro_batches
        self.schedule = schedule
        self.remat_mode = checkpoint
        self.device = torch.device(device)
        self.loss_fn = loss_fn
        ranges = stage_ranges(balance)
        self._chunk_ranges = [
            ranges[virtual_stage(self.stage, c, self.num_stages, self.placement)]
            for c in range(virtual_stages)
        ]
        self.layer_indices = (
            self._chunk_ranges[0] if virtual_stages == 1
            else sorted(i for r in self._chunk_ranges for i in r)
        )  # fmt: skip
        self.module = place_layers(model, set(self.layer_indices), self.device, seed)
        self._split_backward = split_backward
        self._plan_actions()
        self._batchnorms = [
            m for i in self.layer_indices for m in model.layers[i].modules()
            if isinstance(m, _BatchNorm)
        ]  # fmt: skip
        self._connect(groups, distributed)
        self._recorder: Recorder = NULL_RECORDER
        self.last_timeline: StepTimeline | None = None  # the last step's, when recording
        self.timeline = timeline

    @property
    def is_first(self) -> bool:
        """Whether this rank feeds the model's inputs (holds virtual stage 0)."""
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        """Whether this rank computes the loss (holds the last virtual stage)."""
        last = self.num_stages * self.virtual_stages - 1
        return owner(last, self.num_stages, self.placement)[0] == self.stage

    def replan(self, cost: Cost) -> None:
        """Rebuild the schedule's lists from measured costs per (rank, action)
        (`schedule_auto.profile_costs`): a list-scheduled schedule (zb_h1, zb_h2, zbv) then
        orders each rank's work for the real durations. Every rank must pass the same costs."""
        self._plan_actions(cost)

    def _plan_actions(self, cost: Cost | None = None) -> None:
        """This rank's training and forward-only actions (for `cost`, or one clock per F, B, W).
        The whole schedule is checked (every micro-batch once, neighbours in the same order, no
        deadlock) before any step."""
        n, m, v = self.num_stages, self.micro_batches, self.virtual_stages
        train = make_schedule(self.schedule, n, m, v, cost)
        if self._split_backward and self.schedule in ("gpipe", "1f1b"):
            # Split backwards: the first and the last of the step, where the previous stage
            # waits for this one (pipeline fill and drain); in between, the slower of the two
            # stages sets the pace whether or not the weight products wait. The first stage's
            # input gradients go nowhere: its backward stays fused.
            train = [train[0], *(split_ends(actions) for actions in train[1:])]
        elif not self._split_backward:
            train = [[_fused(a) for a in actions if a.phase is not Phase.WEIGHT] for actions in train]
        validate(train, m, placement=self.placement)
        self._train_actions = train[self.stage]
        self._forward_actions = forward_only_stage(self.stage, n, m, v)
        self._backward_orders = [
            [a.micro_batch for a in self._train_actions if a.phase in BACKWARDS and a.chunk == c]
            for c in range(v)
        ]
        self._split = {(a.micro_batch, a.chunk) for a in self._train_actions if a.phase is Phase.WEIGHT}
        if self._split:
            for i in self.layer_indices:
                arm_linear_layers(self.module.layers[i])

    def _connect(self, groups: PipelineGroups | None, distributed: bool) -> None:
        """Process groups (collectively, on every rank) and the links between virtual stages."""
        topology, rank = self.topology, self.rank
        self.groups = groups or (topology.create_groups(rank) if distributed else PipelineGroups())
        last = self.num_stages * self.virtual_stages - 1
        links = chunk_links(
            topology, self.stage, self.replica, self.virtual_stages, self.placement, self.device
        )
        self._chunks = [
            _Chunk(c, k, self._chunk_ranges[c], prev, nxt, k == 0, k == last)
            for c, (k, prev, nxt) in enumerate(links)
        ]
        # the links of a one-chunk rank, which pipelined decoding shares
        self._prev, self._next = self._chunks[0].prev, self._chunks[0].next

    @property
    def checkpoint(self) -> str:
        """The re-materialization mode (the constructor's `checkpoint` keyword)."""
        return self.remat_mode

    @property
    def timeline(self) -> bool:
        """Whether steps record their timeline into `last_timeline` (see timeline.py)."""
        return self._recorder is not NULL_RECORDER

    @timeline.setter
    def timeline(self, on: bool | str) -> None:
        """True: events and peak memory; "time": events only. On CPU the memory probe reads
        glibc's heap after every action and every gradient, which costs more the more the heap
        is fragmented (many models in one process): "time" keeps the step's timing true."""
        if self.timeline:
            self._recorder.close()
            self._recorder = NULL_RECORDER
        if on:
            self._recorder = TimelineRecorder(
                self.rank, self.stage, self.replica, self.num_stages, self.micro_batches,
                self.schedule, self.device, self.virtual_stages, memory=on != "time",
            )  # fmt: skip
            self._recorder.watch_backward(self.parameters())

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
        self._recorder.start("train")
        step = self._start(batch, training=True, loss=True)
        for action in self._train_actions:
            self._run_action(action, step)
        assert not step.stash and not step.deferred, "the schedule left work undone"
        self._wait_sends()
        if sync_gradients:
            self.all_reduce_gradients()
        return self._finish(self._reduce_loss(step))

    @torch.no_grad()
    def eval_step(self, batch: Batch) -> Tensor:
        """The mini-batch loss without gradients, the same on every rank. The caller chooses
        train()/eval() mode of the model (Lightning does)."""
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
        with self._recorder.span("sync", -1):
            all_reduce_gradients([p for p in self.parameters() if p.requires_grad], group)

    # -- one action -------------------------------------------------------------------------------

    def _run_action(self, action: Action, step: _Step) -> None:
        """Every action of a schedule goes through here."""
        chunk = self._chunks[action.chunk]
        if action.phase is Phase.FORWARD:
            self._forward(action.micro_batch, chunk, step)
        elif action.phase is Phase.WEIGHT:
            self._weight(action.micro_batch, chunk, step)
        else:  # BACKWARD (fused) or INPUT (its weight products wait for W)
            self._backward(action.micro_batch, chunk, step)

    def _forward(self, i: int, chunk: _Chunk, step: _Step) -> None:
        rec = self._recorder
        if chunk.is_first:
            assert step.micro_batches is not None
            carry = self.module.first_carry(step.micro_batches[i])
        else:
            assert chunk.prev is not None
            with rec.span("recv", i, chunk.index):
                carry = chunk.prev.recv_carry()
        stashed = _Stashed([t for t in carry.values() if wants_grad(t)])
        with rec.span("forward", i, chunk.index):
            out = self._compute(i, chunk, carry, step, stashed)
            if chunk.is_last:
                self._take_output(i, out, step, stashed)
        if not chunk.is_last:
            assert chunk.next is not None
            with rec.span("send", i, chunk.index):
                stashed.sent = chunk.next.send_carry(out)
        if step.training:
            step.stash[(i, chunk.index)] = stashed
            if not chunk.is_last:
                self._post_grads_ahead(chunk, step)

    def _compute(
        self, i: int, chunk: _Chunk, carry: Carry, step: _Step, stashed: _Stashed
    ) -> Carry:
        """The chunk's layers on one micro-batch: recomputed in backward, with weight products
        deferred to W, or plain."""
        run = partial(self._run_layers, chunk.layers)
        if step.training and self._recompute(i):
            return rematerialized(run, carry, self._recompute_context(i, chunk.index))
        if step.training and (i, chunk.index) in self._split:
            stashed.store = WeightGradStore()
            with defer_weight_grads(stashed.store):
                return run(carry)
        return run(carry)

    def _take_output(self, i: int, out: Carry, step: _Step, stashed: _Stashed) -> None:
        """The last virtual stage keeps the output (inference) or its share of the loss."""
        if step.keep_outputs:
            step.outputs.append(out)
        if step.normalizer is not None:
            assert step.micro_batches is not None
            loss = self.loss_fn(out, step.micro_batches[i]) / step.normalizer
            step.loss = loss.detach() if step.loss is None else step.loss + loss.detach()
            stashed.loss = loss

    def _backward(self, i: int, chunk: _Chunk, step: _Step) -> None:
        rec, c = self._recorder, chunk.index
        stashed = step.stash.pop((i, c))
        if stashed.sent is None:  # the last virtual stage: its loss
            assert stashed.loss is not None
            with rec.span("backward", i, c):
                if stashed.loss.requires_grad:
                    torch.autograd.backward(stashed.loss)
        else:
            assert chunk.next is not None
            with rec.span("recv", i, c):
                grads = chunk.next.recv_grads(stashed.sent)
                step.grads_taken[c] += 1
                self._post_grads_ahead(chunk, step)  # the next gradients arrive meanwhile
            with rec.span("backward", i, c):
                if stashed.sent:
                    torch.autograd.backward(stashed.sent, grads)
        if chunk.prev is not None:
            with rec.span("send", i, c):
                chunk.prev.send_grads(
                    [t.grad if t.grad is not None else torch.zeros_like(t) for t in stashed.inputs]
                )
        if stashed.store is not None:
            step.deferred[(i, c)] = stashed.store

    def _weight(self, i: int, chunk: _Chunk, step: _Step) -> None:
        """The deferred weight products of micro-batch i (nothing if its backward was fused:
        a re-materialized micro-batch)."""
        store = step.deferred.pop((i, chunk.index), None)
        if store is not None:
            with self._recorder.span("weight", i, chunk.index):
                store.run()

    def _post_grads_ahead(self, chunk: _Chunk, step: _Step) -> None:
        """Post the gradient receive of the chunk's next backwards whose forward is done, so
        the gradients travel while this rank computes (they arrive in backward order)."""
        assert chunk.next is not None
        c = chunk.index
        order = self._backward_orders[c]
        while (
            step.grads_posted[c] < len(order)
            and step.grads_posted[c] - step.grads_taken[c] < self.GRADS_AHEAD
            and (order[step.grads_posted[c]], c) in step.stash
        ):
            sent = step.stash[(order[step.grads_posted[c]], c)].sent
            assert sent is not None
            chunk.next.post_grads(sent)
            step.grads_posted[c] += 1

    def _run_layers(self, layers: range, carry: Carry) -> Carry:
        # a copy, so a layer that assigns into its carry cannot change what a recompute sees
        return self.module.run_layers(dict(carry), layers)

    def _recompute(self, i: int) -> bool:
        if self.remat_mode == "always":
            return True
        return self.remat_mode == "except_last" and i < self.micro_batches - 1

    def _recompute_context(self, i: int, chunk: int):
        """The recompute's context: keep BatchNorm statistics, and time it."""
        rec = self._recorder

        @contextmanager
        def recompute_context():  # entered when the backward recomputes, not before
            with ExitStack() as stack:
                if self._batchnorms:
                    stack.enter_context(kept_buffers(self._batchnorms))
                stack.enter_context(rec.span("recompute", i, chunk))
                yield

        return recompute_context

    # -- step set-up and results ------------------------------------------------------------------

    def _start(self, batch: Batch, *, training: bool, loss: bool) -> _Step:
        size = batch_size(batch)
        if size < self.micro_batches:
            raise ValueError(
                f"a batch of {size} cannot be split into {self.micro_batches} micro-batches: "
                f"use a batch of at least {self.micro_batches} or fewer micro-batches"
            )
        micro_batches = None
        if self.is_first or self.is_last:  # the ranks that read micro-batches
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            micro_batches = self.module.split(batch, self.micro_batches)
            if len(micro_batches) != self.micro_batches:
                raise ValueError(
                    f"model.split returned {len(micro_batches)} micro-batches, expected "
                    f"{self.micro_batches}"
                )
        step = _Step(micro_batches, training)
        step.grads_posted = [0] * self.virtual_stages
        step.grads_taken = [0] * self.virtual_stages
        if loss and self.is_last:
            step.normalizer = self._global_normalizer(batch)
        for chunk in self._chunks:
            if chunk.prev is not None:  # their receives go ahead of need
                chunk.prev.expect_carries(self.micro_batches)
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
            with self._recorder.span("sync", -1):
                dist.all_reduce(loss)
        return loss.float()

    def _wait_sends(self) -> None:
        with self._recorder.span("wait", -1):
            for chunk in self._chunks:
                for link in (chunk.prev, chunk.next):
                    if link is not None:
                        link.wait()

    def _finish(self, result):
        """Close the step's timeline (when recording) and pass `result` through."""
        if self.timeline:
            self.last_timeline = self._recorder.finish()
        return result


def _fused(action: Action) -> Action:
    """A split backward's input half as a fused backward (`split_backward=False`)."""
    return Action(Phase.BACKWARD, action.micro_batch, action.chunk) if action.phase is Phase.INPUT else action
