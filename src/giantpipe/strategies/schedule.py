"""Pipeline schedules: for every rank, the ordered list of F, B, W (and fused BW) actions.

A schedule says only *what* each rank does and in which order; the engine executes it and
the communication it implies. The model's layers are cut into K = N·V *virtual stages*
(chunks); rank r holds V of them, placed

    looped  (Megatron's interleaving): rank r holds virtual stages r, r+N, r+2N, ...
    vshape  (ZB-V, DualPipeV; V = 2):  rank r holds virtual stages r and 2N-1-r

An action is a phase for one (micro-batch, chunk), the chunk being the rank's local index:

    F   forward: receive the carry from virtual stage k-1, run, send to k+1
    B   input gradients: receive the output gradients from k+1, backward without the linear
        layers' weight products, send the input gradients to k-1
    W   the weight products B left (split_backward.py); nothing waits on them
    BW  the fused backward (B and W in one pass)

Sends never block (isend), so a schedule runs iff its dependency graph is acyclic, which
`simulate` checks (the engine checks its schedule when it is built). With one clock per F, B
and W (two per BW) `simulate` also gives each schedule's theoretical bubble (`bubble`) and
`peak_in_flight` its activation memory: the (micro-batch, chunk)s a rank holds between F and
their last backward action.

Every schedule computes exactly the same gradients; they differ in the order of work. This
module is pure Python (no torch), so configs can validate names and V without importing it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple


class Phase(str, Enum):
    FORWARD = "F"
    BACKWARD = "BW"  # fused: input and weight gradients in one pass
    INPUT = "B"  # input gradients only; the weight products wait for W
    WEIGHT = "W"


BACKWARDS = frozenset({Phase.BACKWARD, Phase.INPUT})  # the actions that send input gradients
COSTS = {Phase.FORWARD: 1, Phase.INPUT: 1, Phase.WEIGHT: 1, Phase.BACKWARD: 2}  # clocks


class Action(NamedTuple):
    phase: Phase
    micro_batch: int
    chunk: int = 0  # the rank's local chunk (0 .. V-1)

    def __str__(self) -> str:
        return f"{self.phase.value}{self.micro_batch}" + ("" if not self.chunk else "'" * self.chunk)


StageActions = list[Action]
Schedule = list[StageActions]  # indexed by rank


# -- placement -------------------------------------------------------------------------------


def virtual_stage(rank: int, chunk: int, num_ranks: int, placement: str = "looped") -> int:
    """The virtual stage (0 .. N·V-1) that rank `rank` holds as its local chunk `chunk`."""
    if placement == "vshape":
        return rank if chunk == 0 else 2 * num_ranks - 1 - rank
    return chunk * num_ranks + rank


def owner(stage: int, num_ranks: int, placement: str = "looped") -> tuple[int, int]:
    """(rank, local chunk) holding virtual stage `stage`: the inverse of `virtual_stage`."""
    if placement == "vshape":
        return (stage, 0) if stage < num_ranks else (2 * num_ranks - 1 - stage, 1)
    return stage % num_ranks, stage // num_ranks


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


# -- schedules generated by list scheduling ----------------------------------------------------


@dataclass(frozen=True)
class _Policy:
    """How a rank picks its next action when several are ready (one clock per F, B, W).

    Backwards come first (they free memory and unblock the previous stage), then forwards
    while the rank holds fewer than `cap(rank)` (micro-batch, chunk)s, then deferred Ws; among
    ready actions of one kind the lowest `order` key wins."""

    fused: bool  # BW, or B now and W later
    cap: Callable[[int, int, int], int]  # (rank, N, V) -> most (micro-batch, chunk)s held
    forward_order: Callable[[int, int, int], tuple]  # (micro-batch, virtual stage, N) -> key
    backward_order: Callable[[int, int, int], tuple]
    placement: str = "looped"


def _megatron_forward(i: int, k: int, n: int) -> tuple:
    return (i // n, k, i)  # groups of N micro-batches, chunk by chunk


def _megatron_backward(i: int, k: int, n: int) -> tuple:
    return (i // n, -k, i)


def _depth_first(i: int, k: int, n: int) -> tuple:
    return (i, k)


def _late_stage_first(i: int, k: int, n: int) -> tuple:
    return (-k, i)


def _list_schedule(policy: _Policy, num_ranks: int, micro_batches: int, chunks: int) -> Schedule:
    """Run every rank clock by clock, each taking the best ready action (`_Policy`)."""
    n, m, v = num_ranks, micro_batches, chunks
    stages = n * v
    rank_chunks = [[virtual_stage(r, c, n, policy.placement) for c in range(v)] for r in range(n)]
    done_f: dict[tuple[int, int], int] = {}  # (micro-batch, virtual stage) -> finish clock
    done_b: dict[tuple[int, int], int] = {}
    next_f, next_b = [0] * stages, [0] * stages
    waiting_w: list[list[tuple[int, int]]] = [[] for _ in range(n)]  # (micro-batch, chunk)
    held = [0] * n
    free = [0] * n
    out: Schedule = [[] for _ in range(n)]
    total = sum(m * (2 if policy.fused else 3) for _ in range(stages))
    clock, emitted = 0, 0
    while emitted < total:
        for r in range(n):
            if free[r] > clock:
                continue
            action = _pick(policy, r, rank_chunks[r], clock, n, v, m, stages, done_f, done_b,
                           next_f, next_b, waiting_w[r], held[r])  # fmt: skip
            if action is None:
                continue
            k = rank_chunks[r][action.chunk]
            free[r] = clock + COSTS[action.phase]
            if action.phase is Phase.FORWARD:
                done_f[(action.micro_batch, k)] = free[r]
                next_f[k] += 1
                held[r] += 1
            elif action.phase is Phase.WEIGHT:
                waiting_w[r].remove((action.micro_batch, action.chunk))
                held[r] -= 1
            else:
                done_b[(action.micro_batch, k)] = free[r]
                next_b[k] += 1
                if action.phase is Phase.INPUT:
                    waiting_w[r].append((action.micro_batch, action.chunk))
                else:
                    held[r] -= 1
            out[r].append(action)
            emitted += 1
        clock += 1
        if clock > 10 * total + 10:
            raise ValueError("list scheduling made no progress: the policy's cap is too small")
    return out


def _pick(policy, r, chunks_k, clock, n, v, m, stages, done_f, done_b, next_f, next_b,
          waiting_w, held) -> Action | None:  # fmt: skip
    backwards, forwards = [], []
    for c, k in enumerate(chunks_k):
        i = next_b[k]
        if i < m and done_f.get((i, k), clock + 1) <= clock:
            if k == stages - 1 or done_b.get((i, k + 1), clock + 1) <= clock:
                backwards.append((policy.backward_order(i, k, n), i, c))
        i = next_f[k]
        if i < m:
            ready = k == 0 or done_f.get((i, k - 1), clock + 1) <= clock
            forwards.append((policy.forward_order(i, k, n), not ready, i, c))
    forwards = [(key, i, c) for key, waiting, i, c in sorted(forwards) if not waiting]
    if backwards:
        _, i, c = min(backwards)
        return Action(Phase.BACKWARD if policy.fused else Phase.INPUT, i, c)
    if forwards and held < policy.cap(r, n, v):
        _, i, c = min(forwards)
        return Action(Phase.FORWARD, i, c)
    if waiting_w:
        i, c = waiting_w[0]
        return Action(Phase.WEIGHT, i, c)
    return None


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


# ZB-H1 (zero bubble, 1F1B's memory), 3 ranks x 4 micro-batches (`render(make_schedule("zb_h1", 3, 4))`):
#
#   clock     0  1  2  3  4  5  6  7  8  9 10 11 12 13 14
#   stage 0  F0 F1 F2       B0 W0 B1 F3 B2 W1 W2    B3 W3
#   stage 1     F0 F1 F2 B0 W0 B1 W1 B2 F3 W2    B3 W3
#   stage 2        F0 B0 F1 B1 F2 B2 W0 W1 F3 B3 W2 W3
#
# B (input gradients) goes first, W fills what would be bubble; a rank holds at most N
# (micro-batch, chunk)s from F to W, 1F1B's peak (its first stage's). The paper's bubble is
# (N-1)/3 clocks of 1F1B's 3(N-1) with F=B=W; this list scheduling gets close (see `bubble`).
ZB_H1 = _Policy(
    fused=False,
    cap=lambda r, n, v: v * n,
    forward_order=_megatron_forward,
    backward_order=_megatron_backward,
)

# ZB-H2 (zero bubble at about twice the memory), 3 ranks x 4 micro-batches
# (`render(make_schedule("zb_h2", 3, 4))`):
#
#   clock     0  1  2  3  4  5  6  7  8  9 10 11 12 13
#   stage 0  F0 F1 F2 F3    B0 W0 B1 W1 B2 W2 B3 W3
#   stage 1     F0 F1 F2 B0 F3 B1 W0 B2 W1 B3 W2 W3
#   stage 2        F0 B0 F1 B1 F2 B2 F3 B3 W0 W1 W2 W3
#
# More warm-up forwards (up to 2N (micro-batch, chunk)s held: twice ZB-H1's memory) fill the
# fill's bubble too.
ZB_H2 = _Policy(
    fused=False,
    cap=lambda r, n, v: 2 * v * n,
    forward_order=_megatron_forward,
    backward_order=_megatron_backward,
)

# ZB-V, 2 ranks x 4 micro-batches, chunks in a V (rank r holds r and 2N-1-r; primed: chunk 1;
# `render(make_schedule("zbv", 2, 4, 2), "vshape")`):
#
#   clock      0   1   2   3   4   5   6   7   8   9  10  11  12  13  14  15  16  17  18  19  20  21  22  23  24
#   stage 0   F0  F1  F2 F0' B0' W0' F1' B1'  B0 W1'  B1  F3  W0 F2' B2'  W1 W2'  B2  W2 F3' B3' W3'      B3  W3
#   stage 1       F0 F0'  F1 F1' B0'  B0 W0' B1'  B1  F2  W0 F2' W1'  F3 B2'  B2  W1 F3' W2'  W2 B3'  B3 W3'  W3
#
# The last virtual stage sits on rank 0 next to the first, so the fill and the drain meet on
# one rank; with F=B=W each rank holds 2N (micro-batch, chunk)s of half a stage: 1F1B's memory.
ZBV = _Policy(
    fused=False,
    cap=lambda r, n, v: 2 * n,
    forward_order=_depth_first,
    backward_order=_late_stage_first,
    placement="vshape",
)


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
    )
}
SCHEDULE_NAMES = tuple(SCHEDULES)  # what strategy.schedule accepts (besides "auto")
_POLICIES = {"zb_h1": ZB_H1, "zb_h2": ZB_H2, "zbv": ZBV}
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


def make_schedule(name: str, num_stages: int, micro_batches: int, chunks: int = 1) -> Schedule:
    """Every rank's actions under schedule `name` with N ranks, M micro-batches, V chunks."""
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
    return _list_schedule(_POLICIES[name], num_stages, micro_batches, chunks)


def stage_actions(name: str, stage: int, num_stages: int, micro_batches: int, chunks: int = 1):
    """The action list of one rank under the schedule called `name`."""
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} is outside 0..{num_stages - 1}")
    return make_schedule(name, num_stages, micro_batches, chunks)[stage]


def gpipe(num_stages: int, micro_batches: int) -> Schedule:
    return make_schedule("gpipe", num_stages, micro_batches)


def one_f_one_b(num_stages: int, micro_batches: int) -> Schedule:
    return make_schedule("1f1b", num_stages, micro_batches)


# -- checking -----------------------------------------------------------------------------------


def chunks_of(schedule: Schedule) -> int:
    return 1 + max((a.chunk for row in schedule for a in row), default=0)


def simulate(schedule: Schedule, placement: str = "looped") -> list[list[int]]:
    """The clock at which each action starts, as soon as possible (`COSTS` clocks each).

    F waits for F of the previous virtual stage; B or BW for its own F and the next virtual
    stage's B or BW; W for its own B. Raises ValueError when the schedule deadlocks (a rank
    waits on work that never comes)."""
    n = len(schedule)
    stages = n * chunks_of(schedule)
    finish: dict[tuple[str, int, int], int] = {}
    starts: list[list[int]] = [[] for _ in schedule]
    free = [0] * n
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
                free[r] = start + COSTS[action.phase]
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


def makespan(schedule: Schedule, placement: str = "looped") -> int:
    starts = simulate(schedule, placement)
    return max(
        (t + COSTS[a.phase] for row, ts in zip(schedule, starts, strict=True)
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
