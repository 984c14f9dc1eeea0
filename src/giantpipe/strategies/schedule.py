"""Pipeline schedules: for every stage, the ordered list of forward and backward actions.

A schedule says only *what* each stage does and in which order; the engine executes it and
the communication it implies: a forward of micro-batch i on stage s receives i's carry from
stage s-1 and sends its output to s+1; a backward receives the output gradient from s+1 and
sends the input gradient to s-1. Sends never block (isend), so a schedule runs iff its
dependency graph is acyclic, which `simulate` checks.

Both schedules compute exactly the same gradients; they differ in the order of work and so
in how many micro-batches' activations a stage holds at once (GPipe: all M; 1F1B: at most
the number of stages).
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple


class Phase(str, Enum):
    FORWARD = "F"
    BACKWARD = "B"


class Action(NamedTuple):
    phase: Phase
    micro_batch: int

    def __str__(self) -> str:
        return f"{self.phase.value}{self.micro_batch}"


StageActions = list[Action]
Schedule = list[StageActions]  # indexed by stage


def _forwards(micro_batches: range) -> StageActions:
    return [Action(Phase.FORWARD, i) for i in micro_batches]


def _backwards(micro_batches) -> StageActions:
    return [Action(Phase.BACKWARD, i) for i in micro_batches]


# GPipe, 3 stages x 4 micro-batches, one clock cycle per box (`render(gpipe(3, 4))`):
#
#   clock     0  1  2  3  4  5  6  7  8  9 10 11
#   stage 0  F0 F1 F2 F3             B3 B2 B1 B0
#   stage 1     F0 F1 F2 F3       B3 B2 B1 B0
#   stage 2        F0 F1 F2 F3 B3 B2 B1 B0
#
# The patent's method: every stage forwards all micro-batches, then backwards them in reverse
# order. The empty triangles are the bubble, (N-1)/(M+N-1) of the time.
def gpipe_stage(stage: int, num_stages: int, micro_batches: int) -> StageActions:
    """All forwards, then all backwards in reverse micro-batch order."""
    return _forwards(range(micro_batches)) + _backwards(reversed(range(micro_batches)))


# 1F1B, 3 stages x 4 micro-batches (`render(one_f_one_b(3, 4))`):
#
#   clock     0  1  2  3  4  5  6  7  8  9 10 11
#   stage 0  F0 F1 F2       B0 F3 B1    B2    B3
#   stage 1     F0 F1    B0 F2 B1 F3 B2    B3
#   stage 2        F0 B0 F1 B1 F2 B2 F3 B3
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


def forward_only_stage(stage: int, num_stages: int, micro_batches: int) -> StageActions:
    """Evaluation and inference: forwards in micro-batch order, no backward."""
    return _forwards(range(micro_batches))


STAGE_SCHEDULES = {"gpipe": gpipe_stage, "1f1b": one_f_one_b_stage}


def stage_actions(name: str, stage: int, num_stages: int, micro_batches: int) -> StageActions:
    """The action list of one stage under the schedule called `name` ("gpipe" or "1f1b")."""
    if name not in STAGE_SCHEDULES:
        raise ValueError(
            f"unknown pipeline schedule {name!r}; choose one of {sorted(STAGE_SCHEDULES)}"
        )
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} is outside 0..{num_stages - 1}")
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be at least 1, got {micro_batches}")
    return STAGE_SCHEDULES[name](stage, num_stages, micro_batches)


def make_schedule(name: str, num_stages: int, micro_batches: int) -> Schedule:
    return [stage_actions(name, s, num_stages, micro_batches) for s in range(num_stages)]


def gpipe(num_stages: int, micro_batches: int) -> Schedule:
    return make_schedule("gpipe", num_stages, micro_batches)


def one_f_one_b(num_stages: int, micro_batches: int) -> Schedule:
    return make_schedule("1f1b", num_stages, micro_batches)


def simulate(schedule: Schedule) -> list[list[int]]:
    """The clock cycle at which each action starts, one cycle per action, as soon as possible.

    A forward waits for the same micro-batch's forward on the previous stage; a backward
    waits for its backward on the next stage (the last stage: for its own forward). Raises
    ValueError when the schedule deadlocks (a stage waits on work that never comes).
    """
    num_stages = len(schedule)
    finish: dict[tuple[int, Action], int] = {}
    starts: list[list[int]] = [[] for _ in schedule]
    free = [0] * num_stages
    while any(len(starts[s]) < len(schedule[s]) for s in range(num_stages)):
        progressed = False
        for s, actions in enumerate(schedule):
            while len(starts[s]) < len(actions):
                action = actions[len(starts[s])]
                deps = _dependencies(s, num_stages, action)
                if any(dep not in finish for dep in deps):
                    break
                start = max([free[s], *(finish[dep] for dep in deps)])
                starts[s].append(start)
                free[s] = finish[(s, action)] = start + 1
                progressed = True
        if not progressed:
            stuck = {
                s: str(a[len(starts[s])]) for s, a in enumerate(schedule) if len(starts[s]) < len(a)
            }
            raise ValueError(f"schedule deadlocks: stages wait forever at {stuck}")
    return starts


def _dependencies(stage: int, num_stages: int, action: Action) -> list[tuple[int, Action]]:
    i = action.micro_batch
    if action.phase is Phase.FORWARD:
        return [(stage - 1, action)] if stage > 0 else []
    deps = [(stage, Action(Phase.FORWARD, i))]
    if stage < num_stages - 1:
        deps.append((stage + 1, action))
    return deps


def validate(schedule: Schedule, micro_batches: int, *, backward: bool = True) -> None:
    """Check that every stage forwards (and backwards) each micro-batch exactly once, that
    neighbours take micro-batches in the same order (messages on a link arrive in the order
    sent), and that the whole schedule runs without deadlock."""
    expected = list(range(micro_batches))
    for phase in (Phase.FORWARD, Phase.BACKWARD) if backward else (Phase.FORWARD,):
        orders = [[a.micro_batch for a in actions if a.phase is phase] for actions in schedule]
        for s, order in enumerate(orders):
            if sorted(order) != expected:
                raise ValueError(
                    f"stage {s} runs {phase.name.lower()} on {order}, expected {expected}"
                )
            if s and order != orders[s - 1]:
                raise ValueError(
                    f"stages {s - 1} and {s} run {phase.name.lower()} in different orders "
                    f"({orders[s - 1]} vs {order}); carries would be matched to the wrong micro-batch"
                )
    simulate(schedule)


def render(schedule: Schedule) -> str:
    """The clock-cycle picture of a schedule: stages × time, one box per action."""
    starts = simulate(schedule)
    length = max((t + 1 for row in starts for t in row), default=0)
    width = max(3, *(len(str(a)) + 1 for row in schedule for a in row))
    lines = ["clock   " + "".join(f"{t:>{width}}" for t in range(length))]
    for s, (actions, times) in enumerate(zip(schedule, starts, strict=True)):
        cells = [""] * length
        for action, t in zip(actions, times, strict=True):
            cells[t] = str(action)
        lines.append(f"stage {s} " + "".join(f"{c:>{width}}" for c in cells).rstrip())
    return "\n".join(lines)
