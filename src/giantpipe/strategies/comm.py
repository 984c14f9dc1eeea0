"""Shipping carries between neighbouring stages, with per-micro-batch shape metadata.

A `Link` is one stage's end of the connection to a neighbour. Forward, a carry travels as

    1. one int64 metadata message of fixed capacity (a second one only if it overflows):
         [length, n_tensors, key_slots, (dtype, requires_grad, ndim, *shape) × n, key bytes]
       key names travel only when they differ from the previous carry on this link
       (key_slots = 0 otherwise), so the usual message is a few dozen integers;
    2. one message per non-empty tensor, in key order, all posted at once.

Backward, the gradients of the floating tensors that required grad travel back in the same
order, with no metadata: both ends know their shapes from the forward. Shapes, dtypes and
keys may change every micro-batch and every step.

Sends are non-blocking (isend) and their buffers are kept until `wait`; receives block.
A send/recv pair that never completes raises after the process group's timeout (gloo waits
with it). With NCCL the metadata lives on the device (NCCL moves only device tensors); on
other backends (gloo, or the CPU half of "cpu:gloo,cuda:nccl") it stays on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

Carry = dict[str, Tensor]

DTYPES: tuple[torch.dtype, ...] = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    torch.complex64, torch.complex128,
)  # fmt: skip
_CODE = {dtype: code for code, dtype in enumerate(DTYPES)}
_HEADER = 3  # length, n_tensors, key_slots
META_CAPACITY = 64


def wants_grad(tensor: Tensor) -> bool:
    """Whether a carried tensor gets a gradient sent back: floating and requiring grad."""
    return tensor.requires_grad and (tensor.is_floating_point() or tensor.is_complex())


def _encode_keys(keys: Sequence[str]) -> list[int]:
    raw = "\0".join(keys).encode("utf-8", "surrogatepass")
    raw += b"\0" * (-len(raw) % 8)
    return [int.from_bytes(raw[i : i + 8], "little", signed=True) for i in range(0, len(raw), 8)]


def _decode_keys(slots: Sequence[int]) -> list[str]:
    raw = b"".join(v.to_bytes(8, "little", signed=True) for v in slots)
    return raw.rstrip(b"\0").decode("utf-8", "surrogatepass").split("\0")


class Link:
    """One end of the connection between two ranks, for carries one way and gradients back."""

    def __init__(
        self,
        peer: int,
        device: torch.device | str = "cpu",
        group: dist.ProcessGroup | None = None,
        meta_capacity: int = META_CAPACITY,
    ) -> None:
        self.peer = peer
        self.device = torch.device(device)
        self.group = group
        self.meta_capacity = meta_capacity
        backend = dist.get_backend(group)
        self.meta_device = self.device if backend == "nccl" else torch.device("cpu")
        self._sent_keys: list[str] | None = None
        self._recv_keys: list[str] | None = None
        self._pending: list[tuple[dist.Work, Tensor]] = []

    # -- forward: carries ---------------------------------------------------------------

    def send_carry(self, carry: Carry) -> list[Tensor]:
        """Send a carry; return its tensors that will get gradients back (see `recv_grads`)."""
        keys = list(carry)
        tensors = [carry[k] for k in keys]
        meta = [0, len(tensors), 0]
        for t in tensors:
            if t.dtype not in _CODE:
                raise ValueError(
                    f"cannot send a carry tensor of dtype {t.dtype}; use one of {DTYPES}"
                )
            meta += [_CODE[t.dtype], int(wants_grad(t)), t.dim(), *t.shape]
        if keys != self._sent_keys:
            key_slots = _encode_keys(keys)
            meta[2] = len(key_slots)
            meta += key_slots
            self._sent_keys = keys
        meta[0] = len(meta)
        self._send_meta(meta)
        for t in tensors:
            if t.numel():
                self._isend(t.detach().contiguous())
        return [t for t in tensors if wants_grad(t)]

    def recv_carry(self) -> Carry:
        """Receive a carry; tensors sent with requires_grad arrive as leaves that require grad."""
        meta = self._recv_meta()
        n, key_slots = meta[1], meta[2]
        specs, pos = [], _HEADER
        for _ in range(n):
            code, grad, ndim = meta[pos : pos + 3]
            specs.append((DTYPES[code], bool(grad), meta[pos + 3 : pos + 3 + ndim]))
            pos += 3 + ndim
        if key_slots or not n:
            self._recv_keys = _decode_keys(meta[pos : pos + key_slots]) if n else []
        keys = self._recv_keys
        assert keys is not None and len(keys) == n, "carry metadata out of step with its keys"
        tensors = [torch.empty(shape, dtype=dtype, device=self.device) for dtype, _, shape in specs]
        self._recv_all(tensors)
        for t, (_, grad, _) in zip(tensors, specs, strict=True):
            if grad:
                t.requires_grad_(True)
        return dict(zip(keys, tensors, strict=True))

    # -- backward: gradients --------------------------------------------------------------

    def send_grads(self, grads: Sequence[Tensor]) -> None:
        """Send the gradients of a received carry's tensors that required grad, in key order."""
        for g in grads:
            if g.numel():
                self._isend(g.detach().contiguous())

    def recv_grads(self, sent: Sequence[Tensor]) -> list[Tensor]:
        """Receive the gradients for the tensors `send_carry` returned for that micro-batch."""
        grads = [torch.empty(t.shape, dtype=t.dtype, device=self.device) for t in sent]
        self._recv_all(grads)
        return grads

    # -- plumbing ---------------------------------------------------------------------------

    def wait(self) -> None:
        """Block until every send so far has completed, then release their buffers."""
        pending, self._pending = self._pending, []
        for work, _ in pending:
            work.wait()

    def _isend(self, tensor: Tensor) -> None:
        if len(self._pending) > 32:
            self._pending = [(w, t) for w, t in self._pending if not w.is_completed()]
        self._pending.append((dist.isend(tensor, self.peer, group=self.group), tensor))

    def _recv_all(self, tensors: Sequence[Tensor]) -> None:
        works = [dist.irecv(t, self.peer, group=self.group) for t in tensors if t.numel()]
        for work in works:
            work.wait()

    def _send_meta(self, meta: list[int]) -> None:
        cap = self.meta_capacity
        meta = meta + [0] * max(0, cap - len(meta))
        buf = torch.tensor(meta, dtype=torch.int64, device=self.meta_device)
        self._isend(buf[:cap])
        if len(meta) > cap:
            self._isend(buf[cap:])

    def _recv_meta(self) -> list[int]:
        cap = self.meta_capacity
        buf = torch.empty(cap, dtype=torch.int64, device=self.meta_device)
        dist.recv(buf, self.peer, group=self.group)
        meta = buf.tolist()
        if meta[0] > cap:
            rest = torch.empty(meta[0] - cap, dtype=torch.int64, device=self.meta_device)
            dist.recv(rest, self.peer, group=self.group)
            meta += rest.tolist()
        return meta
