"""Pipeline throughput, bubble and memory: giantpipe's engine beside torch.distributed.pipelining.

    python scripts/bench_pipeline.py                      # all models, < 10 min on 2 CPU cores
    python scripts/bench_pipeline.py --quick              # smoke run, < 1 min
    python scripts/bench_pipeline.py --models mlp --reps 7 --out /tmp/b.json

Every number is a ratio to a baseline measured in the same run, because the machine is
shared: the baseline is the plain model (whole batch, no engine) in one process, and it is
timed in every round, interleaved with the configurations it is compared to; step times
are medians over `--reps` rounds. Each process runs one intra-op thread (CPU), so K
processes use K cores. The engine runs directly (spawned processes, gloo on CPU / NCCL on
GPU, a fresh port per launch), not through Lightning, so the numbers are the engine's.

Models (`--models`):
  mlp    8 x Linear(1024)+ReLU, batch 1024, squared error: DESIGN §3's peer measurement
  giant  the giant net (decoder-only Transformer LM, fixed shapes)
  seq    a toy sequence model with padding masks whose batches change length every step and
         whose micro-batches are trimmed to their own longest sequence (the peer cannot run it:
         torch.distributed.pipelining freezes shapes after its first step); its ratios include
         what trimming saves against the baseline's padded whole batch

For each model: N=1 (one process; M micro-batches = gradient accumulation) and N=2 stages,
M in {1, 2, 4, 8, 16}, schedules gpipe and 1f1b, re-materialization never (and, for N=2,
except_last and always), and for fixed-shape models the same stages run by
`torch.distributed.pipelining` (`PipelineStage` with `ScheduleGPipe` / `Schedule1F1B`).
After the timed rounds each giantpipe configuration runs three steps with its timeline on:
measured bubble, per-stage compute / communication time and peak memory.

JSON (`--out`, default bench_pipeline.json):
  meta     torch version, device, backend, cpu_count, threads_per_process, reps, quick,
           started (ISO time), seconds (whole run), loadavg_start / loadavg_end (1-min)
  models   {name: {description, batch (shapes), layers, balance (N=2), params,
                   baseline_s (median, s/step), baseline_samples_per_s}}
  runs     one per configuration:
           model, impl ("giantpipe" | "peer"), stages, micro_batches, schedule, checkpoint,
           step_s (median s/step), steps_s (every round), baseline_s (median of the baseline
           rounds interleaved with it, same processes), speedup (baseline_s / step_s),
           speedup_of_fastest (fastest baseline round / fastest round: the least disturbed
           samples, for a host others are using),
           ideal_speedup (N*M/(M+N-1)), samples_per_s, cpu_s (median CPU seconds per step,
           every thread, summed over ranks), baseline_cpu_s, cpu_ratio (cpu_s /
           baseline_cpu_s: the work the configuration adds, robust to a busy host),
           bubble_measured (idle / total stage-time in the instrumented step; see
           strategies/timeline.py), bubble_theoretical ((N-1)/(M+N-1)),
           schedule_model_s ((M-1)*max_s(c_s/M) + sum_s(c_s/M) for the instrumented step's
           per-stage compute c_s: the step the schedule allows with zero engine overhead),
           schedule_efficiency (schedule_model_s / the instrumented step's own span, median
           over its steps; 1.0 = the engine adds nothing to what the schedule implies),
           compute_s / comm_s (per stage, instrumented step), peak_step_mb (per stage: peak
           memory the instrumented step added above its start, gradient buffers already
           allocated, so activations + recomputation + communication buffers; CPU: glibc heap
           bytes in use sampled after every action and recompute, CUDA: max_memory_allocated),
           memory_kind,
           error (null, or why the configuration did not run)
  summary  per model: best_n2_speedup {value, schedule, micro_batches, checkpoint},
           vs_peer [{schedule, micro_batches, giantpipe_s, peer_s, peer_over_giantpipe}],
           beats_peer_everywhere; for mlp also target_best_n2_speedup (1.55), target_met and
           best_n2_speedup_of_fastest
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
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

from giantpipe.models.contract import LayeredModel, build_materialized, split_batch
from giantpipe.models.giant_net import GiantNet
from giantpipe.models.losses import TokenCrossEntropy
from giantpipe.strategies import timeline as tl
from giantpipe.strategies.engine import PipelineEngine

SEED = 0
MICRO_BATCHES = (1, 2, 4, 8, 16)
SCHEDULES = ("gpipe", "1f1b")
MODES = ("never", "except_last", "always")
MLP_TARGET = 1.55


# -- models ----------------------------------------------------------------------------------


class Dense(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, carry):
        return {"h": torch.relu(self.linear(carry["h"]))}


class MLP(LayeredModel):
    def __init__(self, width: int = 1024, depth: int = 8):
        super().__init__()
        self.layers = nn.ModuleList([Dense(width) for _ in range(depth)])

    def first_carry(self, batch):
        return {"h": batch["x"]}


class SquaredError:
    def __call__(self, out, micro_batch):
        return (out["h"] - micro_batch["y"]).pow(2).sum()

    def normalizer(self, batch):
        return float(batch["y"].numel())


class SeqEmbed(nn.Module):
    def __init__(self, d_in: int, d: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d)

    def forward(self, carry):
        mask = carry["mask"]
        return {"h": torch.tanh(self.proj(carry["x"])) * mask.unsqueeze(-1), "mask": mask}


class SeqBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ff_in, self.ff_out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, carry):
        h, mask = carry["h"], carry["mask"].unsqueeze(-1)
        return {**carry, "h": h + self.ff_out(F.gelu(self.ff_in(h))) * mask}


class SeqHead(nn.Module):
    def __init__(self, d: int, vocab: int):
        super().__init__()
        self.out = nn.Linear(d, vocab)

    def forward(self, carry):
        return {"logits": self.out(carry["h"]), "mask": carry["mask"]}


class SeqModel(LayeredModel):
    """Padded sequences + mask; `split` trims each micro-batch to its own longest sequence."""

    def __init__(self, d_in: int = 32, d: int = 256, depth: int = 6, vocab: int = 64):
        super().__init__()
        self.layers = nn.ModuleList(
            [SeqEmbed(d_in, d), *(SeqBlock(d) for _ in range(depth)), SeqHead(d, vocab)]
        )

    def split(self, batch, chunks):
        parts = split_batch(batch, chunks)
        return [{k: v[:, : int(mb["mask"].sum(1).max())] for k, v in mb.items()} for mb in parts]


class MaskedTokenLoss:
    def __call__(self, out, micro_batch):
        mask = micro_batch["mask"]
        return F.cross_entropy(out["logits"][mask], micro_batch["y"][mask], reduction="sum")

    def normalizer(self, batch):
        return float(batch["mask"].sum())


@dataclass
class ModelSpec:
    name: str
    description: str
    factory: object  # zero-argument callable building the LayeredModel
    loss: object
    batches: list  # the batches cycled through, one per step
    balance: list[int]
    peer_keys: list[str] | None  # carry key entering each stage, then the output's; None: no peer
    samples: int


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_spec(name: str, quick: bool) -> ModelSpec:
    gen = _seeded(SEED)
    if name == "mlp":
        width, batch = (256, 128) if quick else (1024, 1024)
        data = {
            "x": torch.randn(batch, width, generator=gen),
            "y": torch.randn(batch, width, generator=gen),
        }
        return ModelSpec(
            "mlp", f"8 x Linear({width})+ReLU, batch {batch}, squared error",
            lambda: MLP(width, 8), SquaredError(), [data], [4, 4], ["h", "h", "h"], batch,
        )  # fmt: skip
    if name == "giant":
        d, layers, batch, seq = (32, 2, 16, 16) if quick else (128, 6, 32, 64)
        factory = lambda: GiantNet(256, d, layers, 4, 4 * d, seq, dropout=0.0)  # noqa: E731
        tokens = torch.randint(256, (batch, seq + 1), generator=gen)
        data = {"tokens": tokens[:, :-1].contiguous(), "targets": tokens[:, 1:].contiguous()}
        half = (layers + 2) // 2
        return ModelSpec(
            "giant", f"giant net: {layers} blocks, d_model {d}, batch {batch} x {seq} tokens",
            factory, TokenCrossEntropy(), [data], [half, layers + 2 - half],
            ["tokens", "h", "logits"], batch,
        )  # fmt: skip
    if name == "seq":
        d, depth, batch, max_len = (32, 2, 16, 12) if quick else (128, 6, 64, 48)
        batches = []
        for _ in range(4):  # a different longest sequence every step
            width = int(torch.randint(max_len // 2, max_len + 1, (), generator=gen))
            lengths = torch.randint(1, width + 1, (batch,), generator=gen)
            lengths[0] = width
            mask = torch.arange(width) < lengths.unsqueeze(1)
            x = torch.randn(batch, width, 32, generator=gen) * mask.unsqueeze(-1)
            batches.append(
                {"x": x, "mask": mask, "y": torch.randint(64, (batch, width), generator=gen) * mask}
            )
        return ModelSpec(
            "seq", f"toy masked sequence model: {depth} blocks, d {d}, batch {batch}, length <= {max_len}, trimmed per micro-batch",
            lambda: SeqModel(32, d, depth, 64), MaskedTokenLoss(), batches, [(depth + 2) // 2, depth + 2 - (depth + 2) // 2], None, batch,
        )  # fmt: skip
    raise SystemExit(f"unknown model {name!r}; choose from mlp, giant, seq")


# -- configurations and timing ----------------------------------------------------------------


@dataclass
class Config:
    impl: str
    stages: int
    micro_batches: int
    schedule: str
    checkpoint: str

    @property
    def key(self) -> str:
        return f"{self.impl}/N{self.stages}/M{self.micro_batches}/{self.schedule}/{self.checkpoint}"


def configs_for(spec: ModelSpec, stages: int, micro: tuple[int, ...]) -> list[Config]:
    if stages == 1:
        return [Config("giantpipe", 1, m, s, "never") for s in SCHEDULES for m in micro]
    out = [Config("giantpipe", 2, m, s, c) for c in MODES for s in SCHEDULES for m in micro]
    if spec.peer_keys is not None:
        out += [Config("peer", 2, m, s, "never") for s in SCHEDULES for m in micro]
    return out


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

    def __init__(self, cfg: Config, spec: ModelSpec, model: LayeredModel, device: torch.device):
        self.cfg, self.spec, self.device = cfg, spec, device
        self.error: str | None = None
        self.engine = None
        if cfg.impl == "giantpipe":
            self.engine = PipelineEngine(
                model, spec.loss, spec.balance if cfg.stages > 1 else [len(model.layers)],
                micro_batches=cfg.micro_batches, schedule=cfg.schedule,
                checkpoint=cfg.checkpoint, device=device, seed=SEED,
            )  # fmt: skip
            self.params = list(self.engine.parameters())
            return
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        rank, n = dist.get_rank(), cfg.stages
        start = sum(spec.balance[:rank])
        keys = spec.peer_keys
        module = PeerStageModule(
            model, range(start, start + spec.balance[rank]), keys[rank], keys[rank + 1]
        )
        stage = PipelineStage(module, rank, n, device)
        kind = ScheduleGPipe if cfg.schedule == "gpipe" else Schedule1F1B
        try:
            self.schedule = kind(stage, cfg.micro_batches, loss_fn=peer_loss(spec))
        except ValueError as err:
            self.error = str(err).split("\n")[0]
        self.params = [p for p in module.parameters() if not p.is_meta]
        self.rank, self.n = rank, n

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
        if self.rank == 0:
            self.schedule.step(x, return_outputs=False)
        elif self.rank == self.n - 1:
            self.schedule.step(target=y, losses=[], return_outputs=False)
        else:
            self.schedule.step(return_outputs=False)


def plain_step(model: LayeredModel, loss_fn, batch) -> None:
    """The baseline: the whole model on the whole batch in this process."""
    for p in model.parameters():
        p.grad = None
    (loss_fn(model(batch), batch) / loss_fn.normalizer(batch)).backward()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rounds(
    runners: list[Runner], baseline, spec: ModelSpec, reps: int, device, distributed: bool
):
    """Interleaved rounds: the baseline, then every runner, `reps` times (after one warm-up).
    Returns {"baseline" or key: [(seconds, cpu seconds), ...]}: with `distributed`, a step's
    time is the slowest rank's, from a common start (a barrier) to its own end, and its CPU
    time (every thread of the process) is summed over ranks."""
    live = [r for r in runners if r.error is None]
    times: dict[str, list] = {"baseline": [], **{r.cfg.key: [] for r in live}}
    rank = dist.get_rank() if distributed else 0
    for rnd in range(reps + 1):
        batch = spec.batches[rnd % len(spec.batches)]
        order = live[rnd % max(len(live), 1) :] + live[: rnd % max(len(live), 1)]
        for runner in [None, *order]:
            if distributed:
                dist.barrier()
            _sync(device)
            start, cpu = time.perf_counter(), time.process_time()
            if runner is None:
                if rank == 0:
                    baseline(batch)
            else:
                runner.step(batch)
            _sync(device)
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
            if distributed and runner is not None:
                mine = torch.tensor([elapsed, cpu], dtype=torch.float64)
                every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
                dist.all_gather(every, mine)
                elapsed = max(t[0].item() for t in every)
                cpu = sum(t[1].item() for t in every)
            if rnd:  # round 0 warms up
                times["baseline" if runner is None else runner.cfg.key].append((elapsed, cpu))
    return times


def instrumented(runner: Runner, spec: ModelSpec, distributed: bool, steps: int = 3) -> dict:
    """`steps` steps with the timeline on (medians over them): bubble, per-stage compute and
    communication, the schedule's model of the step against the step's own span, and the peak
    memory a step adds with gradients already allocated: activations (+ recomputation,
    communication buffers)."""
    engine = runner.engine
    if engine is None or not hasattr(engine, "last_timeline"):
        return {}
    engine.timeline = True
    gathered = []
    for _ in range(steps):
        runner.step(spec.batches[0], keep_grads=True)
        gathered.append(tl.gather(engine.last_timeline) if distributed else [engine.last_timeline])
    engine.timeline = False
    if gathered[0] is None:  # not rank 0
        return {}
    stages = [sorted(tls, key=lambda t: t.stage) for tls in gathered]
    compute = [[t.compute_s for t in tls] for tls in stages]
    comm = [[t.comm_s for t in tls] for tls in stages]
    models = [schedule_model(c, engine.micro_batches) for c in compute]
    spans = [max(t.step_s for t in tl.aligned(tls)) for tls in gathered]
    peaks = [[t.peak_step_bytes for t in tls] for tls in stages]
    per_stage = list(zip(*compute, strict=True))
    return {
        "bubble_measured": _median([tl.bubble_fraction(tls) for tls in gathered]),
        "compute_s": [_median(list(c)) for c in per_stage],
        "comm_s": [_median(list(c)) for c in zip(*comm, strict=True)],
        "schedule_model_s": _median(models),
        "schedule_efficiency": _median([m / span for m, span in zip(models, spans, strict=True)]),
        "peak_step_mb": [
            None if None in column else max(column) / 2**20 for column in zip(*peaks, strict=True)
        ],
        "memory_kind": stages[0][0].memory_kind,
        "_timelines": gathered[-1],
    }


def schedule_model(compute_s: list[float], micro_batches: int) -> float:
    """The step time the schedule allows for these per-stage compute times, with nothing else
    in the way: micro-batch boxes of c_s / M, so (M-1) * max_s(c_s / M) + sum_s c_s / M."""
    boxes = [c / micro_batches for c in compute_s]
    return (micro_batches - 1) * max(boxes) + sum(boxes)


def measure(
    spec: ModelSpec, stages: int, micro: tuple[int, ...], reps: int, device, pictures: Path | None
) -> dict:
    """Run every configuration with `stages` stages in this process (rank of the world)."""
    distributed = dist.is_initialized()
    model = build_materialized(spec.factory, SEED, device)  # shared by every engine here
    baseline_model = model if not distributed else build_materialized(spec.factory, SEED, device)
    runners = [Runner(c, spec, model, device) for c in configs_for(spec, stages, micro)]

    def baseline(batch):
        plain_step(baseline_model, spec.loss, {k: v.to(device) for k, v in batch.items()})

    times = timed_rounds(runners, baseline, spec, reps, device, distributed)
    rows = []
    for runner in runners:
        extra = instrumented(runner, spec, distributed) if runner.error is None else {}
        timelines = extra.pop("_timelines", None)
        cfg = runner.cfg
        if pictures and timelines and cfg.checkpoint == "never" and cfg.micro_batches == 4:
            stem = f"timeline_{spec.name}_N{cfg.stages}_{cfg.schedule}_M4"
            tl.plot(timelines, pictures / f"{stem}.png")
            tl.write_trace(timelines, pictures / f"{stem}.trace.json")
        measured = times.get(cfg.key, [])
        rows.append(
            {
                "cfg": asdict(cfg),
                "steps_s": [t for t, _ in measured],
                "cpu_s": _median([c for _, c in measured]),
                "error": runner.error,
                **extra,
            }
        )
    base = times["baseline"]
    return {
        "baseline_steps_s": [t for t, _ in base],
        "baseline_cpu_s": _median([c for _, c in base]),
        "rows": rows,
    }


# -- processes ---------------------------------------------------------------------------------


def _worker(rank, world, port, names, quick, micro, reps, device_type, out_dir, pictures):
    torch.set_num_threads(1)
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", port, world, False)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))  # fmt: skip
    try:
        for name in names:
            result = measure(
                make_spec(name, quick), world, micro, reps, device, pictures if rank == 0 else None
            )
            if rank == 0:
                Path(out_dir, f"{name}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run_distributed(
    names: list[str], quick: bool, micro, reps: int, device_type: str, pictures
) -> dict:
    """The N=2 measurements of every model, in one launch of two processes."""
    store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)  # a free port
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _worker, args=(2, store.port, names, quick, micro, reps, device_type, out_dir, pictures),
            nprocs=2, join=True, start_method="spawn",
        )  # fmt: skip
        return {name: json.loads(Path(out_dir, f"{name}.json").read_text()) for name in names}


# -- results -----------------------------------------------------------------------------------


def _median(xs):
    return statistics.median(xs) if xs else None


def collect(spec: ModelSpec, parts: list[dict]) -> tuple[list[dict], float]:
    runs = []
    all_base = []
    for part in parts:
        base = _median(part["baseline_steps_s"])
        base_min = min(part["baseline_steps_s"], default=None)
        base_cpu = part["baseline_cpu_s"]
        all_base += part["baseline_steps_s"]
        for row in part["rows"]:
            cfg = row.pop("cfg")
            n, m = cfg["stages"], cfg["micro_batches"]
            steps = row.pop("steps_s")
            step = _median(steps)
            runs.append({
                "model": spec.name, **cfg, "step_s": step, "steps_s": steps,
                "baseline_s": base, "speedup": base / step if step else None,
                "speedup_of_fastest": base_min / min(steps) if step else None,
                "ideal_speedup": n * m / (m + n - 1),
                "samples_per_s": spec.samples / step if step else None,
                "baseline_cpu_s": base_cpu,
                "cpu_ratio": row["cpu_s"] / base_cpu if row.get("cpu_s") and base_cpu else None,
                "bubble_theoretical": tl.theoretical_bubble(n, m), **row,
            })  # fmt: skip
    return runs, _median(all_base)


def summarize(name: str, runs: list[dict]) -> dict:
    mine = [r for r in runs if r["model"] == name and r["step_s"]]
    n2 = [r for r in mine if r["impl"] == "giantpipe" and r["stages"] == 2]
    best = max(n2, key=lambda r: r["speedup"], default=None)
    out: dict = {}
    if best:
        out["best_n2_speedup"] = {
            k: best[k] for k in ("speedup", "schedule", "micro_batches", "checkpoint")
        }
    vs = []
    for peer in (r for r in mine if r["impl"] == "peer"):
        ours = next((r for r in n2 if r["checkpoint"] == "never" and r["schedule"] == peer["schedule"]
                     and r["micro_batches"] == peer["micro_batches"]), None)  # fmt: skip
        if ours:
            vs.append({"schedule": peer["schedule"], "micro_batches": peer["micro_batches"],
                       "giantpipe_s": ours["step_s"], "peer_s": peer["step_s"],
                       "peer_over_giantpipe": peer["step_s"] / ours["step_s"]})  # fmt: skip
    if vs:
        out["vs_peer"] = vs
        out["beats_peer_everywhere"] = all(v["peer_over_giantpipe"] >= 1.0 for v in vs)
    if name == "mlp" and best:
        out["target_best_n2_speedup"] = MLP_TARGET
        out["target_met"] = best["speedup"] >= MLP_TARGET
        fastest = max(n2, key=lambda r: r["speedup_of_fastest"])
        out["best_n2_speedup_of_fastest"] = {
            k: fastest[k] for k in ("speedup_of_fastest", "schedule", "micro_batches", "checkpoint")
        }
    if best and best.get("schedule_efficiency"):
        out["best_n2_speedup"]["schedule_efficiency"] = best["schedule_efficiency"]
        out["best_n2_speedup"]["compute_s"] = best["compute_s"]
    return out


def print_tables(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 150))
    for name, model in result["models"].items():
        runs = [r for r in result["runs"] if r["model"] == name]
        micro = sorted({r["micro_batches"] for r in runs})
        table = Table(title=f"{name}: {model['description']} - speedup over 1 process "
                      f"({model['baseline_s'] * 1e3:.0f} ms/step); bubble measured/theory")  # fmt: skip
        for col in ("impl", "N", "schedule", "remat"):
            table.add_column(col)
        for m in micro:
            table.add_column(f"M={m}", justify="right")
        groups: dict = {}
        for r in runs:
            groups.setdefault((r["impl"], r["stages"], r["schedule"], r["checkpoint"]), {})[
                r["micro_batches"]
            ] = r
        for (impl, n, sched, mode), by_m in groups.items():
            cells = []
            for m in micro:
                r = by_m.get(m)
                if r is None or not r["step_s"]:
                    cells.append("n/a")
                    continue
                cell = f"{r['speedup']:.2f}x"
                if r.get("bubble_measured") is not None and n > 1:
                    cell += f" {r['bubble_measured']:.0%}/{r['bubble_theoretical']:.0%}"
                cells.append(cell)
            table.add_row(impl, str(n), sched, mode, *cells)
        console.print(table)
        mem = Table(title=f"{name}: peak activation memory, MB (stage 0 / stage 1), N=2")
        mem.add_column("schedule")
        mem.add_column("remat")
        for m in micro:
            mem.add_column(f"M={m}", justify="right")
        for sched in SCHEDULES:
            for mode in MODES:
                cells = []
                for m in micro:
                    r = next((r for r in runs if (r["impl"], r["stages"], r["schedule"], r["checkpoint"], r["micro_batches"])
                              == ("giantpipe", 2, sched, mode, m)), None)  # fmt: skip
                    peaks = (r or {}).get("peak_step_mb")
                    ok = peaks and None not in peaks
                    cells.append("/".join(f"{p:.1f}" for p in peaks) if ok else "n/a")
                mem.add_row(sched, mode, *cells)
        console.print(mem)
        summary = result["summary"].get(name, {})
        if "best_n2_speedup" in summary:
            b = summary["best_n2_speedup"]
            line = f"{name}: best N=2 speedup {b['speedup']:.2f}x ({b['schedule']}, M={b['micro_batches']}, {b['checkpoint']})"
            if "schedule_efficiency" in b:
                compute = "/".join(f"{c * 1e3:.0f}" for c in b["compute_s"])
                line += (f"; stage compute {compute} ms, the schedule allows"
                         f" {b['schedule_efficiency']:.0%} of the measured step time")  # fmt: skip
            if "target_met" in summary:
                line += f"; target {MLP_TARGET}x {'met' if summary['target_met'] else 'NOT met'}"
                f = summary["best_n2_speedup_of_fastest"]
                line += (f" (fastest rounds: {f['speedup_of_fastest']:.2f}x, {f['schedule']},"
                         f" M={f['micro_batches']})")  # fmt: skip
            if "beats_peer_everywhere" in summary:
                worst = min(summary["vs_peer"], key=lambda v: v["peer_over_giantpipe"])
                line += (f"; vs peer: {'faster or equal everywhere' if summary['beats_peer_everywhere'] else 'slower somewhere'}"
                         f" (closest: {worst['schedule']} M={worst['micro_batches']}, peer/giantpipe time {worst['peer_over_giantpipe']:.2f})")  # fmt: skip
            console.print(line)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, M in {1, 4}, 2 rounds")
    parser.add_argument("--models", default="mlp,giant,seq")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds (default 5; 2 quick)")
    parser.add_argument("--micro-batches", default=None, help="comma list (default 1,2,4,8,16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.device_count() >= 2 else "cpu")
    parser.add_argument("--out", default="bench_pipeline.json")
    parser.add_argument("--pictures", default=None, help="folder for timeline PNG + trace (M=4)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    reps = args.reps or (2 if args.quick else 5)
    micro = tuple(int(m) for m in args.micro_batches.split(",")) if args.micro_batches else (
        (1, 4) if args.quick else MICRO_BATCHES)  # fmt: skip
    pictures = Path(args.pictures) if args.pictures else None
    started, clock = datetime.datetime.now().isoformat(timespec="seconds"), time.perf_counter()
    load_start = os.getloadavg()[0]
    result: dict = {"models": {}, "runs": [], "summary": {}}
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    names = args.models.split(",")
    specs = {name: make_spec(name, args.quick) for name in names}
    for name, spec in specs.items():  # one model at a time: its N=1 and N=2 runs close in time
        single = measure(spec, 1, micro, reps, device, pictures)  # this process: N=1 + baseline
        double = run_distributed([name], args.quick, micro, reps, args.device, pictures)[name]
        runs, base = collect(spec, [single, double])
        probe = spec.factory()
        result["models"][name] = {
            "description": spec.description,
            "batch": {k: list(v.shape) for k, v in spec.batches[0].items()},
            "layers": len(probe.layers), "balance": spec.balance,
            "params": sum(p.numel() for p in probe.parameters()),
            "baseline_s": base, "baseline_samples_per_s": spec.samples / base,
        }  # fmt: skip
        result["runs"] += runs
        result["summary"][name] = summarize(name, runs)
    result["meta"] = {
        "torch": torch.__version__, "device": args.device,
        "backend": "nccl" if args.device == "cuda" else "gloo", "cpu_count": os.cpu_count(),
        "threads_per_process": 1, "reps": reps, "quick": args.quick, "started": started,
        "seconds": time.perf_counter() - clock, "loadavg_start": load_start,
        "loadavg_end": os.getloadavg()[0],
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=1))
    print_tables(result)
    print(f"wrote {args.out} ({result['meta']['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
