"""The schedule language: actions F, B, W, BW per (micro-batch, chunk), and chunk placement.

    F   forward: receive the carry from virtual stage k-1, run, send to k+1
    B   input gradients: receive the output gradients from k+1, backward without the linear
        layers' weight products, send the input gradients to k-1
    W   the weight products B left (split_backward.py); nothing waits on them
    BW  the fused backward (B and W in one pass)

The model's layers are cut into K = N·V virtual stages (chunks); rank r holds V of them:

    looped  (Megatron's interleaving): rank r holds virtual stages r, r+N, r+2N, ...
    vshape  (ZB-V, DualPipeV; V = 2):  rank r holds virtual stages r and 2N-1-r

Costs in clocks (`COSTS`: one per F, B and W, two per BW) are the schedules' cost model, or
measured seconds per rank, chunk and phase (`strategy.schedule_costs=profiled`): layers whose
weight products cannot be deferred (fused LSTM kernels) keep them inside B, which measured
costs (schedule_auto.py) see as a longer B and a shorter W.
"""

from __future__ import annotations

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
        return f"{self.phase.value}{self.micro_batch}" + "'" * self.chunk  # primed: chunk > 0


StageActions = list[Action]
Schedule = list[StageActions]  # indexed by rank


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
