"""Pipeline schedules: for every rank, the ordered list of F, B, W (and fused BW) actions.

A schedule says only *what* each rank does and in which order; the engine executes it and
the communication it implies. The language (actions, chunk placement) is in
schedule_actions.py, the checks (deadlock simulation, bubble, memory, pictures) in
schedule_check.py, the list-scheduled zero-bubble schedules in zero_bubble.py; this module
holds the hand-written ones and the registry, `SCHEDULES`: the names `strategy.schedule`
accepts and the V each is defined for.

    gpipe             all forwards, then all backwards (the patent's method)       V = 1
    1f1b              one forward, one backward: at most N micro-batches held      V = 1
    interleaved_1f1b  Megatron's: V looped chunks per rank, fill 1/V as long       V >= 1
    zb_h1             zero bubble at 1F1B's memory: B first, W fills the bubble    V >= 1
    zb_h2             zero bubble at about twice 1F1B's memory                     V >= 1
    zbv               zero bubble, two chunks per rank in a V                      V = 2
    dualpipev         DeepSeek's DualPipeV: the V, each forward beside a backward  V = 2

Every schedule computes exactly the same gradients; they differ in the order of work. Pure
Python (no torch), so configs can validate names and V without importing torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from giantpipe.strategies.schedule_actions import (
    BACKWARDS,
    COSTS,
    Action,
    Phase,
    Schedule,
    StageActions,
    owner,
    virtual_stage,
)
from giantpipe.strategies.schedule_check import (
    Cost,
    bubble,
    chunks_of,
    makespan,
    peak_in_flight,
    render,
    simulate,
    validate,
)
from giantpipe.strategies.zero_bubble import POLICIES, list_schedule, measured_schedule

__all__ = [
    "BACKWARDS", "COSTS", "LIST_SCHEDULED", "SCHEDULES", "SCHEDULE_NAMES", "Action", "Cost", "Phase", "Schedule",
    "ScheduleSpec", "StageActions", "bubble", "check_schedule", "chunks_of", "forward_only_stage",
    "make_schedule", "makespan", "owner", "peak_in_flight", "render", "simulate", "split_ends",
    "stage_actions", "validate", "virtual_stage",
]  # fmt: skip


def _forwards(micro_batches: Iterable[int]) -> StageActions:
    return [Action(Phase.FORWARD, i) for i in micro_batches]


def _backwards(micro_batches: Iterable[int]) -> StageActions:
    return [Action(Phase.BACKWARD, i) for i in micro_batches]


# GPipe, 3 stages x 4 micro-batches, one clock per F, two per BW (`render(gpipe(3, 4))`):
#
#   clock      0   1   2   3   4   5   6   7   8   9  10  11  12  13  14  15  16  17
#   stage 0   F0  F1  F2  F3                         BW3   - BW2   - BW1   - BW0   -
#   stage 1       F0  F1  F2  F3             BW3   - BW2   - BW1   - BW0   -
#   stage 2           F0  F1  F2  F3 BW3   - BW2   - BW1   - BW0   -
#
# The patent's method: every stage forwards all micro-batches, then backwards them in reverse
# order. The empty triangles are the bubble, (N-1)/(M+N-1) of the time.
def gpipe_stage(stage: int, num_stages: int, micro_batches: int) -> StageActions:
    """All forwards, then all backwards in reverse micro-batch order."""
    return _forwards(range(micro_batches)) + _backwards(reversed(range(micro_batches)))


# 1F1B, 3 stages x 4 micro-batches (`render(one_f_one_b(3, 4))`):
#
#   clock      0   1   2   3   4   5   6   7   8   9  10  11  12  13  14  15  16  17
#   stage 0   F0  F1  F2                 BW0   -  F3 BW1   -     BW2   -     BW3   -
#   stage 1       F0  F1         BW0   -  F2 BW1   -  F3 BW2   -     BW3   -
#   stage 2           F0 BW0   -  F1 BW1   -  F2 BW2   -  F3 BW3   -
#
# Stage s warms up with N-1-s forwards, then alternates one forward and one backward, then
# cools down with the remaining backwards. Same bubble as GPipe, but a stage holds at most
# N-s micro-batches' activations instead of M. With M < N the warm-up covers all micro-batches.
def one_f_one_b_stage(stage: int, num_stages: int, micro_batches: int) -> StageActions:
    """Warm-up forwards, then one forward / one backward, then the remaining backwards."""
    warmup = min(num_stages - 1 - stage, micro_batches)
    actions = _forwards(range(warmup))
    for i in range(micro_batches - warmup):
        actions.append(Action(Phase.FORWARD, warmup + i))
        actions.append(Action(Phase.BACKWARD, i))
    return actions + _backwards(range(micro_batches - warmup, micro_batches))


def forward_only_stage(stage: int, num_stages: int, micro_batches: int, chunks: int = 1):
    """Evaluation and inference: forwards in micro-batch order (chunk by chunk), no backward."""
    return [Action(Phase.FORWARD, i, c) for c in range(chunks) for i in range(micro_batches)]


def split_ends(actions: StageActions) -> StageActions:
    """The first and the last backward split into B and W: W of the first runs after the
    last B, W of the last at the end (how gpipe and 1f1b take W off the fill and drain)."""
    order = [a for a in actions if a.phase is Phase.BACKWARD]
    if not order:
        return list(actions)
    ends = [order[0], order[-1]] if order[0] != order[-1] else [order[0]]
    out = [Action(Phase.INPUT, a.micro_batch, a.chunk) if a in ends else a for a in actions]
    return out + [Action(Phase.WEIGHT, a.micro_batch, a.chunk) for a in ends]


# Interleaved 1F1B (Megatron), looped, 2 ranks x 4 micro-batches x 2 chunks; a primed action
# is chunk 1 (`render(make_schedule("interleaved_1f1b", 2, 4, 2))`):
#
#   clock       0    1    2    3    4    5    6    7    8    9   10   11   12   13   14   15   16   17   18   19   20   21   22   23   24   25   26
#   stage 0    F0   F1  F0'  F1'   F2      BW0'    -   F3 BW1'    -  F2'  BW0    -  F3'  BW1    -      BW2'    -      BW3'    -  BW2    -  BW3    -
#   stage 1         F0   F1  F0' BW0'    -  F1' BW1'    -   F2  BW0    -   F3  BW1    -  F2' BW2'    -  F3' BW3'    -  BW2    -  BW3    -
#
# Each rank holds chunks r and r+N; forwards go in groups of N micro-batches, chunk 0 then
# chunk 1 (backwards: the last chunk first). After (N-r-1)·2 + (V-1)·N warm-up forwards a
# rank alternates one forward and one backward. The fill is 1/V as long as 1F1B's.
def interleaved_stage(rank: int, num_ranks: int, micro_batches: int, chunks: int) -> StageActions:
    """Megatron's interleaved 1F1B for one rank (V chunks, fused backwards)."""
    n, pairs = num_ranks, [(i, c) for c in range(chunks) for i in range(micro_batches)]
    forwards = sorted(pairs, key=lambda p: (p[0] // n, p[1], p[0]))
    backwards = sorted(pairs, key=lambda p: (p[0] // n, -p[1], p[0]))
    warmup = min((n - rank - 1) * 2 + (chunks - 1) * n, len(pairs))
    actions = [Action(Phase.FORWARD, i, c) for i, c in forwards[:warmup]]
    for (fi, fc), (bi, bc) in zip(forwards[warmup:], backwards, strict=False):
        actions += [Action(Phase.FORWARD, fi, fc), Action(Phase.BACKWARD, bi, bc)]
    done = len(forwards) - warmup
    return actions + [Action(Phase.BACKWARD, i, c) for i, c in backwards[done:]]


# DualPipeV (DeepSeek-V3's DualPipe cut to a V; torch's ScheduleDualPipeV), 2 ranks x 4
# micro-batches, rank r holds virtual stages r and 2N-1-r (primed: chunk 1;
# `render(make_schedule("dualpipev", 2, 4, 2), "vshape")`):
#
#   clock       0    1    2    3    4    5    6    7    8    9   10   11   12   13   14   15   16   17   18   19   20   21   22   23   24
#   stage 0    F0   F1   F2  F0'  B0'  W0'  F1'   F3 BW1'    -  F2'  BW0    - BW2'    -  F3'       BW1    - BW3'    -   B2   W2   B3   W3
#   stage 1         F0  F0'   F1  F1'   F2 BW0'    -  F2'  BW0    -   F3 BW1'    -  F3'  BW1    - BW2'    -  BW2    -  B3'   B3  W3'   W3
#
# Eight phases per rank, after deepseek-ai/DualPipe's dualpipev.py: chunk-0 warm-up forwards,
# forwards of both chunks, zero-bubble B/W while chunk 1 fills, then the main loop, where each
# forward of one chunk is paired with a fused backward of the other (on a GPU the pair's
# communication hides under its compute; here they run one after the other), and the drain,
# whose second half splits B from W so that the Ws fill the end. It needs M >= 2N micro-batches
# and holds 2N + 1 (micro-batch, chunk)s of half a stage at its peak, one more than zbv.
def dualpipev_stage(rank: int, num_ranks: int, micro_batches: int) -> StageActions:
    """DualPipeV's actions for one rank (chunk 0: virtual stage r, chunk 1: 2N-1-r)."""
    n, m = num_ranks, micro_batches
    F, BW, B = Phase.FORWARD, Phase.BACKWARD, Phase.INPUT
    W = (Phase.WEIGHT, None)  # the oldest deferred W, if any
    taken: dict[tuple[bool, int], int] = {}  # (forward?, chunk) -> micro-batches taken
    deferred: list[tuple[int, int]] = []  # (micro-batch, chunk)s whose W is still to run
    actions: StageActions = []

    def run(*steps: tuple[Phase, int | None]) -> None:
        for phase, chunk in steps:
            if phase is Phase.WEIGHT:
                if deferred:
                    actions.append(Action(phase, *deferred.pop(0)))
                continue
            i = taken.get((phase is F, chunk), 0)
            taken[(phase is F, chunk)] = i + 1
            actions.append(Action(phase, i, chunk))
            if phase is B:
                deferred.append((i, chunk))

    for _ in range(2 * (n - rank - 1)):  # 1: chunk 0 fills
        run((F, 0))
    for _ in range(rank + 1):  # 2: both chunks
        run((F, 0), (F, 1))
    for _ in range(n - rank - 1):  # 3: chunk 1's first backwards, each W at once
        run((B, 1), W, (F, 1))
    for _ in range(m - 2 * n + rank + 1):  # 4: each forward beside the other chunk's backward
        run((F, 0), (BW, 1), (F, 1), (BW, 0))
    for _ in range(n - rank - 1):  # 5: chunk 0's forwards are done
        run((BW, 1), (F, 1), (BW, 0))
    split = False  # 6: the drain; from its middle on, B now and W later
    for i in range(rank + 1):
        split = split or (i == (rank + 1) // 2 and rank % 2 == 1)
        run((B if split else BW, 1))
        split = split or (i == (rank + 1) // 2 and rank % 2 == 0)
        run((B if split else BW, 0))
    for _ in range(n - rank - 1):  # 7: the Ws fill the wait for chunk 0's last gradients
        run(W, (B if split else BW, 0))
    run(*[W] * len(deferred))  # 8: the rest of the Ws
    return actions


@dataclass(frozen=True)
class ScheduleSpec:
    """A schedule's name, how its chunks are placed and which V it is defined for."""

    name: str
    placement: str  # looped | vshape
    chunks: tuple[int, ...] | None  # the V it allows; None: any V >= 1
    summary: str


SCHEDULES: dict[str, ScheduleSpec] = {
    s.name: s
    for s in (
        ScheduleSpec("gpipe", "looped", (1,), "all forwards, then all backwards (the patent's)"),
        ScheduleSpec("1f1b", "looped", (1,), "one forward, one backward: at most N in flight"),
        ScheduleSpec("interleaved_1f1b", "looped", None, "Megatron's: V looped chunks per rank"),
        ScheduleSpec("zb_h1", "looped", None, "zero bubble at 1F1B's memory: B first, W fills"),
        ScheduleSpec("zb_h2", "looped", None, "zero bubble at about twice 1F1B's memory"),
        ScheduleSpec("zbv", "vshape", (2,), "zero bubble, two chunks per rank in a V"),
        ScheduleSpec("dualpipev", "vshape", (2,), "DeepSeek's DualPipeV: F beside B in a V"),
    )
}
SCHEDULE_NAMES = tuple(SCHEDULES)  # what strategy.schedule accepts (besides "auto")
LIST_SCHEDULED = frozenset(POLICIES)  # built from costs: measured ones reshape them
_STAGE_FUNCTIONS = {"gpipe": gpipe_stage, "1f1b": one_f_one_b_stage}


def check_schedule(name: str, chunks: int = 1) -> ScheduleSpec:
    """The spec of schedule `name` at V = `chunks`; ValueError naming the choices otherwise."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    spec = SCHEDULES[name]
    if chunks < 1 or (spec.chunks is not None and chunks not in spec.chunks):
        allowed = "any V >= 1" if spec.chunks is None else f"V in {list(spec.chunks)}"
        raise ValueError(
            f"schedule {name!r} is not defined for virtual_stages={chunks}: it takes {allowed}"
        )
    return spec


def make_schedule(
    name: str, num_stages: int, micro_batches: int, chunks: int = 1, cost: Cost | None = None
) -> Schedule:
    """Every rank's actions under schedule `name` with N ranks, M micro-batches, V chunks.
    `cost` (seconds per (rank, action), e.g. `schedule_auto.profile_costs`) shapes the
    list-scheduled ones (zb_h1, zb_h2, zbv); the hand-written orders do not depend on it."""
    check_schedule(name, chunks)
    if num_stages < 1:
        raise ValueError(f"num_stages must be at least 1, got {num_stages}")
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be at least 1, got {micro_batches}")
    if name in _STAGE_FUNCTIONS:
        return [_STAGE_FUNCTIONS[name](s, num_stages, micro_batches) for s in range(num_stages)]
    if name == "interleaved_1f1b":
        if chunks > 1 and micro_batches % num_stages:
            raise ValueError(
                f"interleaved_1f1b with virtual_stages={chunks} needs micro_batches to be a "
                f"multiple of the {num_stages} stages (got {micro_batches})"
            )
        return [interleaved_stage(r, num_stages, micro_batches, chunks) for r in range(num_stages)]
    if name == "dualpipev":
        if micro_batches < 2 * num_stages:
            raise ValueError(
                f"dualpipev needs micro_batches >= 2 x the {num_stages} stages (its warm-up fills "
                f"both chunks of every stage); got {micro_batches}: raise strategy.micro_batches "
                f"to {2 * num_stages} or choose zbv"
            )
        return [dualpipev_stage(r, num_stages, micro_batches) for r in range(num_stages)]
    if cost is None:
        return list_schedule(POLICIES[name], num_stages, micro_batches, chunks)
    return measured_schedule(POLICIES[name], num_stages, micro_batches, chunks, cost)


def stage_actions(name: str, stage: int, num_stages: int, micro_batches: int, chunks: int = 1):
    """The action list of one rank under the schedule called `name`."""
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} is outside 0..{num_stages - 1}")
    return make_schedule(name, num_stages, micro_batches, chunks)[stage]


def gpipe(num_stages: int, micro_batches: int) -> Schedule:
    return make_schedule("gpipe", num_stages, micro_batches)


def one_f_one_b(num_stages: int, micro_batches: int) -> Schedule:
    return make_schedule("1f1b", num_stages, micro_batches)
