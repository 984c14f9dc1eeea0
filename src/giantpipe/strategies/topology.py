"""Who runs what: world = stages × replicas, as one validated object (like torchtitan's ParallelDims).

Default layout, pipeline-major: `rank = replica * num_stages + stage`. The ranks of one
pipeline are consecutive, so with one node (or one NVLink island) per pipeline the per-micro-
batch stage-to-stage traffic stays inside it, and only the once-per-step gradient all-reduce
between replicas of a stage crosses nodes. As a mesh it has shape (replicas, stages), dims
("dp", "pp"):

    4 stages × 2 replicas            stage 0  stage 1  stage 2  stage 3
        replica 0 (pipeline 0)          0        1        2        3
        replica 1 (pipeline 1)          4        5        6        7
    data-parallel group of stage 1: [1, 5]

An explicit `placement` lists the ranks of each stage instead: `placement[stage][replica]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from giantpipe.strategies.rules import (
    check_dims,
    check_placement,
    check_whole_pipelines,
    check_world_size,
)

if TYPE_CHECKING:  # torch is imported only to create process groups: the config check reads coords
    from torch.distributed import ProcessGroup


@dataclass(frozen=True)
class Topology:
    """The placement of `num_stages` composite layers, each replicated `num_replicas` times."""

    num_stages: int
    num_replicas: int = 1
    placement: tuple[tuple[int, ...], ...] | None = None
    _coords: dict[int, tuple[int, int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_dims(self.num_stages, self.num_replicas)
        if self.placement is not None:
            object.__setattr__(self, "placement", tuple(tuple(r) for r in self.placement))
            check_placement(self.placement, self.num_stages, self.num_replicas)
        coords = {
            self.rank_of(s, r): (s, r)
            for s in range(self.num_stages)
            for r in range(self.num_replicas)
        }
        object.__setattr__(self, "_coords", coords)

    @classmethod
    def for_world(
        cls,
        num_stages: int,
        world_size: int,
        placement: Sequence[Sequence[int]] | None = None,
    ) -> Topology:
        """The topology filling `world_size` processes with `num_stages`-stage pipelines."""
        check_whole_pipelines(num_stages, world_size)
        return cls(num_stages, world_size // num_stages, placement)

    @property
    def world_size(self) -> int:
        return self.num_stages * self.num_replicas

    def check_world_size(self, world_size: int) -> None:
        check_world_size(self.num_stages, self.num_replicas, world_size)

    def rank_of(self, stage: int, replica: int) -> int:
        if self.placement is not None:
            return self.placement[stage][replica]
        return replica * self.num_stages + stage

    def coords(self, rank: int) -> tuple[int, int]:
        """(stage, replica) of a rank."""
        try:
            return self._coords[rank]
        except KeyError:
            raise ValueError(f"rank {rank} is outside a world of {self.world_size}") from None

    def stage_of(self, rank: int) -> int:
        return self.coords(rank)[0]

    def replica_of(self, rank: int) -> int:
        return self.coords(rank)[1]

    def pipeline_ranks(self, replica: int) -> list[int]:
        """The ranks of one pipeline, stage 0 first."""
        return [self.rank_of(s, replica) for s in range(self.num_stages)]

    def stage_ranks(self, stage: int) -> list[int]:
        """The data-parallel group of a stage: its replicas, replica 0 first."""
        return [self.rank_of(stage, r) for r in range(self.num_replicas)]

    def prev_rank(self, rank: int) -> int | None:
        stage, replica = self.coords(rank)
        return self.rank_of(stage - 1, replica) if stage > 0 else None

    def next_rank(self, rank: int) -> int | None:
        stage, replica = self.coords(rank)
        return self.rank_of(stage + 1, replica) if stage < self.num_stages - 1 else None

    def mesh(self) -> list[list[int]]:
        """Ranks as a (replicas, stages) grid: dims ("dp", "pp"), e.g. for a DeviceMesh."""
        return [self.pipeline_ranks(r) for r in range(self.num_replicas)]

    def create_groups(self, rank: int, backend: str | None = None) -> PipelineGroups:
        """Create the torch.distributed subgroups and return those `rank` belongs to.

        Collective: every rank of the world must call it, and it calls `new_group` for all
        groups in the same order on every rank. Groups of one rank are not created (None).
        """
        import torch.distributed as dist

        self.check_world_size(dist.get_world_size())
        stage, replica = self.coords(rank)
        groups = PipelineGroups()
        if self.num_replicas > 1:
            for s in range(self.num_stages):
                group = dist.new_group(self.stage_ranks(s), backend=backend)
                if s == stage:
                    groups.stage = group
        if self.num_stages > 1 and self.num_replicas > 1:
            for r in range(self.num_replicas):
                group = dist.new_group(self.pipeline_ranks(r), backend=backend)
                if r == replica:
                    groups.pipeline = group
        elif self.num_stages > 1:
            groups.pipeline = dist.group.WORLD
        return groups


@dataclass
class PipelineGroups:
    """The process groups of one rank: its stage's replicas, and its pipeline."""

    stage: ProcessGroup | None = None
    pipeline: ProcessGroup | None = None
