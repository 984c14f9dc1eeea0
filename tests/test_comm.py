"""Carries and their gradients cross between two gloo processes intact, whatever their shapes."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from giantpipe.strategies.comm import Link, _decode_keys, _encode_keys, wants_grad
from pipeline_harness import spawn


def carry_sequence() -> list[dict[str, torch.Tensor]]:
    """Carries whose keys, shapes, dtypes and gradient flags change from one to the next.
    Built from a fixed seed, so both processes know what should arrive."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32, grad=False):
        return torch.randn(shape, generator=gen, dtype=dtype).requires_grad_(grad)

    def ints(*shape, dtype=torch.int64):
        return torch.randint(-50, 50, shape, generator=gen).to(dtype)

    many = {f"t{i}": randn(i % 3 + 1, 2, 1, grad=i % 2 == 0) for i in range(20)}
    return [
        {"h": randn(2, 3, 4, grad=True), "mask": ints(2, 3) > 0, "lengths": ints(2)},
        {"h": randn(5, 1, 4, grad=True), "mask": ints(5, 1) > 0, "lengths": ints(5)},  # same keys
        {
            "f64": randn(3, 2, dtype=torch.float64, grad=True),
            "f16": randn(4, dtype=torch.float16),
            "bf16": randn(2, 2, dtype=torch.bfloat16, grad=True),
            "i32": ints(3, dtype=torch.int32),
            "u8": ints(6, dtype=torch.uint8),
            "c64": randn(2, dtype=torch.complex64, grad=True),
            "scalar": randn(grad=True),
            "empty": randn(0, 4, grad=True),
            "transposed": randn(4, 3).t().contiguous().t().requires_grad_(),  # non-contiguous leaf
            "no_grad_float": randn(3),
        },
        {},
        many,  # metadata longer than one message
        {"h": randn(1, 7, 4, grad=True), "mask": ints(1, 7) > 0, "lengths": ints(1)},
    ]


def grad_for(t: torch.Tensor) -> torch.Tensor:
    """The gradient the receiver sends back: a deterministic function of the value."""
    return t.detach() * 2 + 1


def exchange(
    rank: int, world_size: int, meta_capacities: list[int], packed: bool | None = None
) -> list[str]:
    """Rank 0 sends every carry and checks the gradients; rank 1 checks what arrives."""
    problems = []
    for capacity in meta_capacities:
        link = Link(1 - rank, meta_capacity=capacity, packed=packed)
        assert link.packed is (packed if packed is not None else True)
        problems += _exchange(link, rank)
    return problems


def _exchange(link: Link, rank: int) -> list[str]:
    problems = []
    for n, expected in enumerate(carry_sequence()):
        if rank == 0:
            sent = link.send_carry(expected)
            assert all(wants_grad(t) for t in sent)
            for t, g in zip(sent, link.recv_grads(sent), strict=True):
                if not torch.equal(g, grad_for(t)):
                    problems.append(f"carry {n}: wrong gradient")
        else:
            got = link.recv_carry()
            if list(got) != list(expected):
                problems.append(f"carry {n}: keys {list(got)} != {list(expected)}")
                continue
            for key, t in got.items():
                want = expected[key]
                if (
                    t.dtype != want.dtype
                    or t.shape != want.shape
                    or not torch.equal(t, want.detach())
                ):
                    problems.append(f"carry {n}: {key} arrived as {t.dtype}{tuple(t.shape)}")
                if t.requires_grad != wants_grad(want) or not t.is_leaf:
                    problems.append(f"carry {n}: {key} requires_grad={t.requires_grad}")
            link.send_grads([grad_for(t) for t in got.values() if wants_grad(t)])
        link.wait()
    return problems


def test_carries_and_gradients_round_trip():
    # capacity 8: the metadata of every carry overflows into a second message
    assert spawn(exchange, 2, [64, 8]) == [[], []]


def test_nccl_wire_format_round_trips_over_gloo():
    """`packed=False` is NCCL's format (a fixed-size metadata message, one message per
    tensor, gradients one by one): the same carries must arrive intact over gloo."""
    assert spawn(exchange, 2, [64, 8], False) == [[], []]


@given(
    st.lists(st.text(st.characters(blacklist_characters="\0"), min_size=1), min_size=1, max_size=6)
)
def test_key_names_survive_encoding(keys):
    assert _decode_keys(_encode_keys(keys)) == keys
