"""How much memory each pipeline stage will hold at its peak, predicted before training.

A stage's peak resident memory is

    fixed                      the process itself: framework, data, communication buffers
  + 4 x parameter bytes        weights, gradients, AdamW's exp_avg and exp_avg_sq (parameter dtype)
  + ALLOC_OVERHEAD x activations at the schedule's worst moment

The activations come from a profile: each distinct layer runs forward once on a one-sample
batch under `saved_tensors_hooks`, which counts the bytes autograd keeps for its backward and
the bytes of the carry it passes on; both grow linearly with the batch. The profile runs in the
training precision (`precision_dtypes`): under autocast (`*-mixed`) a layer also keeps
low-precision copies of its weights, once a step whatever the batch (autocast caches them), so
there each layer runs at two batch sizes to tell the fixed bytes from the per-sample ones;
`*-true` precisions scale every float byte by the dtype's size. Which micro-batches'
activations are alive at once depends on the schedule and re-materialization:

    in flight   GPipe: all M micro-batches; 1F1B: min(M, stages - stage)
    never       in flight x (all layers' activations + stage input + stage output)
    always      in flight x (stage input + stage output) + one micro-batch's layers, recomputed
    except_last as always (the kept micro-batch's backward runs before any recompute)
    single      the whole batch's activations, no micro-batches (strategy=single)

plus, in backward, gradient buffers about the size of one layer's activations (TRANSIENT).
ALLOC_OVERHEAD covers what the allocator holds beyond live tensors (CPU heap fragmentation
between short-lived temporaries and saved tensors); it was measured against VmHWM on the
capacity benchmark (scripts/bench_capacity.py), which checks every prediction again.

On CUDA (`MemoryModel(device="cuda")`) the figure is `torch.cuda.max_memory_allocated`:
tensors only (no process, no CUDA context: fixed 0), no heap overhead, and AdamW's foreach
step, the default there, holds a parameter-sized temporary while the activations are gone:
the peak is the larger of the two. These constants are torch's documented behaviour, not yet
measured here (no GPU lent so far; `scripts/bench_capacity.py --device cuda` will).

`MemoryModel.balance` cuts the layers so that the largest predicted stage is smallest, with the
first and last stage's extra load (embeddings, heads, logits, stage inputs) known to it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from giantpipe.models.contract import Batch, LayeredModel
from giantpipe.strategies.partition import (
    _leaf_inputs,
    _materialized,
    min_max_partition,
    stage_ranges,
)

MB = 2**20
ALLOC_OVERHEAD = 1.6  # resident bytes per live activation byte (glibc heap, CPU)
# (alloc_overhead, optimizer_step) by device: the second in units of the parameters' bytes
DEVICE_COSTS = {"cpu": (ALLOC_OVERHEAD, 0.0), "cuda": (1.0, 1.0)}
TRANSIENT = 1.0  # backward's gradient buffers, in units of the largest layer's activations
OPTIMIZER_STATES = 2  # AdamW: exp_avg and exp_avg_sq, each the size of the parameters


def status_kb(pid: int | str = "self", key: str = "VmHWM") -> int | None:
    """`key` (kB) from /proc/<pid>/status: VmHWM is the peak resident memory since the process
    started; None where the process is gone or there is no /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory so far, what giantpipe-plan predicts: on CUDA the tensors'
    (`max_memory_allocated`), elsewhere the resident set's (`VmHWM`)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MB
    return (status_kb("self") or 0) / 1024


@dataclass(frozen=True)
class LayerProfile:
    """One layer: parameter bytes, and per batch *sample* the activation bytes autograd saves
    and the bytes of the carry the layer passes on; `act_fixed_bytes`: saved bytes that do not
    grow with the batch (autocast's weight copies), held once a step."""

    param_bytes: int
    act_bytes: float
    out_bytes: float
    act_fixed_bytes: float = 0.0


# Lightning precision -> (parameter dtype, autocast dtype or None)
_PRECISIONS = {
    "32-true": (torch.float32, None), "32": (torch.float32, None),
    "64-true": (torch.float64, None), "64": (torch.float64, None),
    "bf16-true": (torch.bfloat16, None), "16-true": (torch.float16, None),
    "bf16-mixed": (torch.float32, torch.bfloat16), "bf16": (torch.float32, torch.bfloat16),
    "16-mixed": (torch.float32, torch.float16), "16": (torch.float32, torch.float16),
}


def precision_dtypes(precision: str) -> tuple[torch.dtype, torch.dtype | None]:
    """(parameter dtype, autocast dtype or None) of a Lightning precision string."""
    if str(precision) not in _PRECISIONS:
        raise ValueError(f"the memory model knows precisions {', '.join(_PRECISIONS)}; not {precision!r}")
    return _PRECISIONS[str(precision)]


@dataclass
class StageMemory:
    """The predicted peak of one stage's process, in MiB, by part."""

    stage: int
    layers: str
    params: int
    fixed_mb: float
    param_mb: float
    grad_mb: float
    optim_mb: float
    act_mb: float
    peak_mb: float
    optim_step_mb: float = 0.0  # the optimizer step's temporaries (activations freed by then)

    def as_dict(self) -> dict:
        return asdict(self)


def profile_layers(model: LayeredModel, sample: Batch, *, seed: int = 0, loss_fn=None,
                   precision: str = "32-true") -> list[LayerProfile]:
    """Profile every layer on `sample` (one sample is enough; results are per sample) in the
    training `precision`; the last layer's profile includes what `loss_fn(out, sample)` saves
    (e.g. log-softmax). Layers with the same type and parameter shapes share one measurement,
    so a deep stack of equal blocks costs one block's profile; layers on the meta device are
    materialized one at a time."""
    param_dtype, autocast = precision_dtypes(precision)
    scale = param_dtype.itemsize / 4  # *-true: every float byte in that dtype
    region = partial(torch.autocast, "cpu", dtype=autocast) if autocast else nullcontext
    samples = next(iter(sample.values())).shape[0]
    with region():
        carry = model.first_carry(sample)
    cache: dict[tuple, LayerProfile] = {}
    profiles = []
    for i, layer in enumerate(model.layers):
        key = (type(layer), tuple((n, tuple(p.shape)) for n, p in layer.named_parameters()),
               tuple((k, tuple(v.shape)) for k, v in carry.items()))
        last = i == len(model.layers) - 1
        key = (*key, last)
        if key not in cache:
            with _materialized(model, i, "cpu", seed), region():
                loss = loss_fn if last else None
                profile = _profile_one(model, i, carry, sample, loss)
                if autocast:  # again at twice the batch: the weight copies do not double
                    twice = _profile_one(model, i, _doubled(carry), _doubled(sample), loss)
                    per_sample = max(0.0, 2 * twice.act_bytes - profile.act_bytes)
                    fixed = max(0.0, samples * (profile.act_bytes - per_sample))
                    profile = replace(profile, act_bytes=per_sample, act_fixed_bytes=fixed)
                cache[key] = replace(profile, param_bytes=int(profile.param_bytes * scale),
                                     act_bytes=profile.act_bytes * scale, out_bytes=profile.out_bytes * scale)
                with torch.no_grad():
                    next_carry = model.run_layers(dict(carry), [i])
            carry_out = {k: torch.empty_like(v, device="cpu") for k, v in next_carry.items()}
            cache[key + ("out",)] = carry_out  # type: ignore[assignment]
        carry = cache[key + ("out",)]  # type: ignore[assignment]
        profiles.append(cache[key])
    return profiles


def _doubled(batch: Batch) -> Batch:
    return {k: torch.cat([v, v]) for k, v in batch.items()}


def _profile_one(model: LayeredModel, index: int, carry, sample: Batch, loss_fn=None) -> LayerProfile:
    """Layer `index` on `carry` (from `sample`; with `loss_fn`, the loss on `sample` too)."""
    layer = model.layers[index]
    samples = next(iter(sample.values())).shape[0]
    param_storages = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    inputs = _leaf_inputs(carry)
    input_storages = {v.untyped_storage().data_ptr() for v in inputs.values()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.run_layers(inputs, [index])
        if loss_fn is not None:
            loss_fn(out, sample)
    act = sum(n for ptr, n in saved.items() if ptr not in input_storages)
    out_bytes = sum(v.numel() * v.element_size() for v in out.values()
                    if v.untyped_storage().data_ptr() not in input_storages)
    params = sum(p.numel() * p.element_size() for p in layer.parameters())
    return LayerProfile(params, act / samples, out_bytes / samples)


@dataclass
class MemoryModel:
    """Predicted stage peaks for one configuration. `batch_size` is one replica's batch;
    `checkpoint="single"` means one process without a pipeline; `first_input_bytes` is the
    first stage's input per sample (token ids)."""

    profiles: Sequence[LayerProfile]
    batch_size: int
    micro_batches: int = 1
    schedule: str = "gpipe"
    checkpoint: str = "single"
    fixed_mb: float = 0.0
    first_input_bytes: float = 0.0
    param_itemsize: int = 4  # bytes per parameter (the training precision's)
    device: str = "cpu"  # cpu: VmHWM of the process; cuda: max_memory_allocated (DEVICE_COSTS)

    def __post_init__(self) -> None:
        self._acts = [0.0]
        self._fixed_acts = [0.0]
        self._params = [0]
        for p in self.profiles:
            self._acts.append(self._acts[-1] + p.act_bytes)
            self._fixed_acts.append(self._fixed_acts[-1] + p.act_fixed_bytes)
            self._params.append(self._params[-1] + p.param_bytes)

    def activation_bytes(self, stage: int, num_stages: int, start: int, stop: int,
                         largest: float | None = None) -> float:
        """Live activation bytes of the stage holding layers start..stop-1 at its worst moment."""
        micro_batch = self.batch_size / (1 if self.checkpoint == "single" else self.micro_batches)
        per_mb = (self._acts[stop] - self._acts[start]) * micro_batch
        if largest is None:
            largest = max(p.act_bytes for p in self.profiles[start:stop])
        # autocast's weight copies: once a step, however many micro-batches are in flight
        transient = TRANSIENT * largest * micro_batch + self._fixed_acts[stop] - self._fixed_acts[start]
        if self.checkpoint == "single":
            return per_mb + transient
        input_bytes = self.first_input_bytes if start == 0 else self.profiles[start - 1].out_bytes
        boundary = (input_bytes + self.profiles[stop - 1].out_bytes) * micro_batch
        in_flight = self.micro_batches if self.schedule == "gpipe" else min(self.micro_batches, num_stages - stage)
        if self.checkpoint == "never":
            return in_flight * (per_mb + boundary) + transient
        return in_flight * boundary + per_mb + transient

    def stage_peak_mb(self, stage: int, num_stages: int, start: int, stop: int,
                      largest: float | None = None) -> float:
        param_mb = (self._params[stop] - self._params[start]) / MB
        act = self.activation_bytes(stage, num_stages, start, stop, largest)
        overhead, optimizer_step = DEVICE_COSTS[self.device]
        return (self.fixed_mb + (2 + OPTIMIZER_STATES) * param_mb
                + max(overhead * act / MB, optimizer_step * param_mb))

    def predict(self, balance: Sequence[int]) -> list[StageMemory]:
        """Each stage's predicted peak, by part."""
        stages = []
        for s, layers in enumerate(stage_ranges(balance)):
            param_mb = (self._params[layers.stop] - self._params[layers.start]) / MB
            act = self.activation_bytes(s, len(balance), layers.start, layers.stop)
            span = f"{layers.start}" if len(layers) == 1 else f"{layers.start}-{layers[-1]}"
            stages.append(StageMemory(
                stage=s, layers=span, params=int(param_mb * MB) // self.param_itemsize, fixed_mb=self.fixed_mb,
                param_mb=param_mb, grad_mb=param_mb, optim_mb=OPTIMIZER_STATES * param_mb,
                act_mb=DEVICE_COSTS[self.device][0] * act / MB,
                optim_step_mb=DEVICE_COSTS[self.device][1] * param_mb,
                peak_mb=self.stage_peak_mb(s, len(balance), layers.start, layers.stop),
            ))  # fmt: skip
        return stages

    def fits(self, num_stages: int, budget_mb: float) -> bool:
        """Whether some contiguous balance keeps every stage's predicted peak within `budget_mb`:
        each stage takes layers while it fits (a stage's peak grows with its layers, so taking
        the most is never worse). O(L), where `balance` is a dynamic programme."""
        peak = self._part_peak(num_stages)
        layers, start = len(self.profiles), 0
        for stage in range(num_stages):
            stop, most = start, layers - (num_stages - stage - 1)  # every later stage gets a layer
            while stop < most and peak(stage, start, stop + 1) <= budget_mb:
                stop += 1
            if stop == start:
                return False
            start = stop
        return start == layers

    def balance(self, num_stages: int) -> list[int]:
        """The contiguous balance whose largest predicted stage peak is smallest (this model's
        own stage formula, so the first and last stages' embeddings, heads and inputs count)."""
        return min_max_partition(len(self.profiles), num_stages, self._part_peak(num_stages))

    def _part_peak(self, num_stages: int) -> Callable[[int, int, int], float]:
        """`peak(stage, start, stop)`: the predicted peak of `stage` holding layers start..stop-1."""
        largest = range_max([p.act_bytes for p in self.profiles])
        return lambda stage, start, stop: self.stage_peak_mb(stage, num_stages, start, stop, largest(start, stop))


def range_max(values: Sequence[float]) -> Callable[[int, int], float]:
    """`query(start, stop)`: the largest of values[start:stop] in O(1), from a sparse table of
    O(L log L) maxima (the balance asks for every range a deep model's cut points make)."""
    levels = [list(values)]  # levels[k][i]: max of values[i : i + 2**k]
    while 2 ** len(levels) <= len(values):
        prev, half = levels[-1], 2 ** (len(levels) - 1)
        levels.append([max(prev[i], prev[i + half]) for i in range(len(prev) - half)])

    def query(start: int, stop: int) -> float:
        k = (stop - start).bit_length() - 1
        return max(levels[k][start], levels[k][stop - (1 << k)])

    return query


def memory_balance(model: LayeredModel, loss_fn, batch: Batch, num_stages: int, *, micro_batches: int,
                   schedule: str, checkpoint: str, seed: int = 0, precision: str = "32-true") -> list[int]:
    """`strategy.balance=memory`: profile on one sample of `batch` (one replica's batch) and cut
    where the largest predicted stage peak is smallest."""
    size = next(iter(batch.values())).shape[0]
    sample = {k: v[:1].cpu() for k, v in batch.items()}
    profiles = profile_layers(model, sample, seed=seed, loss_fn=loss_fn, precision=precision)
    first_input = sum(v.numel() * v.element_size() for v in sample.values())
    memory = MemoryModel(profiles, batch_size=size, micro_batches=micro_batches, schedule=schedule,
                         checkpoint=checkpoint, first_input_bytes=first_input)
    return memory.balance(num_stages)
