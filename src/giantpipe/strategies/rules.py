"""The pipeline's rules and choice lists, in one torch-free place.

The engine, the partitioner, the topology and the Lightning strategy check their arguments
with these functions, and the platform's config check (`platform/config.py`) calls the same
functions before torch is imported, so a bad command line fails in about a second with the
same sentence the strategy would say later. Each function raises `ValueError` naming the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

from giantpipe.strategies import schedule as schedules

BALANCE_MODES = ("params", "time", "memory")  # automatic balance: minimize the slowest stage's cost
CHECKPOINT_MODES = ("always", "except_last", "never")  # re-materialization, as torchgpipe names them

# Typed choices for the config schemas (OmegaConf accepts a value by its member name).
# strategy.schedule: a schedule of strategies/schedule.py, or auto (profiled choice at start-up)
ScheduleName = StrEnum("ScheduleName", {n: n for n in (*schedules.SCHEDULE_NAMES, "auto")}, module=__name__)
CheckpointMode = StrEnum("CheckpointMode", {m: m for m in CHECKPOINT_MODES}, module=__name__)
# strategy.schedule_costs: the list-scheduled schedules built for one clock per F/B/W, or for
# the F/B/W times profiled at start-up
SCHEDULE_COSTS = ("equal", "profiled")
ScheduleCosts = StrEnum("ScheduleCosts", {c: c for c in SCHEDULE_COSTS}, module=__name__)


def words(choices: Sequence[str]) -> str:
    """`a, b or c`: a choice list as a sentence says it."""
    choices = [str(c) for c in choices]
    return choices[0] if len(choices) == 1 else f"{', '.join(choices[:-1])} or {choices[-1]}"


def check_dims(num_stages: int, num_replicas: int) -> None:
    if num_stages < 1 or num_replicas < 1:
        raise ValueError(
            f"need at least one stage and one replica, got num_stages={num_stages}, "
            f"num_replicas={num_replicas}"
        )


def check_world_size(num_stages: int, num_replicas: int, world_size: int) -> None:
    """stages × replicas processes, no more and no fewer."""
    if num_stages * num_replicas != world_size:
        raise ValueError(
            f"{num_stages} stages × {num_replicas} replicas need {num_stages * num_replicas} "
            f"processes, but the world has {world_size}; change the device count or the "
            f"stage/replica numbers"
        )


def check_whole_pipelines(num_stages: int, world_size: int) -> None:
    if num_stages < 1 or world_size % num_stages:
        raise ValueError(
            f"{world_size} processes cannot hold whole {num_stages}-stage pipelines: the "
            f"world size must be a multiple of the stage count (stages × replicas = devices)"
        )


def check_placement(placement: Sequence[Sequence[int]], num_stages: int, num_replicas: int) -> None:
    """An explicit placement lists each stage's ranks, every rank of the world exactly once."""
    if len(placement) != num_stages or any(len(ranks) != num_replicas for ranks in placement):
        raise ValueError(
            f"placement must list {num_replicas} rank(s) for each of the {num_stages} stages, "
            f"got {[list(r) for r in placement]}"
        )
    flat = sorted(rank for ranks in placement for rank in ranks)
    if flat != list(range(num_stages * num_replicas)):
        raise ValueError(
            f"placement must use every rank 0..{num_stages * num_replicas - 1} exactly once, got "
            f"{[list(r) for r in placement]}"
        )


def check_stage_count(num_stages: int, num_layers: int) -> None:
    """Every stage needs at least one layer."""
    if not 1 <= num_stages <= num_layers:
        raise ValueError(
            f"cannot split {num_layers} layers into {num_stages} stages: use at most "
            f"{num_layers} stages or a deeper model"
        )


def validate_balance(balance: Sequence[int], num_layers: int, num_stages: int | None = None) -> list[int]:
    """Check an explicit balance (layer counts per stage) against the model; return it as a list."""
    balance = list(balance)
    if not balance:
        raise ValueError("balance is empty: give one layer count per stage, e.g. [2, 2]")
    if num_stages is not None and len(balance) != num_stages:
        raise ValueError(
            f"balance {balance} has {len(balance)} entries but the pipeline has {num_stages} "
            f"stages: give one layer count per stage, e.g. {even_balance(num_layers, num_stages)}"
        )
    if len(balance) > num_layers:
        raise ValueError(f"cannot split {num_layers} layers into {len(balance)} stages: use at most {num_layers} stages")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in balance):
        raise ValueError(f"balance {balance} has an empty stage: every stage needs at least one layer")
    if sum(balance) != num_layers:
        raise ValueError(
            f"balance {balance} covers {sum(balance)} layers but the model has {num_layers}: "
            f"make the counts sum to {num_layers} (e.g. {even_balance(num_layers, len(balance))}), "
            f"or use automatic balance"
        )
    return balance


def check_balance(balance: str | Sequence[int], num_layers: int, num_stages: int) -> None:
    """A balance is a mode name (automatic) or an explicit list of layer counts."""
    if isinstance(balance, str):
        check_balance_mode(balance)
    else:
        validate_balance(balance, num_layers, num_stages)


def check_balance_mode(mode: str) -> None:
    if mode not in BALANCE_MODES:
        raise ValueError(
            f"unknown balance mode {mode!r}: give a list of layer counts, or {words(BALANCE_MODES)}"
        )


def check_checkpoint_mode(mode: str) -> None:
    if mode not in CHECKPOINT_MODES:
        raise ValueError(f"unknown checkpoint mode {mode!r} (re-materialization): choose {words(CHECKPOINT_MODES)}")


def check_schedule(name: str, num_stages: int, micro_batches: int, chunks: int = 1) -> None:
    """The schedule exists, takes `chunks` virtual stages per rank, and can order this many
    micro-batches over this many stages (auto chooses among those that can, at start-up)."""
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be at least 1, got {micro_batches}")
    if name == "auto":
        return
    schedules.make_schedule(str(name), num_stages, micro_batches, chunks)


def check_schedule_costs(costs: str, schedule: str) -> None:
    """Profiled costs reshape only the list-scheduled schedules (or auto's pick, if it is one)."""
    if costs not in SCHEDULE_COSTS:
        raise ValueError(f"unknown strategy.schedule_costs {costs!r}: choose {words(SCHEDULE_COSTS)}")
    if costs == "profiled" and schedule != "auto" and schedule not in schedules.LIST_SCHEDULED:
        raise ValueError(
            f"profiled costs rebuild only {words(sorted(schedules.LIST_SCHEDULED))} for measured "
            f"F/B/W times; {schedule} has a fixed order: choose one of those, or "
            f"strategy.schedule_costs=equal"
        )


def even_balance(num_layers: int, num_stages: int) -> list[int]:
    """Layer counts as even as they go, the first stages taking one more."""
    return [num_layers // num_stages + (1 if s < num_layers % num_stages else 0) for s in range(num_stages)]
