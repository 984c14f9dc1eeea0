"""Checking schedules: the dependency simulation (deadlock), order rules, bubble and memory.

F waits for F of the previous virtual stage; B or BW for its own F and the next virtual
stage's B or BW; W for its own B. Sends never block (isend), so a schedule runs iff this graph
is acyclic. With `COSTS` clocks per action the simulation also gives the theoretical bubble
(`bubble`) and `peak_in_flight` the activation memory: the (micro-batch, chunk)s a rank holds
between F and their last backward action.
"""

from __future__ import annotations

from collections.abc import Callable

from giantpipe.strategies.schedule_actions import (
    BACKWARDS,
    COSTS,
    Action,
    Phase,
    Schedule,
    virtual_stage,
)


def chunks_of(schedule: Schedule) -> int:
    return 1 + max((a.chunk for row in schedule for a in row), default=0)


Cost = Callable[[int, Action], float]  # (rank, action) -> duration


def unit_cost(rank: int, action: Action) -> float:
    return COSTS[action.phase]


def simulate(schedule: Schedule, placement: str = "looped", cost: Cost = unit_cost) -> list[list]:
    """When each action starts, as soon as possible (`cost`: `COSTS` clocks each by default,
    or measured seconds per rank and action, as `schedule_auto` predicts step times).

    F waits for F of the previous virtual stage; B or BW for its own F and the next virtual
    stage's B or BW; W for its own B. Raises ValueError when the schedule deadlocks (a rank
    waits on work that never comes)."""
    n = len(schedule)
    stages = n * chunks_of(schedule)
    finish: dict[tuple[str, int, int], float] = {}
    starts: list[list] = [[] for _ in schedule]
    free = [0] * n  # ints with the unit cost (clock pictures), floats with seconds
    while any(len(starts[r]) < len(schedule[r]) for r in range(n)):
        progressed = False
        for r, actions in enumerate(schedule):
            while len(starts[r]) < len(actions):
                action = actions[len(starts[r])]
                k = virtual_stage(r, action.chunk, n, placement)
                deps = _dependencies(k, stages, action)
                if any(dep not in finish for dep in deps):
                    break
                start = max([free[r], *(finish[dep] for dep in deps)])
                starts[r].append(start)
                free[r] = start + cost(r, action)
                finish[(_kind(action.phase), k, action.micro_batch)] = free[r]
                progressed = True
        if not progressed:
            stuck = {
                r: str(a[len(starts[r])]) for r, a in enumerate(schedule) if len(starts[r]) < len(a)
            }
            raise ValueError(f"schedule deadlocks: stages wait forever at {stuck}")
    return starts


def _kind(phase: Phase) -> str:
    return "B" if phase in BACKWARDS else phase.value


def _dependencies(k: int, stages: int, action: Action) -> list[tuple[str, int, int]]:
    i = action.micro_batch
    if action.phase is Phase.FORWARD:
        return [("F", k - 1, i)] if k > 0 else []
    if action.phase is Phase.WEIGHT:
        return [("B", k, i)]
    deps = [("F", k, i)]
    if k < stages - 1:
        deps.append(("B", k + 1, i))
    return deps


def validate(
    schedule: Schedule, micro_batches: int, *, backward: bool = True, placement: str = "looped"
) -> None:
    """Check that every virtual stage forwards (and backwards) each micro-batch exactly once,
    with a W exactly for each split B (after it); that all virtual stages take micro-batches in
    the same order (messages on a link arrive in the order sent); and that the schedule runs
    without deadlock."""
    n = len(schedule)
    stages = n * chunks_of(schedule)
    rows: list[list[Action]] = [[] for _ in range(stages)]
    for r, actions in enumerate(schedule):
        for a in actions:
            rows[virtual_stage(r, a.chunk, n, placement)].append(a)
    expected = list(range(micro_batches))
    kinds = [("forward", {Phase.FORWARD})]
    if backward:
        kinds.append(("backward", BACKWARDS))
    for name, phases in kinds:
        orders = [[a.micro_batch for a in row if a.phase in phases] for row in rows]
        for k, order in enumerate(orders):
            if sorted(order) != expected:
                raise ValueError(f"stage {k} runs {name} on {order}, expected {expected}")
            if k and order != orders[k - 1]:
                raise ValueError(
                    f"stages {k - 1} and {k} run {name} in different orders "
                    f"({orders[k - 1]} vs {order}); carries would be matched to the wrong micro-batch"
                )
    for k, row in enumerate(rows):
        split = [a.micro_batch for a in row if a.phase is Phase.INPUT]
        weights = [a.micro_batch for a in row if a.phase is Phase.WEIGHT]
        if sorted(split) != sorted(weights):
            raise ValueError(f"stage {k} splits backwards {split} but runs W for {weights}")
    simulate(schedule, placement)
    for actions in schedule:  # a W after its own B (simulate checks only the dependency order)
        seen: set[tuple[int, int]] = set()
        for a in actions:
            if a.phase is Phase.INPUT:
                seen.add((a.micro_batch, a.chunk))
            elif a.phase is Phase.WEIGHT and (a.micro_batch, a.chunk) not in seen:
                raise ValueError(f"W{a.micro_batch} runs before its B")


def makespan(schedule: Schedule, placement: str = "looped", cost: Cost = unit_cost):
    """The step's length: the last action's end (clocks, or seconds with a measured `cost`)."""
    starts = simulate(schedule, placement, cost)
    return max(
        (t + cost(r, a) for r, (row, ts) in enumerate(zip(schedule, starts, strict=True))
         for a, t in zip(row, ts, strict=True)),
        default=0,
    )  # fmt: skip


def bubble(schedule: Schedule, placement: str = "looped") -> float:
    """The idle share of rank-time with one clock per F, B and W (two per BW)."""
    span = makespan(schedule, placement)
    busy = sum(COSTS[a.phase] for row in schedule for a in row)
    return 1.0 - busy / (len(schedule) * span) if span else 0.0


def peak_in_flight(schedule: Schedule) -> list[int]:
    """Per rank, the most (micro-batch, chunk)s held at once: from F to BW, or to W."""
    peaks = []
    for actions in schedule:
        held = peak = 0
        for a in actions:
            if a.phase is Phase.FORWARD:
                held += 1
                peak = max(peak, held)
            elif a.phase in (Phase.BACKWARD, Phase.WEIGHT):
                held -= 1
        peaks.append(peak)
    return peaks


def render(schedule: Schedule, placement: str = "looped") -> str:
    """The clock picture of a schedule: ranks × time, one box per clock (`-`: a BW's second)."""
    starts = simulate(schedule, placement)
    length = makespan(schedule, placement)
    width = max(3, *(len(str(a)) + 1 for row in schedule for a in row))
    lines = ["clock   " + "".join(f"{t:>{width}}" for t in range(length))]
    for s, (actions, times) in enumerate(zip(schedule, starts, strict=True)):
        cells = [""] * length
        for action, t in zip(actions, times, strict=True):
            cells[t] = str(action)
            for extra in range(1, COSTS[action.phase]):
                cells[t + extra] = "-"
        lines.append(f"stage {s} " + "".join(f"{c:>{width}}" for c in cells).rstrip())
    return "\n".join(lines)
