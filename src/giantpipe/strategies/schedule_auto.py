"""`strategy.schedule=auto`: the schedule and V predicted fastest from a few profiled steps;
and `strategy.schedule_costs=profiled`: a list schedule rebuilt for its chunks' measured times.

The engine first runs a few steps under `zb_h1` (every backward split into B and W) with its
timeline on; each stage reports its mean F, B and W time per micro-batch and the activation
memory one micro-batch holds (the step's peak added memory over the most micro-batches it held).
Then, for every candidate (schedule, V), the schedule is simulated with those times (a chunk
of V costs 1/V of its stage; a fused BW costs B + W) and its memory predicted as the most
(micro-batch, chunk)s a stage holds times a chunk's share. Candidates whose predicted memory
exceeds `strategy.memory_budget_mb` are excluded; the fastest remaining one wins.

What the model leaves out, and so what to re-measure when two candidates are close: the
cost of messages (a V=2 schedule sends twice as many), and that layers whose weight products
cannot be deferred (fused LSTM kernels) put their weight time in B, which the profile sees
as a longer B and a shorter W. Pure Python: the choice is a function of the profiles, so every
rank that has the same profiles (all-gathered) picks the same schedule.

Profiled costs (`profile_costs`): the engine's own zb_h1, zb_h2 or zbv runs a few steps; every
rank's F, B and W per micro-batch of each chunk (a V's chunks cost what their layers cost, not
1/V of the rank) are all-reduced, and `engine.replan` rebuilds the lists for them
(`zero_bubble.measured_schedule`: kept only where the simulation says the step is shorter).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from giantpipe.strategies.schedule import (
    LIST_SCHEDULED,
    SCHEDULES,
    Action,
    Phase,
    make_schedule,
    makespan,
    peak_in_flight,
)

PROFILE_SCHEDULE = "zb_h1"  # splits every backward: F, B and W are timed apart
CANDIDATES = (
    ("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("zb_h1", 1), ("zb_h1", 2),
    ("zb_h2", 1), ("zbv", 2), ("dualpipev", 2),
)  # fmt: skip


@dataclass
class StageProfile:
    """One stage's measured cost of one micro-batch (whole stage, V=1)."""

    forward_s: float
    input_s: float  # B: the backward without the deferred weight products
    weight_s: float  # W
    activation_mb: float | None  # held from its F to its W; None: not measured


@dataclass
class Prediction:
    schedule: str
    chunks: int
    step_s: float | None = None
    bubble: float | None = None
    memory_mb: float | None = None  # the most any stage holds
    excluded: str | None = None  # why not a candidate

    @property
    def label(self) -> str:
        return self.schedule if self.chunks == 1 else f"{self.schedule} V={self.chunks}"


def predict(
    schedule: str, chunks: int, profiles: list[StageProfile], micro_batches: int
) -> Prediction:
    """The step time, bubble and activation memory of `schedule` with V=`chunks`."""
    n, out = len(profiles), Prediction(schedule, chunks)
    try:
        actions = make_schedule(schedule, n, micro_batches, chunks)
    except ValueError as err:
        out.excluded = str(err)
        return out
    placement = SCHEDULES[schedule].placement
    cost = MeasuredCost.of({
        (r, c): (p.forward_s / chunks, p.input_s / chunks, p.weight_s / chunks)
        for r, p in enumerate(profiles) for c in range(chunks)
    })  # fmt: skip
    out.step_s = makespan(actions, placement, cost)
    busy = sum(cost(r, a) for r, row in enumerate(actions) for a in row)
    out.bubble = 1.0 - busy / (n * out.step_s) if out.step_s else 0.0
    held = peak_in_flight(actions)
    if all(p.activation_mb is not None for p in profiles):
        out.memory_mb = max(h * p.activation_mb / chunks for h, p in zip(held, profiles, strict=True))
    return out


def choose(
    profiles: list[StageProfile],
    micro_batches: int,
    memory_budget_mb: float | None = None,
    max_chunks: int = 2,
) -> tuple[Prediction, list[Prediction]]:
    """The fastest predicted candidate within the memory budget, and every prediction.
    Raises ValueError when no candidate fits the budget."""
    predictions = [
        predict(s, v, profiles, micro_batches) for s, v in CANDIDATES if v <= max_chunks
    ]
    for p in predictions:
        if p.excluded is None and memory_budget_mb is not None and p.memory_mb is not None:
            if p.memory_mb > memory_budget_mb:
                p.excluded = f"{p.memory_mb:.1f} MB of activations > memory_budget_mb={memory_budget_mb:g}"
    fits = [p for p in predictions if p.excluded is None]
    if not fits:
        least = min((p for p in predictions if p.memory_mb is not None), key=lambda p: p.memory_mb)
        raise ValueError(
            f"no schedule fits strategy.memory_budget_mb={memory_budget_mb:g}: the least, "
            f"{least.label}, needs {least.memory_mb:.1f} MB per stage; raise the budget, or "
            f"use more micro-batches or re-materialization (strategy.checkpoint=always)"
        )
    return min(fits, key=lambda p: p.step_s), predictions


def explain(best: Prediction, predictions: list[Prediction]) -> str:
    """The table `auto` prints: every candidate's prediction, and why the winner won."""
    lines = ["strategy.schedule=auto: predicted from the profiled steps", ""]
    lines.append(f"  {'schedule':<22}{'step ms':>9}{'bubble':>8}{'act. MB':>9}  note")
    for p in predictions:
        step = f"{p.step_s * 1e3:9.1f}" if p.step_s is not None else f"{'-':>9}"
        bubble = f"{p.bubble:8.0%}" if p.bubble is not None else f"{'-':>8}"
        memory = f"{p.memory_mb:9.1f}" if p.memory_mb is not None else f"{'-':>9}"
        note = p.excluded or ("chosen" if p is best else "")
        lines.append(f"  {p.label:<22}{step}{bubble}{memory}  {note}")
    lines += ["", f"chose {best.label}: the fastest predicted step within the memory budget"]
    return "\n".join(lines)


@contextmanager
def _undone(engine, timeline: bool | str):
    """Run profiling steps on `engine` with its `timeline` on, then put back gradients,
    buffers (BatchNorm statistics) and RNG states, so training starts as if nothing ran."""
    import torch

    rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    buffers = [(b, b.clone()) for b in engine.module.buffers() if not b.is_meta]
    engine.timeline = timeline
    try:
        yield
    finally:
        engine.timeline = False
        for p in engine.parameters():
            p.grad = None
        with torch.no_grad():
            for buffer, value in buffers:
                buffer.copy_(value)
        torch.random.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _profiled_steps(engine, batch, steps: int, timeline: bool | str = True) -> list:
    """The timelines of `steps` training steps on `batch` but the first (a warm-up);
    `timeline="time"` leaves the memory probe out (it slows every backward)."""
    timelines = []
    with _undone(engine, timeline):
        for _ in range(steps):
            for p in engine.parameters():
                p.grad = None
            engine.train_step(batch)
            timelines.append(engine.last_timeline)
    return timelines[1:] or timelines


def profile_engine(engine, batch, steps: int = 3) -> StageProfile:
    """This stage's F, B and W seconds per micro-batch and activation MB per micro-batch,
    from `steps` training steps on `batch` (the first is a warm-up) of an engine built with
    `PROFILE_SCHEDULE`; the engine's state is put back afterwards."""
    measured = _profiled_steps(engine, batch, steps)
    count = len(measured) * engine.micro_batches * engine.virtual_stages

    def mean(kind: str) -> float:
        return sum(t.total((kind,)) for t in measured) / count

    held = peak_in_flight(make_schedule(PROFILE_SCHEDULE, engine.num_stages, engine.micro_batches))
    added = [t.peak_step_bytes for t in measured]
    activation = None
    if None not in added:
        activation = max(added) / 2**20 / max(held[engine.stage], 1)
    return StageProfile(mean("forward"), mean("backward"), mean("weight"), activation)


_TIMED = {Phase.FORWARD: "forward", Phase.INPUT: "backward", Phase.WEIGHT: "weight"}


def profile_costs(engine, batch, steps: int = 3) -> MeasuredCost:
    """Every rank's mean F, B and W seconds per micro-batch of each of its chunks, measured
    in `steps` steps (the first a warm-up, the memory probe off) of the engine's own schedule
    (a list-scheduled one: it splits every backward) and shared by all ranks (replicas of a
    stage averaged): the cost to rebuild that schedule with (`engine.replan`). A collective:
    every rank calls it; the engine's state is put back afterwards."""
    import torch
    import torch.distributed as dist

    if engine.schedule not in LIST_SCHEDULED:
        raise ValueError(f"schedule {engine.schedule!r} has a fixed order; profile a zb_h1, zb_h2 "
                         f"or zbv engine (they split every backward: W is timed apart)")  # fmt: skip
    measured = _profiled_steps(engine, batch, steps, timeline="time")
    n, v = engine.num_stages, engine.virtual_stages
    column = {kind: j for j, kind in enumerate(_TIMED.values())}
    table = torch.zeros(n, v, len(_TIMED) + 1, dtype=torch.float64)  # + the micro-batch count
    for e in (e for t in measured for e in t.events if e.kind in column):
        table[engine.stage, e.chunk, column[e.kind]] += e.duration
    table[engine.stage, :, -1] = len(measured) * engine.micro_batches
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        on = table.cuda() if dist.get_backend() == "nccl" else table
        dist.all_reduce(on)
        table = on.cpu()
    # at least a microsecond: a chunk without linear layers has next to no W
    return MeasuredCost.of({
        (r, c): tuple(max(t / table[r, c, -1].item(), 1e-6) for t in table[r, c, :-1].tolist())
        for r in range(n) for c in range(v)
    })  # fmt: skip


@dataclass(frozen=True)
class MeasuredCost:
    """Seconds per (rank, chunk, F/B/W), as a schedule `Cost`: a fused BW costs B + W."""

    seconds: dict

    @classmethod
    def of(cls, times: dict) -> MeasuredCost:
        """From {(rank, chunk): (F, B, W) seconds}."""
        return cls({(r, c, p): t for (r, c), row in times.items() for p, t in zip(_TIMED, row, strict=True)})

    def __call__(self, rank: int, action: Action) -> float:
        if action.phase is Phase.BACKWARD:
            return sum(self.seconds[(rank, action.chunk, p)] for p in (Phase.INPUT, Phase.WEIGHT))
        return self.seconds[(rank, action.chunk, action.phase)]

    def describe(self) -> str:
        """One line per rank and chunk: its F, B and W milliseconds per micro-batch."""
        keys = sorted({(r, c) for r, c, _ in self.seconds})
        return "\n".join(
            f"  stage {r} chunk {c}: " + "  ".join(
                f"{p.value} {self.seconds[(r, c, p)] * 1e3:.2f} ms" for p in _TIMED
            ) for r, c in keys
        )  # fmt: skip


def explain_costs(cost: MeasuredCost, schedule: str, num_stages: int, micro_batches: int, chunks: int) -> str:
    """What `strategy.schedule_costs=profiled` prints: the measured costs, and the step the
    simulation predicts with them for the equal-cost lists and for the rebuilt ones."""
    placement = SCHEDULES[schedule].placement
    equal = make_schedule(schedule, num_stages, micro_batches, chunks)
    measured = make_schedule(schedule, num_stages, micro_batches, chunks, cost)
    before, after = (makespan(s, placement, cost) * 1e3 for s in (equal, measured))
    verdict = (
        f"rebuilt: {after:.1f} ms predicted against {before:.1f} ms with equal costs"
        if measured != equal else f"kept the equal-cost lists ({before:.1f} ms predicted; no "
        f"order built for these times is faster)"
    )  # fmt: skip
    held = f"holds at most {max(peak_in_flight(measured))} (micro-batch, chunk)s a rank " \
           f"(equal costs: {max(peak_in_flight(equal))})"  # fmt: skip
    return (f"strategy.schedule_costs=profiled: {schedule} for F, B and W per micro-batch\n"
            f"{cost.describe()}\n{verdict}; {held}")  # fmt: skip


def gather_profiles(profile: StageProfile, stage: int, num_stages: int) -> list[StageProfile]:
    """Every stage's profile on every rank (replicas of a stage averaged): one all-gather."""
    import torch
    import torch.distributed as dist

    act = -1.0 if profile.activation_mb is None else profile.activation_mb
    mine = torch.tensor([stage, profile.forward_s, profile.input_s, profile.weight_s, act],
                        dtype=torch.float64)  # fmt: skip
    parts = [mine]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            mine = mine.cuda()
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, mine)
    rows = [p.cpu().tolist() for p in parts]
    out = []
    for s in range(num_stages):
        mine_rows = [r for r in rows if int(r[0]) == s]
        avg = [sum(r[i] for r in mine_rows) / len(mine_rows) for i in range(1, 5)]
        out.append(StageProfile(avg[0], avg[1], avg[2], None if avg[3] < 0 else avg[3]))
    return out
