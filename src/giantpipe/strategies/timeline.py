"""What each stage did when: the pipeline's timeline and its bubble (the engine only records).

The engine always holds a recorder: a `TimelineRecorder` when asked
(`PipelineEngine(timeline=True)` or `engine.timeline = True`), else the `NULL_RECORDER`,
whose spans are one shared no-op context. Recording, each step yields one `StepTimeline` per
rank: an `Event` for every micro-batch's forward, backward (with a split backward: its
input-gradient half, and a `weight` event for the other half) and recompute, and for every
send, receive and wait, timed with `perf_counter` relative to the step's start, plus the
stage's peak memory in the step.

    gather(timeline)            every rank's StepTimeline, on rank 0 (a collective)
    bubble_fraction(timelines)  idle / total over stages, beside theoretical_bubble(N, M, ...)

The picture and the Chrome/Perfetto trace are drawn by the platform
(`giantpipe.platform.timeline_plot`).

Measured bubble: over the span from the first compute start to the last compute end across
stages, the share of stage-time spent outside forward and backward compute (waiting on a
neighbour, communicating, or idle): sum_s (T - busy_s) / (N * T). With equal boxes it equals
the theoretical (N-1)/(M+N-1). Ranks' clocks are aligned by each step's wall-clock start
(`time.time()`), exact on one host and as good as NTP across hosts.

Peak memory per stage: on CUDA the caching allocator's `max_memory_allocated`, reset at each
step's start. On CPU no allocator statistics exist, so the probe reads glibc's bytes in use
(`mallinfo2`: arena + mmapped chunks, every tensor included) after every forward, before
every backward, after each parameter's gradient is accumulated during a backward, and at
the end of every recompute, and keeps the maximum: the CPU analogue of
`max_memory_allocated`, a lower bound of the true peak between samples. Elsewhere (no glibc)
memory is not reported.
`peak_bytes - base_bytes` is what the step added (activations, recomputation, gradients and
communication buffers) above the memory held when it started.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
import torch.distributed as dist

from giantpipe.strategies.schedule import SCHEDULES, bubble, make_schedule

# backward: a fused backward, or the input-gradient half of a split one (split_backward.py);
# weight: the weight-gradient half; recompute runs inside a backward box
COMPUTE_KINDS = ("forward", "backward", "weight")
COMM_KINDS = ("recv", "send", "wait", "sync")  # sync: all-reduces of gradients and the loss
KINDS = (*COMPUTE_KINDS, "recompute", *COMM_KINDS)


class Event(NamedTuple):
    kind: str  # one of KINDS
    micro_batch: int  # -1 for step-level events (final wait, all-reduces)
    start: float  # seconds since the step's start on this rank
    end: float
    chunk: int = 0  # the rank's local chunk (virtual stages)

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass
class StepTimeline:
    """One rank's step: its events, where it sits in the pipeline, and its peak memory."""

    rank: int
    stage: int
    replica: int
    num_stages: int
    micro_batches: int
    schedule: str
    phase: str  # train | eval | forward
    wall_origin: float  # time.time() at the step's start
    events: list[Event] = field(default_factory=list)
    memory_kind: str | None = None  # "cuda_allocator" | "cpu_heap" | None (not measured)
    base_bytes: int | None = None
    peak_bytes: int | None = None
    virtual_stages: int = 1  # chunks per stage (V)

    @property
    def bubble_theory(self) -> float:
        return theoretical_bubble(self.num_stages, self.micro_batches, self.schedule, self.virtual_stages)

    def total(self, kinds: Sequence[str]) -> float:
        return sum(e.duration for e in self.events if e.kind in kinds)

    @property
    def compute_s(self) -> float:
        return self.total(COMPUTE_KINDS)

    @property
    def comm_s(self) -> float:
        """Time in sends, receives (including waiting for the neighbour) and all-reduces."""
        return self.total(COMM_KINDS)

    @property
    def step_s(self) -> float:
        return max((e.end for e in self.events), default=0.0)

    def compute_span(self) -> tuple[float, float] | None:
        """(first compute start, last compute end) in wall-clock seconds."""
        boxes = [e for e in self.events if e.kind in COMPUTE_KINDS]
        if not boxes:
            return None
        return (
            self.wall_origin + min(e.start for e in boxes),
            self.wall_origin + max(e.end for e in boxes),
        )

    @property
    def peak_step_bytes(self) -> int | None:
        """Peak memory the step added on top of what was held when it started."""
        if self.peak_bytes is None or self.base_bytes is None:
            return None
        return self.peak_bytes - self.base_bytes


# -- memory ------------------------------------------------------------------------------------


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
        )
    ]


def _load_mallinfo2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):  # not glibc, or glibc < 2.33
        return None
    fn.restype = _MallInfo2
    return fn


_mallinfo2 = _load_mallinfo2()


def cpu_heap_bytes() -> int | None:
    """Bytes the C heap has handed out and not taken back (glibc only; None elsewhere)."""
    if _mallinfo2 is None:
        return None
    info = _mallinfo2()
    return int(info.uordblks + info.hblkhd)


class MemoryProbe:
    """Peak memory of one step on one device: CUDA allocator stats, or the sampled CPU heap."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.device = device
        if not enabled:
            self.kind: str | None = None
        elif device.type == "cuda":
            self.kind = "cuda_allocator"
        else:
            self.kind = "cpu_heap" if _mallinfo2 is not None else None
        self.base: int | None = None
        self.peak: int | None = None

    def reset(self) -> None:
        if self.kind == "cuda_allocator":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = self.peak = torch.cuda.memory_allocated(self.device)
        elif self.kind == "cpu_heap":
            self.base = self.peak = cpu_heap_bytes()

    def sample(self) -> None:
        if self.kind == "cpu_heap":  # CUDA keeps its own running peak
            now = cpu_heap_bytes()
            if now > self.peak:
                self.peak = now

    def read(self) -> tuple[int | None, int | None]:
        if self.kind == "cuda_allocator":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        return self.base, self.peak


# -- recording ---------------------------------------------------------------------------------


class TimelineRecorder:
    """The engine's notebook: `start` a step, `add` events as they end, `finish` the step."""

    def __init__(
        self,
        rank: int,
        stage: int,
        replica: int,
        num_stages: int,
        micro_batches: int,
        schedule: str,
        device: torch.device,
        virtual_stages: int = 1,
        memory: bool = True,
    ):
        self._where = (rank, stage, replica, num_stages, micro_batches, schedule)
        self._chunks = virtual_stages
        self.memory = MemoryProbe(device, memory)
        self._origin = 0.0
        self._timeline: StepTimeline | None = None
        self._hooks: list = []

    def start(self, phase: str) -> None:
        self.memory.reset()
        self._timeline = StepTimeline(
            *self._where, phase=phase, wall_origin=time.time(), virtual_stages=self._chunks
        )
        self._origin = time.perf_counter()

    @property
    def recording(self) -> bool:
        """Inside a step (between `start` and `finish`)."""
        return self._timeline is not None

    def add(self, kind: str, micro_batch: int, start: float, end: float, chunk: int = 0) -> None:
        """Record an event from two `perf_counter()` readings."""
        assert self._timeline is not None, "TimelineRecorder.add outside a step"
        self._timeline.events.append(
            Event(kind, micro_batch, start - self._origin, end - self._origin, chunk)
        )

    def sample_memory(self) -> None:
        self.memory.sample()

    def span(self, kind: str, micro_batch: int, chunk: int = 0) -> AbstractContextManager[None]:
        """Time the block as one event (then sample memory); a no-op outside a step."""
        if self._timeline is None:
            return nullcontext()
        return self._timed(kind, micro_batch, chunk)

    @contextmanager
    def _timed(self, kind: str, micro_batch: int, chunk: int) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(kind, micro_batch, start, time.perf_counter(), chunk)
            self.memory.sample()

    def watch_backward(self, parameters) -> None:
        """Sample the CPU heap inside backwards too: after each parameter's gradient lands
        (CUDA's allocator keeps its own peak). Undone by `close`."""
        if self.memory.kind != "cpu_heap":
            return
        for p in parameters:
            if p.requires_grad:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._sample_in_backward))

    def _sample_in_backward(self, _param) -> None:
        if self._timeline is not None:
            self.memory.sample()

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def finish(self) -> StepTimeline:
        timeline, self._timeline = self._timeline, None
        assert timeline is not None, "TimelineRecorder.finish without start"
        timeline.memory_kind = self.memory.kind
        timeline.base_bytes, timeline.peak_bytes = self.memory.read()
        return timeline


class NullRecorder:
    """The recorder when the timeline is off: every span is one shared no-op context."""

    recording = False
    _span = nullcontext()

    def start(self, phase: str) -> None:
        pass

    def span(self, kind: str, micro_batch: int, chunk: int = 0) -> AbstractContextManager[None]:
        return self._span

    def add(self, kind: str, micro_batch: int, start: float, end: float, chunk: int = 0) -> None:
        pass

    def watch_backward(self, parameters: Iterable) -> None:
        pass

    def close(self) -> None:
        pass

    def finish(self) -> None:
        return None


NULL_RECORDER = NullRecorder()
Recorder = TimelineRecorder | NullRecorder


# -- across ranks ------------------------------------------------------------------------------


def gather(
    timeline: StepTimeline, group: dist.ProcessGroup | None = None, dst: int = 0
) -> list[StepTimeline] | None:
    """Every rank's timeline on rank `dst` (ordered by rank); None on the other ranks.
    A collective: every rank of `group` calls it with its own timeline of the same step."""
    if not (dist.is_available() and dist.is_initialized()):
        return [timeline]
    rank = dist.get_rank()
    size = dist.get_world_size(group)
    out: list | None = [None] * size if rank == dst else None
    dist.gather_object(timeline, out, dst=dst, group=group)
    return sorted(out, key=lambda t: t.rank) if out is not None else None


def aligned(timelines: Sequence[StepTimeline]) -> list[StepTimeline]:
    """The timelines on one clock: events shifted so that time 0 is the earliest step start."""
    if not timelines:
        return []
    zero = min(t.wall_origin for t in timelines)
    out = []
    for t in timelines:
        shift = t.wall_origin - zero
        events = [e._replace(start=e.start + shift, end=e.end + shift) for e in t.events]
        out.append(replace(t, wall_origin=zero, events=events))
    return out


def theoretical_bubble(
    num_stages: int, micro_batches: int, schedule: str = "gpipe", chunks: int = 1
) -> float:
    """The schedule's bubble for equal stages and micro-batches: GPipe's and 1F1B's
    (N-1)/(M+N-1); the others' from their clock simulation (schedule.bubble, F = B = W)."""
    if schedule in ("gpipe", "1f1b") or schedule not in SCHEDULES:
        return (num_stages - 1) / (micro_batches + num_stages - 1)
    actions = make_schedule(schedule, num_stages, micro_batches, chunks)
    return bubble(actions, SCHEDULES[schedule].placement)


def bubble_from_spans(
    busy_s: Sequence[float], spans: Sequence[tuple[float, float]], *, busiest: bool = False
) -> float:
    """Idle / total stage-time: each stage's `busy_s` compute within the common span from the
    earliest start to the latest end of `spans` (one (start, end) per stage). `busiest`: the
    idle share of the stage that computes most instead (the zero-bubble paper's
    (cost - its work) / cost), which leaves out what the other stages idle because they have
    less to do: the part of the step a schedule can win back, not the partition's imbalance."""
    if not spans:
        return 0.0
    total = max(end for _, end in spans) - min(start for start, _ in spans)
    if total <= 0:
        return 0.0
    if busiest:
        return max(0.0, 1.0 - max(busy_s) / total)
    return max(0.0, 1.0 - sum(busy_s) / (len(busy_s) * total))


def bubble_fraction(timelines: Sequence[StepTimeline], *, busiest: bool = False) -> float:
    """The measured bubble of one step from every stage's timeline (all replicas count);
    `busiest`: the busiest stage's (`bubble_from_spans`)."""
    with_compute = [t for t in timelines if t.compute_span() is not None]
    return bubble_from_spans(
        [t.compute_s for t in with_compute], [t.compute_span() for t in with_compute], busiest=busiest
    )
