"""Test helpers for the pipeline: launching K gloo processes, and a toy seq2seq LayeredModel.

`launch` starts K processes joined in a gloo process group whose store the parent hosts on a
port the OS picks (port 0), so launches never collide. They fork from multiprocessing's fork
server, which imported this module (torch, the engine) once for the whole pytest worker. Each
worker's return value (or error) comes back through a file; a worker still running after
`join_timeout` is killed and reported as hung.

`ToySeq2Seq` exercises what real models carry between stages: variable lengths (padding +
mask, and `split` trims each micro-batch to its own longest sequence), tensors without
gradient passed through (bool mask, int64 lengths), and an extra tensor (`enc`, like encoder
outputs) made early and attended to by later stages, passing untouched through stages between.
"""

from __future__ import annotations

import datetime
import math
import os
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from giantpipe.models.contract import Batch, Carry, LayeredModel, build_materialized, split_batch
from giantpipe.strategies.batchnorm import DeferredBatchNorm
from giantpipe.strategies.engine import PipelineEngine
from giantpipe.strategies.schedule_auto import MeasuredCost
from giantpipe.strategies.topology import Topology

torch.set_num_threads(1)

# -- launching -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    rank: int
    value: Any = None
    error: str | None = None  # traceback, or "hung" when killed after join_timeout
    seconds: float = 0.0  # time the worker function ran


def launch(
    fn, world_size: int, *args, pg_timeout: float = 60.0, join_timeout: float = 120.0
) -> list[Outcome]:
    """Run `fn(rank, world_size, *args)` in `world_size` fresh gloo processes; one Outcome each."""
    store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["pipeline_harness"])
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [
            ctx.Process(
                target=_child, args=(fn, rank, world_size, store.port, pg_timeout, out_dir, args)
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + join_timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        outcomes = []
        for rank in range(world_size):
            path = os.path.join(out_dir, f"{rank}.pt")
            if os.path.exists(path):
                outcomes.append(torch.load(path, weights_only=False))
            else:
                outcomes.append(
                    Outcome(rank, error=f"hung (or died, exit code {procs[rank].exitcode})")
                )
    return outcomes


def spawn(fn, world_size: int, *args, **kwargs) -> list[Any]:
    """`launch`, then fail with every failed rank's traceback; else the return values by rank."""
    outcomes = launch(fn, world_size, *args, **kwargs)
    errors = [f"rank {o.rank}: {o.error}" for o in outcomes if o.error]
    if errors:
        raise AssertionError("\n".join(errors))
    return [o.value for o in outcomes]


def _child(fn, rank, world_size, port, pg_timeout, out_dir, args) -> None:
    torch.set_num_threads(1)
    outcome = Outcome(rank)
    start = time.monotonic()
    try:
        store = dist.TCPStore("127.0.0.1", port, world_size, False)
        _all_started(store, world_size)  # a short pg_timeout must not be spent on start-up
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout),
        )  # fmt: skip
        outcome.value = fn(rank, world_size, *args)
    except BaseException:  # report everything, including a KeyboardInterrupt in a worker
        outcome.error = traceback.format_exc()
    outcome.seconds = time.monotonic() - start
    torch.save(outcome, os.path.join(out_dir, f"{rank}.pt.tmp"))
    os.replace(os.path.join(out_dir, f"{rank}.pt.tmp"), os.path.join(out_dir, f"{rank}.pt"))
    if outcome.error is None and dist.is_initialized():
        dist.destroy_process_group()


def _all_started(store: dist.TCPStore, world_size: int, timeout: float = 120.0) -> None:
    """Wait (on the store, not the process group) until every worker has started."""
    store.add("started", 1)
    deadline = time.monotonic() + timeout
    while store.add("started", 0) < world_size:
        if time.monotonic() > deadline:
            raise TimeoutError(f"not all {world_size} workers started within {timeout} s")
        time.sleep(0.02)


# -- a toy seq2seq model -------------------------------------------------------------------------


class Embed(nn.Module):
    """x, mask -> h (padding zeroed), mask, lengths (int64, no gradient)."""

    def __init__(self, d_in: int, d: int, dtype: torch.dtype):
        super().__init__()
        self.proj = nn.Linear(d_in, d, dtype=dtype)

    def forward(self, carry: Carry) -> Carry:
        mask = carry["mask"]
        h = torch.tanh(self.proj(carry["x"])) * mask.unsqueeze(-1)
        return {"h": h, "mask": mask, "lengths": mask.sum(1)}


class Block(nn.Module):
    """Residual MLP with dropout; optionally BatchNorm over features (per micro-batch statistics)."""

    def __init__(self, d: int, dtype: torch.dtype, dropout: float, batchnorm: bool = False):
        super().__init__()
        self.lin = nn.Linear(d, d, dtype=dtype)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.BatchNorm1d(d, dtype=dtype) if batchnorm else None

    def forward(self, carry: Carry) -> Carry:
        h, mask = carry["h"], carry["mask"].unsqueeze(-1)
        if self.norm is not None:
            h = self.norm(h.transpose(1, 2)).transpose(1, 2) * mask
        return {**carry, "h": h + self.drop(torch.tanh(self.lin(h))) * mask}


class Remember(nn.Module):
    """Adds `enc`, an extra tensor for later stages' attention (like encoder outputs)."""

    def __init__(self, d: int, dtype: torch.dtype):
        super().__init__()
        self.key = nn.Linear(d, d, dtype=dtype)

    def forward(self, carry: Carry) -> Carry:
        return {**carry, "enc": torch.tanh(self.key(carry["h"])) * carry["mask"].unsqueeze(-1)}


class Attend(nn.Module):
    """Masked attention over `enc`, plus a length-normalized mean pool (uses `lengths`)."""

    def __init__(self, d: int, dtype: torch.dtype):
        super().__init__()
        self.query = nn.Linear(d, d, dtype=dtype)
        self.pool = nn.Linear(d, d, dtype=dtype)

    def forward(self, carry: Carry) -> Carry:
        h, enc, mask = carry["h"], carry["enc"], carry["mask"]
        scores = self.query(h) @ enc.transpose(1, 2) / math.sqrt(h.shape[-1])
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        context = torch.softmax(scores, dim=-1) @ enc
        pooled = (h * mask.unsqueeze(-1)).sum(1) / carry["lengths"].unsqueeze(-1).to(h.dtype)
        h = h + (context + torch.tanh(self.pool(pooled)).unsqueeze(1)) * mask.unsqueeze(-1)
        return {**carry, "h": h}


class Head(nn.Module):
    def __init__(self, d: int, vocab: int, dtype: torch.dtype):
        super().__init__()
        self.out = nn.Linear(d, vocab, dtype=dtype)

    def forward(self, carry: Carry) -> Carry:
        return {"logits": self.out(carry["h"]), "mask": carry["mask"]}


class Boom(nn.Module):
    """Identity that raises on its `fail_on`-th call once armed (for the dead-stage test)."""

    def __init__(self):
        super().__init__()
        self.fail_on: int | None = None
        self.calls = 0

    def arm(self, fail_on: int) -> None:
        self.fail_on, self.calls = fail_on, 0

    def forward(self, carry: Carry) -> Carry:
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("Boom: this stage failed mid-step")
        return carry


# layer plan: enc is made on layer 2 and read on layers 6 and 8, so with 4 stages [3, 3, 2, 2]
# it passes untouched through stage 1
TOY_LAYERS = (
    "embed",
    "block",
    "remember",
    "block",
    "block",
    "block",
    "attend",
    "block",
    "attend",
    "head",
)


class ToySeq2Seq(LayeredModel):
    def __init__(
        self,
        d_in: int = 5,
        d: int = 8,
        vocab: int = 7,
        dropout: float = 0.0,
        batchnorm: bool = False,
        boom_at: int | None = None,  # replace this layer by a Boom
        dtype: torch.dtype = torch.float64,
    ):
        super().__init__()
        make = {
            "embed": lambda: Embed(d_in, d, dtype),
            "block": lambda: Block(d, dtype, dropout),
            "remember": lambda: Remember(d, dtype),
            "attend": lambda: Attend(d, dtype),
            "head": lambda: Head(d, vocab, dtype),
        }
        layers = [make[kind]() for kind in TOY_LAYERS]
        if batchnorm:
            layers[4] = Block(d, dtype, dropout, batchnorm=True)
        if boom_at is not None:
            layers[boom_at] = Boom()
        self.layers = nn.ModuleList(layers)

    def split(self, batch: Batch, chunks: int) -> list[Batch]:
        """Micro-batches, each trimmed to its own longest sequence."""
        parts = split_batch(batch, chunks)
        return [trim(mb) for mb in parts]


def trim(batch: Batch) -> Batch:
    length = int(batch["mask"].sum(1).max())
    return {k: v[:, :length] for k, v in batch.items()}


class ToyLoss:
    """Token cross-entropy summed over real tokens; normalizer: the batch's token count."""

    def __call__(self, out: Carry, micro_batch: Batch) -> torch.Tensor:
        mask = micro_batch["mask"]
        return F.cross_entropy(out["logits"][mask], micro_batch["y"][mask], reduction="sum")

    def normalizer(self, batch: Batch) -> float:
        return float(batch["mask"].sum())


def make_batches(
    steps: int,
    size: int,
    seed: int,
    d_in: int = 5,
    vocab: int = 7,
    max_len: int = 9,
    dtype: torch.dtype = torch.float64,
) -> list[Batch]:
    """Padded batches whose longest sequence differs every step (and within a step)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        width = int(torch.randint(3, max_len + 1, (), generator=gen))
        lengths = torch.randint(1, width + 1, (size,), generator=gen)
        lengths[int(torch.randint(size, (), generator=gen))] = width
        mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
        x = torch.randn(size, width, d_in, generator=gen, dtype=dtype) * mask.unsqueeze(-1)
        y = torch.randint(vocab, (size, width), generator=gen) * mask
        batches.append({"x": x, "mask": mask, "y": y})
    return batches


def replica_share(batch: Batch, replica: int, num_replicas: int) -> Batch:
    """A replica's contiguous share of a global batch, trimmed to its own longest sequence."""
    return trim({k: torch.tensor_split(v, num_replicas)[replica] for k, v in batch.items()})


def reference_run(model_kwargs: dict, batches: list[Batch], seed: int, lr: float) -> dict:
    """Plain single-process SGD on whole batches: losses, every gradient per step, final weights."""
    model = build_materialized(lambda: ToySeq2Seq(**model_kwargs), seed)
    loss_fn = ToyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses, grads = [], []
    for batch in batches:
        opt.zero_grad()
        loss = loss_fn(model(batch), batch) / loss_fn.normalizer(batch)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    return {
        "losses": losses,
        "grads": grads,
        "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
    }


def pipelined_run(engine, batches: list[Batch], lr: float) -> dict:
    """The same SGD loop driven by a PipelineEngine, recording this stage's parameters."""
    opt = torch.optim.SGD(engine.parameters(), lr=lr)
    losses, grads = [], []
    for batch in batches:
        opt.zero_grad()
        losses.append(engine.train_step(batch).item())
        grads.append({n: p.grad.clone() for n, p in engine.named_parameters()})
        opt.step()
    weights = {n: p.detach().clone() for n, p in engine.named_parameters()}
    buffers = {n: b.clone() for n, b in engine.module.named_buffers() if not b.is_meta}
    return {"losses": losses, "grads": grads, "weights": weights, "buffers": buffers}


# -- transparency grids: configurations run in one launch, compared with one process --------------

SEED, LR, STEPS, BATCH = 3, 0.5, 3, 8
ATOL, RTOL = 1e-10, 1e-8  # float64 model: only summation order differs


def config(
    balance, micro_batches, schedule, checkpoint, replicas=1, placement=None, split=True,
    virtual_stages=1, costs=None, **model,
):  # fmt: skip
    """One engine configuration of the transparency grids (the balance lists N x V parts);
    `costs`: {(rank, chunk): (F, B, W) seconds} to rebuild the schedule with (`replan`)."""
    return {
        "balance": balance, "micro_batches": micro_batches, "schedule": schedule,
        "checkpoint": checkpoint, "replicas": replicas, "placement": placement, "model": model,
        "split_backward": split, "virtual_stages": virtual_stages, "costs": costs,
        "data": {"steps": STEPS, "size": BATCH, "seed": 11},
    }  # fmt: skip


def run_configs(rank: int, world_size: int, configs: list[dict]) -> list[dict]:
    """Worker: train each configuration for STEPS steps; report this stage's numbers."""
    results = []
    for cfg in configs:
        torch.manual_seed(1234)  # the same dropout stream in every configuration
        with torch.device("meta"):
            model = ToySeq2Seq(**cfg["model"])
        if cfg.get("deferred_batch_norm"):
            DeferredBatchNorm.convert(model, cfg["micro_batches"])
        replicas = cfg["replicas"]
        chunks = cfg.get("virtual_stages", 1)
        topology = Topology(len(cfg["balance"]) // chunks, replicas, cfg["placement"])
        engine = PipelineEngine(
            model, ToyLoss(), cfg["balance"], micro_batches=cfg["micro_batches"],
            topology=topology, schedule=cfg["schedule"], checkpoint=cfg["checkpoint"], seed=SEED,
            split_backward=cfg["split_backward"], virtual_stages=chunks,
        )  # fmt: skip
        if cfg.get("costs"):
            engine.replan(MeasuredCost.of(cfg["costs"]))
        global_batches = make_batches(**cfg["data"])
        batches = [replica_share(b, engine.replica, replicas) for b in global_batches]
        result = pipelined_run(engine, batches, LR)
        result["eval_loss"] = engine.eval_step(batches[0]).item()
        out = engine.forward(batches[0])
        result["logits"] = None if out is None else out["logits"]
        result["stage"], result["replica"] = engine.stage, engine.replica
        result["meta"] = {n: p.is_meta for n, p in model.named_parameters()}
        result["layers"] = list(engine.layer_indices)
        results.append(result)
    return results


_references: dict = {}


def reference(cfg: dict) -> dict:
    key = repr((cfg["model"], cfg["data"]))
    if key not in _references:
        batches = make_batches(**cfg["data"])
        ref = reference_run(cfg["model"], batches, SEED, LR)
        model = build_materialized(lambda: ToySeq2Seq(**cfg["model"]), SEED)
        model.load_state_dict(ref["weights"], strict=False)
        with torch.no_grad():
            b0 = batches[0]
            ref["eval_loss"] = (ToyLoss()(model(b0), b0) / ToyLoss().normalizer(b0)).item()
            ref["logits"], ref["mask"] = model(b0)["logits"], b0["mask"]
        _references[key] = ref
    return _references[key]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=ATOL, rtol=RTOL)


def assert_transparent(cfg: dict, per_rank: list[dict]) -> None:
    """Every rank's losses, and every parameter's gradients and final weights, equal the
    single-process reference; together the replica-0 stages cover every parameter."""
    ref = reference(cfg)
    seen = set()
    for res in per_rank:
        where = (
            f"{cfg['schedule']}/{cfg['checkpoint']} V={cfg.get('virtual_stages', 1)} "
            f"M={cfg['micro_batches']} balance={cfg['balance']} "
            f"replicas={cfg['replicas']} stage {res['stage']} replica {res['replica']}"
        )
        assert res["losses"] == pytest.approx(ref["losses"], rel=1e-6), where
        assert res["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-6), where
        for step, grads in enumerate(res["grads"]):
            for name, grad in grads.items():
                assert close(grad, ref["grads"][step][name]), (
                    f"{where}: grad of {name} at step {step}"
                )
        for name, weight in res["weights"].items():
            assert close(weight, ref["weights"][name]), f"{where}: weight {name}"
            seen.add(name)
        if res["logits"] is not None and cfg["replicas"] == 1:
            mask = ref["mask"]  # merged micro-batches are zero-padded; compare real tokens
            assert close(res["logits"][mask], ref["logits"][mask]), f"{where}: forward output"
    assert seen == set(ref["weights"]), "some parameters were never compared"


