"""Pipeline throughput, bubble and memory: giantpipe's engine beside torch.distributed.pipelining.

    python scripts/bench_pipeline.py                      # all models, about 15 min on 2 CPU cores
    python scripts/bench_pipeline.py --quick              # smoke run, a few minutes
    python scripts/bench_pipeline.py --models mlp --reps 7 --out /tmp/b.json
    python scripts/bench_pipeline.py --models mlp --fused-backward   # the engine unsplit

Every number is a ratio to a baseline measured in the same run, because the machine is
shared: the baseline is the plain model (whole batch, no engine) in one process with one
intra-op thread (DESIGN §3's definition), timed in every round, interleaved with the
configurations it is compared to; step times are medians over `--reps` rounds. Each process
runs one intra-op thread (CPU), so K processes use K cores. Beside it, the N=2 runs also time
the baseline with 2 threads (one process using both cores; on a host where others run, this
one suffers most). The engine runs directly (spawned processes, gloo on CPU / NCCL on GPU, a
fresh port per launch), not through Lightning, so the numbers are the engine's; for the
Lightning strategy's own cost with one stage see scripts/bench_k1_overhead.py.

Models (`--models`, all by default; definitions in bench_models.py):
  mlp    8 x Linear(1024)+ReLU, batch 1024, squared error: DESIGN §3's peer measurement
  giant  the giant net (decoder-only Transformer LM, fixed shapes)
  seq    a toy sequence model with padding masks whose batches change length every step and
         whose micro-batches are trimmed to their own longest sequence (the peer cannot run it:
         torch.distributed.pipelining freezes shapes after its first step); its ratios include
         what trimming saves against the baseline's padded whole batch
  gnmt   GNMT at the `experiment=gnmt` size (3+3 LSTM layers of 128, 1000 wordpieces, batch 64)
         on synthetic sentence pairs of varying lengths, trimmed per micro-batch like `seq`;
         M in {1, 2, 4, 8}, re-materialization never and always (no peer: shapes change)

For each model: N=1 (one process; M micro-batches = gradient accumulation, the gpipe order:
with one stage 1f1b runs the same operations) and N=2 stages, M in {1, 2, 4, 8, 16}, schedules
gpipe and 1f1b with re-materialization never, except_last and always, and the zero-bubble and
interleaved ones without (interleaved_1f1b V=2, zb_h1 V=1 and 2, zb_h2, zbv and dualpipev V=2;
with V=2 the N·V chunks balanced per rank, as the schedule places them, by parameter count
(what `strategy.balance=params` gives) or, for GNMT, by its measured layer times). For fixed-shape
models the same stages also run under `torch.distributed.pipelining`: `ScheduleGPipe`,
`Schedule1F1B`, `ScheduleInterleaved1F1B` (looped, V=2), `ScheduleInterleavedZeroBubble`
(looped, V=2), `ScheduleZBVZeroBubble` and `ScheduleDualPipeV` (V-shaped); a configuration the
peer refuses keeps its error in the JSON. After the timed rounds each giantpipe configuration
runs three steps with its timeline on (measured bubble, per-stage compute / communication
time), then one with the memory probe (peak memory).

JSON (`--out`, default bench_pipeline.json):
  meta     torch version, device, backend, cpu_count, threads_per_process (1), reps, quick,
           split_backward (the engine's; false with --fused-backward), keep_freed_memory
           (glibc keeps freed memory mapped, as in giantpipe-train: platform/allocator.py;
           every process of the run, baseline and peer included), started (ISO time),
           seconds (whole run), loadavg_start / loadavg_end (1-min load average)
  models   {name: {description, batch (first batch's shapes), layers, balance (N=2), params,
                   baseline_s (median s/step of every baseline round, 1 thread),
                   baseline_samples_per_s, baseline_threads_s (median s/step with 2 threads),
                   baseline_pair_s (median s/step of both ranks running it at once, 1 thread
                   each), two_process_ceiling (2 x baseline_s / baseline_pair_s: what two
                   independent processes reach against one, the bound for any 2-process run),
                   tokens_per_batch (mean target tokens per batch; null without tokens),
                   baseline_tokens_per_s, seconds (this model's share of the run),
                   loadavg_start / loadavg_end (while this model ran)}}
  runs     one per configuration:
           model, impl ("giantpipe" | "peer"), stages, micro_batches, schedule, virtual_stages,
           label (the tables' name: "zbv/V2"), checkpoint,
           step_s (median s/step), steps_s (every round), baseline_s (median of the baseline
           rounds interleaved with it, same processes), speedup (baseline_s / step_s),
           speedup_of_fastest (fastest baseline round / fastest round: the least disturbed
           samples, for a host others are using), baseline_threads_s (N=2: the 2-thread
           baseline interleaved with it; else null), speedup_vs_threads (baseline_threads_s /
           step_s), ideal_speedup (N*M/(M+N-1)), samples_per_s, tokens_per_s
           (tokens_per_batch / step_s; null without tokens), cpu_s (median CPU seconds per
           step, every thread, summed over ranks), baseline_cpu_s, cpu_ratio (cpu_s /
           baseline_cpu_s: the work the configuration adds, robust to a busy host),
           bubble_measured (idle / total stage-time in the instrumented step; see
           strategies/timeline.py), bubble_busiest (the idle share of the stage computing
           most: the paper's (cost - work) / cost, the partition's imbalance left out),
           bubble_theoretical (the schedule's clock simulation,
           schedule.bubble: (N-1)/(M+N-1) for gpipe and 1f1b),
           schedule_model_s ((M-1)*max_s(c_s/M) + sum_s(c_s/M) for the instrumented step's
           per-stage compute c_s: the step a schedule of whole, fused backward boxes allows
           with zero engine overhead), schedule_efficiency (schedule_model_s / the
           instrumented step's own span, median over its steps; 1.0 = the engine adds
           nothing to what that schedule implies; above 1 where the split backward beats it),
           compute_s / comm_s (per stage, instrumented step), forward_s / backward_s /
           weight_s (per stage, instrumented step: compute_s by kind; backward_s is the
           input-gradient half where the backward is split, recomputation included), peak_step_mb (per stage: peak
           memory the instrumented step added above its start, gradient buffers already
           allocated, so activations + recomputation + communication buffers; CPU: glibc heap
           bytes in use sampled after every action and recompute, CUDA: max_memory_allocated),
           memory_kind ("cpu_heap" | "cuda_allocator" | null), error (null, or why the
           configuration did not run, e.g. the peer's 1F1B refusing M < N); for
           giantpipe's 3 fastest 2-stage configurations, timed again in `reps` fresh rounds
           after the grid (the grid's best is the luckiest of many noisy medians):
           confirm_steps_s, confirm_step_s (median), confirm_speedup and
           confirm_speedup_vs_threads (against the baselines interleaved with those rounds)
  summary  per model: best_n2_speedup {speedup, schedule, micro_batches, checkpoint,
           schedule_efficiency, compute_s}, best_n2_speedup_vs_threads {speedup_vs_threads,
           schedule, micro_batches, checkpoint}, k1_engine_overhead (N=1 M=1 gpipe step /
           baseline - 1: the engine's own cost with one stage), vs_peer [{schedule,
           micro_batches, giantpipe_s, peer_s, peer_over_giantpipe}] and
           beats_peer_everywhere (same schedule), best_vs_peer_best [{micro_batches,
           giantpipe, giantpipe_s, peer, peer_s, peer_over_giantpipe}] (each side's fastest
           schedule at that M); efficiency_by_m [{micro_batches, schedule, efficiency,
           step_ratio}] (the fastest N=2 configuration's speedup over the 1-stage engine's at
           the same M, each over its own baseline rounds; step_ratio: their steps' ratio) and
           efficiency_target_met (>= 1.80 at M 4, 8, 16); threads_bound [{micro_batches,
           rank_s, shares {forward, backward, weight}, schedule, predicted_step_s,
           predicted_bubble, bound_vs_threads}] (about the most a 2-stage schedule could
           reach against the 2-thread process with balanced stages and all but compute free:
           bench_results.threads_bound) and threads_target_reachable (>= 1.0 at some M); for mlp and giant also
           target_best_n2_speedup (1.75 / 1.70), target_met and best_n2_speedup_of_fastest;
           confirmed_best {speedup, speedup_vs_threads, label, micro_batches, checkpoint,
           grid_speedup, contenders, target_met (mlp, giant)}: the fastest of the configurations
           timed again;
           bubble_m8 and bubble_busiest_m8 {zb_h1, 1f1b, 1f1b fused} (N=2, M=8: bubble_measured
           and bubble_busiest of each); for models with tokens
           tokens_per_s {single (1 process, whole batch), by_micro_batches [{micro_batches,
           n1_tokens_per_s, n1_schedule, n1_over_single, n2_tokens_per_s, n2_schedule,
           n2_over_single}]} (the faster schedule at each M, no re-materialization)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from bench_models import MODEL_NAMES, SEED, ModelSpec, make_spec
from bench_results import SCHEDULES, collect, median, print_tables, summarize
from giantpipe.models.contract import LayeredModel, build_materialized
from giantpipe.platform import timeline_plot
from giantpipe.platform.allocator import keep_freed_memory
from giantpipe.strategies import schedule_auto
from giantpipe.strategies import timeline as tl
from giantpipe.strategies.engine import PipelineEngine
from giantpipe.strategies.partition import balance_chunks, param_costs
from giantpipe.strategies.schedule import SCHEDULES as SCHEDULE_SPECS
from giantpipe.strategies.schedule import virtual_stage

MICRO_BATCHES = (1, 2, 4, 8, 16)
CONFIRM = 3  # the fastest 2-stage configurations timed again after the grid


# -- configurations and timing ----------------------------------------------------------------


@dataclass
class Options:
    """What every process needs to know about the run (picklable, for the spawned ranks)."""

    quick: bool
    reps: int
    micro_batches: tuple[int, ...] | None  # --micro-batches; None: each model's own grid
    split_backward: bool
    device_type: str

    def micro_for(self, spec: ModelSpec) -> tuple[int, ...]:
        if self.micro_batches:
            return self.micro_batches
        if self.quick:
            return (1, 4)
        return spec.micro_batches or MICRO_BATCHES


@dataclass
class Config:
    impl: str
    stages: int
    micro_batches: int
    schedule: str
    checkpoint: str
    virtual_stages: int = 1
    costs: str = "equal"  # strategy.schedule_costs: profiled rebuilds the lists at start-up
    backward: str = "split"  # fused: every backward whole (the textbook 1F1B; --fused-backward)

    @property
    def key(self) -> str:
        return (f"{self.impl}/N{self.stages}/M{self.micro_batches}/{self.schedule}"
                f"/V{self.virtual_stages}/{self.checkpoint}"
                + ("/profiled" if self.costs == "profiled" else "")
                + ("/fused" if self.backward == "fused" else ""))  # fmt: skip


# the zero-bubble and interleaved schedules, without re-materialization: (name, V)
NEW_SCHEDULES = (
    ("interleaved_1f1b", 2), ("zb_h1", 1), ("zb_h1", 2), ("zb_h2", 1), ("zbv", 2), ("dualpipev", 2),
)  # fmt: skip
# rebuilt for the F/B/W times profiled at start-up (strategy.schedule_costs=profiled): (name, V)
PROFILED_SCHEDULES = (("zb_h1", 2), ("zbv", 2))
# the peer's schedule for each (name, V) it has
PEER_SCHEDULES = {
    ("gpipe", 1): "ScheduleGPipe", ("1f1b", 1): "Schedule1F1B",
    ("interleaved_1f1b", 2): "ScheduleInterleaved1F1B",
    ("zb_h1", 2): "ScheduleInterleavedZeroBubble", ("zbv", 2): "ScheduleZBVZeroBubble",
    ("dualpipev", 2): "ScheduleDualPipeV",
}  # fmt: skip


def configs_for(spec: ModelSpec, stages: int, micro: tuple[int, ...], quick: bool = False) -> list[Config]:
    if stages == 1:  # one stage: both schedules run the same operations (M-way accumulation)
        return [Config("giantpipe", 1, m, "gpipe", "never") for m in micro]
    out = [Config("giantpipe", 2, m, s, c) for c in spec.modes for s in SCHEDULES for m in micro]
    newer = [m for m in micro if m > 1] if quick else micro  # smoke runs: the new ones at M > 1
    out += [Config("giantpipe", 2, m, s, "never", v) for s, v in NEW_SCHEDULES for m in newer]
    out += [Config("giantpipe", 2, m, s, "never", v, "profiled") for s, v in PROFILED_SCHEDULES for m in newer]
    # the textbook 1F1B (no backward split at fill and drain): what the zero-bubble paper's
    # bubbles are measured against
    out += [Config("giantpipe", 2, m, "1f1b", "never", backward="fused") for m in newer]
    if spec.peer_keys is not None:
        out += [Config("peer", 2, m, s, "never", 1) for s in SCHEDULES for m in micro]
        out += [Config("peer", 2, m, s, "never", v) for s, v in PEER_SCHEDULES if v > 1 for m in newer]
    return out


def balance_for(spec: ModelSpec, model: LayeredModel, cfg: Config) -> list[int]:
    """The spec's 2-stage balance, or, for V chunks per rank, each rank's chunks together as
    the schedule places them (`strategy.balance=params`; GNMT: its measured layer times)."""
    if cfg.virtual_stages == 1:
        return spec.balance
    placement = SCHEDULE_SPECS[cfg.schedule].placement
    costs = spec.layer_costs or param_costs(model)
    return balance_chunks(costs, cfg.stages, cfg.virtual_stages, placement)


def peer_stage_indices(schedule: str, rank: int, stages: int, chunks: int) -> list[int]:
    """The peer's stage indices on this rank, placed as giantpipe's schedule of that name places
    its chunks (looped, or in a V for zbv and dualpipev)."""
    placement = SCHEDULE_SPECS[schedule].placement
    return [virtual_stage(rank, c, stages, placement) for c in range(chunks)]


class PeerStageModule(nn.Module):
    """A stage's layers as the tensor-in, tensor-out module torch.distributed.pipelining wants."""

    def __init__(self, model: LayeredModel, indices: range, key_in: str, key_out: str):
        super().__init__()
        self.model, self.indices, self.key_in, self.key_out = model, indices, key_in, key_out

    def forward(self, x):
        return self.model.run_layers({self.key_in: x}, self.indices)[self.key_out]


def peer_loss(spec: ModelSpec):
    if spec.name == "mlp":
        return lambda out, y: (out - y).pow(2).mean()
    return lambda logits, y: F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


class Runner:
    """One configuration, ready to run steps on this rank."""

    def __init__(
        self,
        cfg: Config,
        spec: ModelSpec,
        model: LayeredModel,
        device: torch.device,
        split_backward: bool = True,
    ):
        self.cfg, self.spec, self.device = cfg, spec, device
        self.error: str | None = None
        self.engine = None
        balance = balance_for(spec, model, cfg) if cfg.stages > 1 else [len(model.layers)]
        if cfg.impl == "giantpipe":
            try:
                self.engine = PipelineEngine(
                    model, spec.loss, balance, micro_batches=cfg.micro_batches,
                    schedule=cfg.schedule, checkpoint=cfg.checkpoint, device=device, seed=SEED,
                    split_backward=split_backward and cfg.backward == "split",
                    virtual_stages=cfg.virtual_stages,
                )  # fmt: skip
            except ValueError as err:  # a schedule not defined at this M (e.g. interleaved, M=1)
                self.error, self.params = str(err).split("\n")[0], []
                return
            if cfg.costs == "profiled":  # as the Lightning strategy does (a collective)
                self.engine.replan(schedule_auto.profile_costs(self.engine, spec.batches[0]))
            self.params = list(self.engine.parameters())
            return
        self._build_peer(cfg, spec, model, balance)

    def _build_peer(self, cfg: Config, spec: ModelSpec, model: LayeredModel, balance) -> None:
        import torch.distributed.pipelining as peer
        from torch.distributed.pipelining import PipelineStage

        rank, n, parts = dist.get_rank(), cfg.stages, len(balance)
        keys = [spec.peer_keys[0], *[spec.peer_keys[1]] * (parts - 1), spec.peer_keys[-1]]
        starts = [sum(balance[:k]) for k in range(parts)]
        self.stage_ids = peer_stage_indices(cfg.schedule, rank, n, cfg.virtual_stages)
        modules = [
            PeerStageModule(model, range(starts[k], starts[k] + balance[k]), keys[k], keys[k + 1])
            for k in self.stage_ids
        ]
        stages = [PipelineStage(m, k, parts, self.device) for m, k in zip(modules, self.stage_ids, strict=True)]
        kind = getattr(peer, PEER_SCHEDULES[(cfg.schedule, cfg.virtual_stages)], None)
        try:
            if kind is None:
                raise ValueError(f"torch {torch.__version__} has no {PEER_SCHEDULES[(cfg.schedule, cfg.virtual_stages)]}")
            target = stages[0] if len(stages) == 1 else stages
            self.schedule = kind(target, cfg.micro_batches, loss_fn=peer_loss(spec))
        except Exception as err:  # the peer's rules (M < N for 1F1B, M multiples, ...)
            self.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        self.params = [p for m in modules for p in m.parameters() if not p.is_meta]
        self.first, self.last = 0 in self.stage_ids, parts - 1 in self.stage_ids

    def step(self, batch, keep_grads: bool = False) -> None:
        """One training step; gradients start as None, or allocated and zeroed (`keep_grads`,
        so that the step's added memory is activations, not gradient buffers)."""
        for p in self.params:
            if keep_grads:
                p.grad = torch.zeros_like(p) if p.grad is None else p.grad.zero_()
            else:
                p.grad = None
        if self.engine is not None:
            self.engine.train_step(batch)
            return
        x = (batch["x"] if "x" in batch else batch["tokens"]).to(self.device)
        y = (batch["y"] if "y" in batch else batch["targets"]).to(self.device)
        args = (x,) if self.first else ()
        kwargs = {"target": y, "losses": []} if self.last else {}
        self.schedule.step(*args, return_outputs=False, **kwargs)


def plain_step(model: LayeredModel, loss_fn, batch) -> None:
    """The baseline: the whole model on the whole batch in this process."""
    for p in model.parameters():
        p.grad = None
    (loss_fn(model(batch), batch) / loss_fn.normalizer(batch)).backward()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rounds(
    runners: list[Runner], baseline, spec: ModelSpec, reps: int, device, distributed: bool,
    pair: bool = True,
):
    """Interleaved rounds: the baseline, then every runner, `reps` times (after one warm-up).
    Returns {"baseline" or key: [(seconds, cpu seconds), ...]}: with `distributed`, a step's
    time is the slowest rank's, from a common start (a barrier) to its own end, and its CPU
    time (every thread of the process) is summed over ranks. With `distributed` on CPU, rank 0
    also times the baseline with as many intra-op threads as there are ranks
    ("baseline_threads": one process using every core the pipeline uses; the other ranks wait
    in a barrier meanwhile), and every rank times the baseline at once, one thread each
    ("baseline_pair": independent processes with no pipeline between them, the most any
    scheme of that many single-threaded processes can reach on this host; left out with
    `pair=False`, for rounds that only time a few configurations again)."""
    live = [r for r in runners if r.error is None]
    threads = dist.get_world_size() if distributed and device.type == "cpu" else 0
    plain = ["baseline"]
    if threads:
        plain += ["baseline_threads", "baseline_pair"] if pair else ["baseline_threads"]
    times: dict[str, list] = {**{k: [] for k in plain}, **{r.cfg.key: [] for r in live}}
    rank = dist.get_rank() if distributed else 0
    for rnd in range(reps + 1):
        batch = spec.batches[rnd % len(spec.batches)]
        order = live[rnd % max(len(live), 1) :] + live[: rnd % max(len(live), 1)]
        for runner in [*plain, *order]:
            if distributed:
                dist.barrier()
            _sync(device)
            start, cpu = time.perf_counter(), time.process_time()
            if runner == "baseline_pair":
                baseline(batch)
            elif isinstance(runner, str):
                if rank == 0:
                    torch.set_num_threads(threads if runner == "baseline_threads" else 1)
                    baseline(batch)
                    torch.set_num_threads(1)
            else:
                runner.step(batch)
            _sync(device)
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
            if distributed and (runner == "baseline_pair" or not isinstance(runner, str)):
                mine = torch.tensor([elapsed, cpu], dtype=torch.float64)
                every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
                dist.all_gather(every, mine)
                elapsed = max(t[0].item() for t in every)
                cpu = sum(t[1].item() for t in every)
            if rnd:  # round 0 warms up
                times[runner if isinstance(runner, str) else runner.cfg.key].append((elapsed, cpu))
    return times


def seconds(times: dict, key: str) -> list[float]:
    """The step times `timed_rounds` took for `key`, without their CPU times."""
    return [t for t, _ in times.get(key, [])]


def contenders(runners: list[Runner], times: dict, count: int = CONFIRM) -> list[Runner]:
    """giantpipe's `count` fastest configurations by median step: timed again in fresh rounds,
    so that the best a run reports is not only the one whose rounds ran luckiest. Every rank
    picks the same ones: a configuration's step time is the slowest rank's, gathered."""
    timed = [r for r in runners if r.cfg.impl == "giantpipe" and times.get(r.cfg.key)]
    timed.sort(key=lambda r: (median(seconds(times, r.cfg.key)), r.cfg.key))
    return timed[:count]


def instrumented(runner: Runner, spec: ModelSpec, distributed: bool, steps: int = 3) -> dict:
    """`steps` steps like the timed rounds' (at least one on each of their batches) with the
    timeline on (medians over them): bubble,
    per-stage compute and communication, the schedule's model of the step against the step's
    own span; then one step with the memory probe and gradients already allocated: the peak
    memory a step adds, activations (+ recomputation, communication buffers)."""
    engine = runner.engine
    if engine is None or not hasattr(engine, "last_timeline"):
        return {}
    engine.timeline = "time"  # no memory probe in the timed steps: it slows a fragmented heap
    gathered = []
    batches = spec.batches * -(-steps // len(spec.batches))  # every batch the timed rounds see
    for batch in batches:  # gradients start as None, as in the timed rounds
        runner.step(batch)
        gathered.append(tl.gather(engine.last_timeline) if distributed else [engine.last_timeline])
    engine.timeline = True  # then one step for its peak memory
    runner.step(spec.batches[0], keep_grads=True)
    with_memory = tl.gather(engine.last_timeline) if distributed else [engine.last_timeline]
    engine.timeline = False
    if gathered[0] is None:  # not rank 0
        return {}
    stages = [sorted(tls, key=lambda t: t.stage) for tls in gathered]
    compute = [[t.compute_s for t in tls] for tls in stages]
    comm = [[t.comm_s for t in tls] for tls in stages]
    by_kind = {  # per stage, median over the steps: the boxes' sizes for the cost model
        f"{kind}_s": [median([tls[s].total((kind,)) for tls in stages]) for s in range(len(stages[0]))]
        for kind in tl.COMPUTE_KINDS
    }
    models = [schedule_model(c, engine.micro_batches) for c in compute]
    spans = [max(t.step_s for t in tl.aligned(tls)) for tls in gathered]
    peaks = [t.peak_step_bytes for t in sorted(with_memory, key=lambda t: t.stage)]
    per_stage = list(zip(*compute, strict=True))
    return {
        "bubble_measured": median([tl.bubble_fraction(tls) for tls in gathered]),
        "bubble_busiest": median([tl.bubble_fraction(tls, busiest=True) for tls in gathered]),
        "compute_s": [median(list(c)) for c in per_stage],
        "comm_s": [median(list(c)) for c in zip(*comm, strict=True)],
        **by_kind,
        "schedule_model_s": median(models),
        "schedule_efficiency": median([m / span for m, span in zip(models, spans, strict=True)]),
        "peak_step_mb": [None if peak is None else peak / 2**20 for peak in peaks],
        "memory_kind": with_memory[0].memory_kind,
        "_timelines": gathered[-1],
    }


def schedule_model(compute_s: list[float], micro_batches: int) -> float:
    """The step time the schedule allows for these per-stage compute times, with nothing else
    in the way: micro-batch boxes of c_s / M, so (M-1) * max_s(c_s / M) + sum_s c_s / M."""
    boxes = [c / micro_batches for c in compute_s]
    return (micro_batches - 1) * max(boxes) + sum(boxes)


def measure(spec: ModelSpec, stages: int, opts: Options, device, pictures: Path | None) -> dict:
    """Run every configuration with `stages` stages in this process (rank of the world)."""
    distributed = dist.is_initialized()
    models: dict[tuple, LayeredModel] = {}  # one per layout: an engine moves others' layers to meta

    def model_for(cfg: Config) -> LayeredModel:
        vshape = SCHEDULE_SPECS[cfg.schedule].placement == "vshape"
        key = (cfg.impl == "peer", cfg.virtual_stages, vshape and cfg.virtual_stages > 1)
        if key not in models:
            models[key] = build_materialized(spec.factory, SEED, device)
        return models[key]

    runners = [
        Runner(c, spec, model_for(c), device, opts.split_backward)
        for c in configs_for(spec, stages, opts.micro_for(spec), opts.quick)
    ]
    baseline_model = build_materialized(spec.factory, SEED, device)

    def baseline(batch):
        plain_step(baseline_model, spec.loss, {k: v.to(device) for k, v in batch.items()})

    times = timed_rounds(runners, baseline, spec, opts.reps, device, distributed)
    # the grid's best is the luckiest of many noisy medians: time the contenders again
    again = contenders(runners, times) if stages > 1 else []
    confirm = timed_rounds(again, baseline, spec, opts.reps, device, distributed, pair=False) if again else {}
    rows = []
    for runner in runners:
        extra = instrumented(runner, spec, distributed) if runner.error is None else {}
        timelines = extra.pop("_timelines", None)
        cfg = runner.cfg
        if pictures and timelines and cfg.checkpoint == "never" and cfg.micro_batches == 4:
            stem = f"timeline_{spec.name}_N{cfg.stages}_{cfg.schedule}_V{cfg.virtual_stages}_M4"
            stem += "_profiled" if cfg.costs == "profiled" else ""
            timeline_plot.plot(timelines, pictures / f"{stem}.png")
            timeline_plot.write_trace(timelines, pictures / f"{stem}.trace.json")
        rows.append(
            {
                "cfg": asdict(cfg),
                "steps_s": seconds(times, cfg.key),
                "cpu_s": median([c for _, c in times.get(cfg.key, [])]),
                **({"confirm_steps_s": seconds(confirm, cfg.key)} if cfg.key in confirm else {}),
                "error": runner.error,
                **extra,
            }
        )
    return {
        "baseline_steps_s": seconds(times, "baseline"),
        "baseline_cpu_s": median([c for _, c in times["baseline"]]),
        "baseline_threads_steps_s": seconds(times, "baseline_threads"),
        "baseline_pair_steps_s": seconds(times, "baseline_pair"),
        "confirm_baseline_steps_s": seconds(confirm, "baseline"),
        "confirm_baseline_threads_steps_s": seconds(confirm, "baseline_threads"),
        "rows": rows,
    }


# -- processes ---------------------------------------------------------------------------------


def _worker(rank, world, port, names, opts: Options, out_dir, pictures):
    keep_freed_memory()
    torch.set_num_threads(1)
    cuda = opts.device_type == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", port, world, False)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))  # fmt: skip
    try:
        for name in names:
            result = measure(
                make_spec(name, opts.quick), world, opts, device, pictures if rank == 0 else None
            )
            if rank == 0:
                Path(out_dir, f"{name}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run_distributed(names: list[str], opts: Options, pictures) -> dict:
    """The N=2 measurements of every model, in one launch of two processes."""
    store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)  # a free port
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _worker, args=(2, store.port, names, opts, out_dir, pictures),
            nprocs=2, join=True, start_method="spawn",
        )  # fmt: skip
        return {name: json.loads(Path(out_dir, f"{name}.json").read_text()) for name in names}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, M in {1, 4}, 2 rounds")
    parser.add_argument("--models", default=",".join(MODEL_NAMES))
    parser.add_argument("--reps", type=int, default=None, help="timed rounds (default 5; 2 quick)")
    parser.add_argument(
        "--micro-batches", default=None, help="comma list for every model (default: 1,2,4,8,16; gnmt 1,2,4,8)"
    )  # fmt: skip
    parser.add_argument(
        "--fused-backward", action="store_true",
        help="the engine without its split backward (PipelineEngine(split_backward=False))",
    )  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.device_count() >= 2 else "cpu")
    parser.add_argument("--out", default="bench_pipeline.json")
    parser.add_argument("--pictures", default=None, help="folder for timeline PNG + trace (M=4)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    kept = keep_freed_memory()  # as giantpipe-train does: baseline, engine and peer alike
    torch.set_num_threads(1)
    opts = Options(
        quick=args.quick,
        reps=args.reps or (2 if args.quick else 5),
        micro_batches=tuple(int(m) for m in args.micro_batches.split(","))
        if args.micro_batches
        else None,
        split_backward=not args.fused_backward,
        device_type=args.device,
    )
    pictures = Path(args.pictures) if args.pictures else None
    started, clock = datetime.datetime.now().isoformat(timespec="seconds"), time.perf_counter()
    load_start = os.getloadavg()[0]
    result: dict = {"models": {}, "runs": [], "summary": {}}
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    names = args.models.split(",")
    specs = {name: make_spec(name, args.quick) for name in names}
    for name, spec in specs.items():  # one model at a time: its N=1 and N=2 runs close in time
        model_start, model_load = time.perf_counter(), os.getloadavg()[0]
        single = measure(spec, 1, opts, device, pictures)  # this process: N=1 + baseline
        double = run_distributed([name], opts, pictures)[name]
        runs, baselines = collect(spec, [single, double])
        base = baselines["baseline_s"]
        probe = spec.factory()
        result["models"][name] = {
            "description": spec.description,
            "batch": {k: list(v.shape) for k, v in spec.batches[0].items()},
            "layers": len(probe.layers), "balance": spec.balance,
            "params": sum(p.numel() for p in probe.parameters()),
            **baselines, "baseline_samples_per_s": spec.samples / base,
            "tokens_per_batch": spec.mean_tokens,
            "baseline_tokens_per_s": spec.mean_tokens / base if spec.mean_tokens else None,
            "seconds": time.perf_counter() - model_start,
            "loadavg_start": model_load, "loadavg_end": os.getloadavg()[0],
        }  # fmt: skip
        result["runs"] += runs
        result["summary"][name] = summarize(name, runs)
    result["meta"] = {
        "torch": torch.__version__, "device": args.device,
        "backend": "nccl" if args.device == "cuda" else "gloo", "cpu_count": os.cpu_count(),
        "threads_per_process": 1, "reps": opts.reps, "quick": args.quick,
        "split_backward": opts.split_backward, "keep_freed_memory": kept, "started": started,
        "seconds": time.perf_counter() - clock, "loadavg_start": load_start,
        "loadavg_end": os.getloadavg()[0],
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=1))
    print_tables(result)
    print(f"wrote {args.out} ({result['meta']['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
