"""Shipping carries between neighbouring stages, with per-micro-batch shape metadata.

A `Link` is one stage's end of the connection to a neighbour. On gloo a carry travels as ONE
message, its metadata and tensors packed together:

    [header: total_bytes, header_len, n_tensors, key_slots,
             (dtype, requires_grad, ndim, *shape) x n, key bytes | tensor bytes, 64-byte aligned]

Key names travel only when they differ from the previous carry on this link (key_slots = 0
otherwise). The receiver receives into a buffer of `capacity` bytes without knowing the size,
and the tensors arrive as views into it (no copy): gloo lets a message be shorter than the
buffer it lands in. Both ends grow `capacity` to the largest carry so far, in step, so a
sender knows what the receiver posted: a larger carry goes as its first `capacity` bytes
plus the rest in a second message. One message per carry matters because every gloo message
is a rendezvous of two threads in two processes, each a scheduler wake-up on a busy host.

Backward, the gradients of the floating tensors that required grad travel back as one
message too, with no metadata: both ends know their shapes from the forward. Shapes, dtypes
and keys may change every micro-batch and every step.

Receives can be posted ahead, so data moves while the stage computes: `expect_carries(n)`
keeps the next carry's receive posted until n have arrived, `post_grads(sent)` posts a
micro-batch's gradient receive before its backward needs it. Nothing is ever left posted
beyond what was announced, so a Link can be shared (pipelined decoding uses the engine's).

Sends are non-blocking (isend) and their buffers are kept until `wait`; receives block.
A send/recv pair that never completes raises after the process group's timeout (gloo waits
with it). NCCL needs exact message sizes, so there a carry travels as a fixed-size int64
metadata message (a second one if it overflows) then one message per non-empty tensor,
with the metadata on the device (NCCL moves only device tensors).
"""

from __future__ import annotations

from collections import deque
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
_HEADER = 3  # NCCL metadata: length, n_tensors, key_slots
_PACKED_HEADER = 4  # packed carries: total_bytes, header_len, n_tensors, key_slots
META_CAPACITY = 64  # int64 slots: the NCCL metadata message, and the first packed receive
ALIGN = 64  # bytes; every tensor in a packed message starts at a multiple


def wants_grad(tensor: Tensor) -> bool:
    """Whether a carried tensor gets a gradient sent back: floating and requiring grad."""
    return tensor.requires_grad and (tensor.is_floating_point() or tensor.is_complex())


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _layout(specs: Sequence[tuple[torch.dtype, Sequence[int]]], start: int) -> list[int]:
    """Byte offsets of tensors of these (dtype, shape) packed from `start`, then the end."""
    offsets, pos = [], start
    for dtype, shape in specs:
        pos = _align(pos)
        offsets.append(pos)
        pos += _numel(shape) * dtype.itemsize
    return [*offsets, pos]


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _view(buf: Tensor, offset: int, dtype: torch.dtype, shape: Sequence[int]) -> Tensor:
    """A tensor over `buf`'s bytes (no copy), detached so it can become an autograd leaf."""
    nbytes = _numel(shape) * dtype.itemsize
    return buf[offset : offset + nbytes].view(dtype).view(shape).detach()


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
        tag: int = 0,
        packed: bool | None = None,
    ) -> None:
        self.peer = peer
        self.device = torch.device(device)
        self.group = group
        self.meta_capacity = meta_capacity
        self.tag = tag  # links between the same two ranks (virtual stages) differ by tag
        backend = dist.get_backend(group)
        # gloo accepts a message shorter than its buffer; `packed=False` forces NCCL's format
        self.packed = backend != "nccl" if packed is None else packed
        self.meta_device = self.device if backend == "nccl" else torch.device("cpu")
        # packed carries: the receive buffer size both ends agree on, per direction
        self._send_capacity = self._recv_capacity = max(2 * 8, meta_capacity * 8)
        self._sent_keys: list[str] | None = None
        self._recv_keys: list[str] | None = None
        self._pending: list[tuple[dist.Work, Tensor]] = []
        self._expected = 0  # carries announced by expect_carries and not yet received
        self._carry_slot: tuple[dist.Work, Tensor] | None = None  # the next carry's receive
        self._grad_slots: list[tuple[Sequence[Tensor], list[dist.Work], list[Tensor]]] = []

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
        if self.packed:
            self._send_packed(meta[1:], tensors)
        else:
            meta[0] = len(meta)
            self._send_meta(meta)
            for t in tensors:
                if t.numel():
                    self._isend(t.detach().contiguous())
        return [t for t in tensors if wants_grad(t)]

    def recv_carry(self) -> Carry:
        """Receive a carry; tensors sent with requires_grad arrive as leaves that require grad."""
        if self.packed:
            meta, tensor_of = self._recv_packed()
        else:
            meta = self._recv_meta()
            tensor_of = None
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
        if tensor_of is not None:
            tensors = tensor_of([(dtype, shape) for dtype, _, shape in specs])
        else:
            tensors = [
                torch.empty(shape, dtype=dtype, device=self.device) for dtype, _, shape in specs
            ]
            self._recv_all(tensors)
        for t, (_, grad, _) in zip(tensors, specs, strict=True):
            if grad:
                t.requires_grad_(True)
        return dict(zip(keys, tensors, strict=True))

    def expect_carries(self, count: int) -> None:
        """Announce that `count` more carries will be received: each one's receive is posted
        as soon as the previous carry arrived, so it lands while this stage computes."""
        self._expected = count
        if self.packed and count > 0 and self._carry_slot is None:
            self._post_carry_slot()

    # -- backward: gradients --------------------------------------------------------------

    def send_grads(self, grads: Sequence[Tensor]) -> None:
        """Send the gradients of a received carry's tensors that required grad, in key order."""
        grads = [g for g in grads if g.numel()]
        if len(grads) == 1 or (grads and not self.packed):
            for g in grads:
                self._isend(g.detach().contiguous())
        elif grads:
            layout = _layout([(g.dtype, g.shape) for g in grads], 0)
            buf = torch.empty(layout[-1], dtype=torch.uint8, device=self.device)
            for g, offset in zip(grads, layout, strict=False):
                _view(buf, offset, g.dtype, g.shape).copy_(g.detach())
            self._isend(buf)

    def recv_grads(self, sent: Sequence[Tensor]) -> list[Tensor]:
        """Receive the gradients for the tensors `send_carry` returned for that micro-batch."""
        if not self._grad_slots:
            self.post_grads(sent)
        posted, works, grads = self._grad_slots.pop(0)
        assert posted is sent, "gradients received out of the order they were posted"
        for work in works:
            work.wait()
        return grads

    def post_grads(self, sent: Sequence[Tensor]) -> None:
        """Post the receive of these tensors' gradients now; `recv_grads(sent)` collects it.
        Gradients arrive in the order they are sent: post in the order of the backwards."""
        nonempty = [t for t in sent if t.numel()]
        if len(nonempty) == 1 or not self.packed:
            grads = [torch.empty(t.shape, dtype=t.dtype, device=self.device) for t in sent]
            works = [self._irecv(g) for g in grads if g.numel()]
        else:
            layout = _layout([(t.dtype, t.shape) for t in nonempty], 0)
            buf = torch.empty(layout[-1], dtype=torch.uint8, device=self.device)
            views = iter([_view(buf, o, t.dtype, t.shape) for t, o in zip(nonempty, layout)])
            grads = [
                next(views)
                if t.numel()
                else torch.empty(t.shape, dtype=t.dtype, device=self.device)
                for t in sent
            ]
            works = [self._irecv(buf)] if nonempty else []
        self._grad_slots.append((sent, works, grads))

    # -- plumbing ---------------------------------------------------------------------------

    def wait(self) -> None:
        """Block until every send so far has completed, then release their buffers."""
        pending, self._pending = self._pending, []
        for work, _ in pending:
            work.wait()

    def _isend(self, tensor: Tensor) -> None:
        if len(self._pending) > 32:
            self._pending = [(w, t) for w, t in self._pending if not w.is_completed()]
        work = dist.isend(tensor, self.peer, group=self.group, tag=self.tag)
        self._pending.append((work, tensor))

    def _irecv(self, tensor: Tensor) -> dist.Work:
        return dist.irecv(tensor, self.peer, group=self.group, tag=self.tag)

    def _recv_all(self, tensors: Sequence[Tensor]) -> None:
        works = [self._irecv(t) for t in tensors if t.numel()]
        for work in works:
            work.wait()

    # packed carries (gloo)

    def _send_packed(self, meta: list[int], tensors: Sequence[Tensor]) -> None:
        header_len = _PACKED_HEADER + len(meta) - 2
        layout = _layout([(t.dtype, t.shape) for t in tensors], header_len * 8)
        total = layout[-1]
        buf = torch.empty(total, dtype=torch.uint8, device=self.device)
        header = torch.tensor([total, header_len, *meta], dtype=torch.int64)
        buf[: header_len * 8].copy_(header.view(torch.uint8))
        for t, offset in zip(tensors, layout, strict=False):
            if t.numel():
                _view(buf, offset, t.dtype, t.shape).copy_(t.detach())
        capacity = self._send_capacity
        if total <= capacity:
            self._isend(buf)
        else:  # the receiver posted `capacity` bytes: the rest follows
            self._isend(buf[:capacity])
            self._isend(buf[capacity:])
            self._send_capacity = total

    def _post_carry_slot(self) -> None:
        buf = torch.empty(self._recv_capacity, dtype=torch.uint8, device=self.device)
        self._carry_slot = (self._irecv(buf), buf)

    def _recv_packed(self):
        """Receive one packed carry: (metadata in the NCCL layout, a function building the
        tensors from their (dtype, shape)s)."""
        if self._carry_slot is None:
            self._post_carry_slot()
        assert self._carry_slot is not None
        work, buf = self._carry_slot
        self._carry_slot = None
        work.wait()
        total, header_len = buf[:16].view(torch.int64).tolist()
        capacity = self._recv_capacity
        if total > capacity:
            whole = torch.empty(total, dtype=torch.uint8, device=self.device)
            whole[:capacity].copy_(buf)
            self._irecv(whole[capacity:]).wait()
            buf = whole
            self._recv_capacity = total
        header = buf[: header_len * 8].view(torch.int64).tolist()
        self._expected = max(0, self._expected - 1)
        if self._expected:
            self._post_carry_slot()  # after the whole carry: messages arrive in order
        compact = total * 2 < buf.numel()  # a small carry in a large buffer: copy it out

        def tensors(specs):
            layout = _layout(specs, header_len * 8)
            out = [_view(buf, o, d, s) for (d, s), o in zip(specs, layout, strict=False)]
            return [t.clone() for t in out] if compact else out

        return [header_len, *header[2:]], tensors

    # metadata messages (NCCL)

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
        dist.recv(buf, self.peer, group=self.group, tag=self.tag)
        meta = buf.tolist()
        if meta[0] > cap:
            rest = torch.empty(meta[0] - cap, dtype=torch.int64, device=self.meta_device)
            dist.recv(rest, self.peer, group=self.group, tag=self.tag)
            meta += rest.tolist()
        return meta


class LocalLink:
    """Two consecutive virtual stages on one rank (ZB-V's turn): the `Link` interface, with
    carries and gradients handed over in memory. The receiving chunk gets detached leaves, so
    its backward stops there and the gradients come back through `send_grads`."""

    def __init__(self) -> None:
        self._carries: deque[Carry] = deque()
        self._grads: deque[list[Tensor]] = deque()

    def send_carry(self, carry: Carry) -> list[Tensor]:
        self._carries.append(
            {k: t.detach().requires_grad_(wants_grad(t)) for k, t in carry.items()}
        )
        return [t for t in carry.values() if wants_grad(t)]

    def recv_carry(self) -> Carry:
        return self._carries.popleft()

    def send_grads(self, grads: Sequence[Tensor]) -> None:
        self._grads.append([g.detach() for g in grads])

    def recv_grads(self, sent: Sequence[Tensor]) -> list[Tensor]:
        grads = self._grads.popleft()
        assert len(grads) == len(sent), "local gradients out of step with their carry"
        return grads

    def expect_carries(self, count: int) -> None:
        """Nothing to post ahead: the carry is already here when it is needed."""

    def post_grads(self, sent: Sequence[Tensor]) -> None:
        """Nothing to post ahead."""

    def wait(self) -> None:
        """Nothing in flight."""
