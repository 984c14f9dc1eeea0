"""Zero-bubble schedules (Qi et al. 2024) built by list scheduling, clock by clock.

Every rank, whenever it is free, takes the best ready action under its schedule's `_Policy`:
backwards first (B: they free memory and unblock the previous stage), then forwards while the
rank holds fewer (micro-batch, chunk)s than the policy's cap, then the deferred Ws, which so
fill what would be bubble (ZB-H1 at V = 1 alternates: after a B, a ready forward goes first).
Time runs in clocks, one per F, B and W (the paper's equal costs; the pictures below), or in
measured seconds per rank, chunk and phase (`strategy.schedule_costs=profiled`), as the paper
schedules with profiled times: a V whose chunks cost unequal amounts then fills the waits
round its turn with Ws instead of idling. Pure functions: the same (N, M, V) and costs give
every rank the same lists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from giantpipe.strategies.schedule_actions import Action, Phase, Schedule, virtual_stage
from giantpipe.strategies.schedule_check import Cost, makespan, unit_cost


@dataclass(frozen=True)
class _Policy:
    """How a rank picks its next action when several are ready (one clock per F, B, W).

    Backwards come first (they free memory and unblock the previous stage), then forwards
    while the rank holds fewer than `cap(rank)` (micro-batch, chunk)s, then deferred Ws; among
    ready actions of one kind the lowest `order` key wins. At a V in `alternate_at`, a ready
    forward within the cap goes before a backward when the rank's last F/B was a backward
    (1F1B's alternation: the next stage gets its forward a clock sooner)."""

    fused: bool  # BW, or B now and W later
    cap: Callable[[int, int, int], int]  # (rank, N, V) -> most (micro-batch, chunk)s held
    forward_order: Callable[[int, int, int], tuple]  # (micro-batch, virtual stage, N) -> key
    backward_order: Callable[[int, int, int], tuple]
    placement: str = "looped"
    alternate_at: tuple[int, ...] = ()  # the V at which it alternates


def _megatron_forward(i: int, k: int, n: int) -> tuple:
    return (i // n, k, i)  # groups of N micro-batches, chunk by chunk


def _megatron_backward(i: int, k: int, n: int) -> tuple:
    return (i // n, -k, i)


def _depth_first(i: int, k: int, n: int) -> tuple:
    return (i, k)


def _late_stage_first(i: int, k: int, n: int) -> tuple:
    return (-k, i)


def list_schedule(
    policy: _Policy, num_ranks: int, micro_batches: int, chunks: int, cost: Cost = unit_cost
) -> Schedule:
    """Run every rank through time, each taking the best ready action (`_Policy`) whenever it
    is free. `cost` gives each (rank, action) its duration: one clock per F, B and W by
    default (the paper's equal costs), or measured seconds (`profile_costs`), with which the
    ranks' lists follow the real step: a slow chunk's neighbours fill its wait with Ws."""
    n, m, v = num_ranks, micro_batches, chunks
    stages = n * v
    rank_chunks = [[virtual_stage(r, c, n, policy.placement) for c in range(v)] for r in range(n)]
    ticks = _ticks(cost, n, v)
    done_f: dict[tuple[int, int], int] = {}  # (micro-batch, virtual stage) -> finish tick
    done_b: dict[tuple[int, int], int] = {}
    next_f, next_b = [0] * stages, [0] * stages
    waiting_w: list[list[tuple[int, int]]] = [[] for _ in range(n)]  # (micro-batch, chunk)
    held = [0] * n
    after_backward = [False] * n  # the rank's last F or B was a B
    free = [0] * n
    out: Schedule = [[] for _ in range(n)]
    total = sum(m * (2 if policy.fused else 3) for _ in range(stages))
    clock, emitted, stuck = 0, 0, False
    while emitted < total:
        # Stuck (every rank idle, none can act: with unequal costs the V's ranks can fill their
        # caps with micro-batches none of which reaches the loss), the oldest micro-batch not
        # yet at the loss may go over the cap; with equal costs this never happens.
        oldest = next_b[stages - 1] if stuck else -1
        picked = 0
        for r in range(n):
            if free[r] > clock:
                continue
            forward_first = v in policy.alternate_at and after_backward[r]
            action = _pick(policy, r, rank_chunks[r], clock, n, v, m, stages, done_f, done_b,
                           next_f, next_b, waiting_w[r], held[r], forward_first, oldest)  # fmt: skip
            if action is None:
                continue
            picked += 1
            k = rank_chunks[r][action.chunk]
            free[r] = clock + ticks[(r, action.chunk, action.phase)]
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
            if action.phase is not Phase.WEIGHT:
                after_backward[r] = action.phase is not Phase.FORWARD
            out[r].append(action)
            emitted += 1
        later = [t for t in free if t > clock]  # nothing changes until an action ends
        if not later and not picked and emitted < total:
            if stuck:
                raise ValueError("list scheduling made no progress: the policy's cap is too small")
            stuck = True
            continue
        stuck = False
        clock = min(later, default=clock)
    return out


def measured_schedule(policy: _Policy, num_ranks: int, micro_batches: int, chunks: int, cost: Cost):
    """The shortest, by the simulation with measured `cost`, of the equal-cost lists and the
    lists built for that cost at the policy's cap and at one (micro-batch, chunk) more per
    rank (greedy list scheduling is a heuristic: for some costs the equal-cost order is
    better; with unequal chunks a slot of room lets a V's fast chunk run ahead). The rebuilt
    lists may so hold one or two (micro-batch, chunk)s more on a rank: `peak_in_flight` tells."""
    roomier = replace(policy, cap=lambda r, n, v: policy.cap(r, n, v) + 1)
    options = [
        list_schedule(policy, num_ranks, micro_batches, chunks),
        list_schedule(policy, num_ranks, micro_batches, chunks, cost),
        list_schedule(roomier, num_ranks, micro_batches, chunks, cost),
    ]
    return min(options, key=lambda s: makespan(s, policy.placement, cost))  # ties: the first


def _ticks(cost: Cost, n: int, v: int) -> dict[tuple[int, int, Phase], int]:
    """Each (rank, chunk, phase)'s duration in whole ticks: equal costs stay one clock each;
    measured seconds become thousandths of the longest action (ties then compare exactly)."""
    seconds = {(r, c, p): cost(r, Action(p, 0, c)) for r in range(n) for c in range(v) for p in Phase}
    if any(s <= 0 for s in seconds.values()):
        raise ValueError(f"every action needs a positive cost, got {min(seconds.values())}")
    if all(float(s).is_integer() for s in seconds.values()):
        return {key: int(s) for key, s in seconds.items()}
    unit = max(seconds.values()) / 1000
    return {key: max(1, round(s / unit)) for key, s in seconds.items()}


def _pick(policy, r, chunks_k, clock, n, v, m, stages, done_f, done_b, next_f, next_b,
          waiting_w, held, forward_first=False, oldest=-1) -> Action | None:  # fmt: skip
    """The rank's next action, or None. Over the cap a forward goes only for `oldest`."""
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
    under_cap = held < policy.cap(r, n, v)
    forwards = [(key, i, c) for key, waiting, i, c in sorted(forwards)
                if not waiting and (under_cap or i == oldest)]  # fmt: skip
    can_forward = bool(forwards)
    if backwards and not (forward_first and can_forward):
        _, i, c = min(backwards)
        return Action(Phase.BACKWARD if policy.fused else Phase.INPUT, i, c)
    if can_forward:
        _, i, c = min(forwards)
        return Action(Phase.FORWARD, i, c)
    if waiting_w:
        i, c = waiting_w[0]
        return Action(Phase.WEIGHT, i, c)
    return None


# ZB-H1 (zero bubble, 1F1B's memory), 3 ranks x 4 micro-batches
# (`render(make_schedule("zb_h1", 3, 4))`):
#
#   clock     0  1  2  3  4  5  6  7  8  9 10 11 12 13
#   stage 0  F0 F1 F2       B0 W0 F3 B1 W1 B2 W2 B3 W3
#   stage 1     F0 F1 F2 B0 W0 B1 W1 F3 B2 W2 B3 W3
#   stage 2        F0 B0 F1 B1 F2 B2 W0 F3 B3 W1 W2 W3
#
# B (input gradients) goes first, but after a B a ready forward goes before the next B (1F1B's
# alternation), and W fills what would be bubble; a rank holds at most N (micro-batch, chunk)s
# from F to W, 1F1B's peak (its first stage's). The paper's bubble is N-1 clocks against
# 1F1B's 3(N-1) with F=B=W: a step of 3M + N - 1 clocks, which this list scheduling reaches.
ZB_H1 = _Policy(
    fused=False,
    cap=lambda r, n, v: v * n,
    forward_order=_megatron_forward,
    backward_order=_megatron_backward,
    alternate_at=(1,),  # with chunks, alternating was not better everywhere
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


POLICIES = {"zb_h1": ZB_H1, "zb_h2": ZB_H2, "zbv": ZBV}
