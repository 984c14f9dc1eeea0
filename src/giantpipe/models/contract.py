"""The composite-layer contract (DESIGN §2) that every model honours and the pipeline relies on.

A model is an ordered list of layers. Each layer maps a *carry* -- a flat dict of named
tensors -- to the next carry. A carry may hold activations (with gradients), tensors without
gradients (masks, lengths, token ids) and tensors passed through untouched to later layers
(encoder outputs for attention). The pipeline cuts the list into contiguous composite layers
and ships carries between processes; it never looks inside a layer.

Two more rules make a pipelined run equal a plain one:
- Initialization is per layer and seeded by (seed, layer index), so a layer's initial weights
  do not depend on which process builds it (`materialize`).
- A model may be built on the meta device and materialized one layer at a time, so no
  process ever holds the whole giant model.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch import Tensor, nn

Carry = dict[str, Tensor]
Batch = dict[str, Tensor]


class LayeredModel(nn.Module):
    """Base class: `layers` is the ordered layer list; `first_carry` reads the inputs of layer 0."""

    layers: nn.ModuleList

    def first_carry(self, batch: Batch) -> Carry:
        """The carry entering layer 0, taken from a (micro-)batch: by default the batch itself."""
        return dict(batch)

    def split(self, batch: Batch, chunks: int) -> list[Batch]:
        """Split a batch into micro-batches along dim 0 (models with padding may also trim)."""
        return split_batch(batch, chunks)

    def merge(self, carries: list[Carry]) -> Carry:
        """Join micro-batches' output carries into the batch's: the inverse of `split`."""
        return merge_carries(carries)

    def run_layers(self, carry: Carry, indices: Iterable[int] | None = None) -> Carry:
        for i in range(len(self.layers)) if indices is None else indices:
            carry = self.layers[i](carry)
        return carry

    def forward(self, batch: Batch) -> Carry:
        return self.run_layers(self.first_carry(batch))

    def init_layer(self, index: int) -> None:
        """(Re)initialize layer `index` in place; the RNG is already seeded for this layer."""
        for module in self.layers[index].modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()

    def layer_cost(self, index: int) -> float:
        """A static estimate of a layer's cost, for the partition table and balance by params."""
        return float(sum(p.numel() for p in self.layers[index].parameters()))


class SumLoss(Protocol):
    """A loss the pipeline can split over micro-batches and still get the mini-batch's gradients.

    `__call__` returns the *sum* of per-item losses of one micro-batch (items: tokens,
    sentences, ...); `normalizer` returns the item count of the whole mini-batch. The
    mini-batch loss is the sum over micro-batches of `loss(out, mb) / normalizer(batch)`.
    """

    def __call__(self, out: Carry, micro_batch: Batch) -> Tensor: ...

    def normalizer(self, batch: Batch) -> float: ...


class DecodeResult(Protocol):
    """What a search returns (models/beam_search.BeamSearchResult)."""

    def best(self) -> list[list[int]]: ...

    def padded(self, pad_id: int) -> tuple[Tensor, Tensor]: ...


class Decodable(Protocol):
    """The decoding interface of a seq2seq model (GNMT, LAS), which pipelined decoding drives
    without importing any model module: the layers' roles, one-token steps over any subset of
    the decoder layers, and the model's own search over a step decoder (its `step_decoder()`,
    or a pipelined one that spreads the steps over stages)."""

    encoder_indices: range
    decoder_indices: range

    def first_carry(self, batch: Batch) -> Carry: ...

    def run_layers(self, carry: Carry, indices: Iterable[int] | None = None) -> Carry: ...

    def encode(self, batch: Batch) -> Carry: ...

    def step_decoder(self) -> Any: ...

    def init_step_states(
        self, encoded: Carry, beam_size: int = 1, indices: Iterable[int] | None = None
    ) -> dict[int, dict[str, Tensor]]: ...

    def step_layers(
        self, carry: Carry, states: dict[int, dict[str, Tensor]], indices=None
    ) -> tuple[Carry, dict[int, dict[str, Tensor]]]: ...

    def reorder_step_states(
        self, states: dict[int, dict[str, Tensor]], index: Tensor
    ) -> dict[int, dict[str, Tensor]]: ...

    def beam_search(self, decoder: Any, encoded: Carry, src_len: Tensor, **search) -> DecodeResult:
        ...


def layer_seed(seed: int, index: int) -> int:
    """The RNG seed for initializing layer `index`; independent of stage layout."""
    return (seed * 1_000_003 + index * 7_919 + 17) % (2**63 - 1)


def materialize(
    model: LayeredModel, indices: Iterable[int], device: torch.device | str, seed: int
) -> LayeredModel:
    """Allocate and initialize only the layers in `indices` on `device`; others stay as they are.

    Works for a model built under `torch.device("meta")` and for an ordinary one: the weights
    of layer i depend only on (seed, i).
    """
    for i in indices:
        layer = model.layers[i]
        layer.to_empty(device=device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(layer_seed(seed, i))
            with torch.no_grad():
                model.init_layer(i)
    return model


def build_materialized(factory, seed: int, device: torch.device | str = "cpu", indices=None):
    """Build a model on the meta device with `factory()` and materialize `indices` (all by default)."""
    with torch.device("meta"):
        model = factory()
    indices = range(len(model.layers)) if indices is None else indices
    return materialize(model, indices, device, seed)


def split_batch(batch: Batch, chunks: int) -> list[Batch]:
    """Split every tensor of a batch along dim 0 into `chunks` micro-batches (torch.tensor_split)."""
    size = batch_size(batch)
    if chunks > size:
        raise ValueError(f"cannot split a batch of {size} into {chunks} micro-batches")
    parts = {k: torch.tensor_split(v, chunks, dim=0) for k, v in batch.items()}
    return [{k: parts[k][j] for k in batch} for j in range(chunks)]


def batch_size(batch: Batch) -> int:
    return next(iter(batch.values())).shape[0]


def merge_carries(carries: list[Carry]) -> Carry:
    """Concatenate carries along dim 0; tensors whose other dims differ (micro-batches trimmed
    to their own lengths) are first padded with zeros at the end of each dim to the largest."""
    if len(carries) == 1:
        return dict(carries[0])
    merged = {}
    for key in carries[0]:
        parts = [c[key] for c in carries]
        tail = tuple(max(sizes) for sizes in zip(*(p.shape[1:] for p in parts), strict=True))
        if all(p.shape[1:] == tail for p in parts):
            merged[key] = torch.cat(parts)
            continue
        out = parts[0].new_zeros((sum(p.shape[0] for p in parts), *tail))
        row = 0
        for p in parts:
            out[(slice(row, row + p.shape[0]), *(slice(0, n) for n in p.shape[1:]))] = p
            row += p.shape[0]
        merged[key] = out
    return merged
