"""Deliberate faults for testing failure handling: GIANTPIPE_FAULT="stage=1,step=3,kind=kill".

Kinds, injected in stage `stage` at the start of its training step `step`:

    raise      an exception in the step
    exit       os._exit(3): the process vanishes without cleaning up
    kill       SIGKILL to itself
    stop       SIGSTOP to itself: a frozen process, its sockets open and silent
    partition  the network between this process and all others is cut: nothing it sends from
               now on arrives, no peer hears from it, and its own waits time out as they would
               (after the process group's timeout); its sockets stay open, as in a real
               partition, so nobody sees a "connection closed"
    nojoin     (no step) the stage never joins the process group: it hangs before the rendezvous
    nan        the stage's first layer outputs NaN for this one step (its weights stay finite)
    nangrad    the gradient of the stage's first weight is NaN for this one step (the loss is finite)

With `save=N` instead of `step=`, the fault fires inside the stage's N-th checkpoint save
(counting from 0), right after it wrote its shard and before the manifest: the moment a
crash could leave a checkpoint half-written.

GIANTPIPE_FAULT_LOG=path appends "unix_time stage S step N kind" when a fault fires, so a test can
time what follows. The spec is read once per process; a step costs one dict lookup.
"""

from __future__ import annotations

import os
import signal
import time

_SPEC = os.environ.get("GIANTPIPE_FAULT")
FAULT = dict(item.split("=", 1) for item in _SPEC.split(",")) if _SPEC else None
KINDS = ("raise", "exit", "kill", "stop", "partition", "nojoin", "nan", "nangrad")
# What a partitioned process can no longer do (torch.distributed's point-to-point and collectives).
COMMUNICATION = ("send", "recv", "isend", "irecv", "batch_isend_irecv", "all_reduce", "reduce", "broadcast",
                 "all_gather", "all_gather_into_tensor", "reduce_scatter", "all_to_all", "gather", "scatter",
                 "barrier", "monitored_barrier", "all_gather_object", "broadcast_object_list")


def _fires(stage: int) -> str | None:
    if FAULT is None or int(FAULT.get("stage", -1)) != stage:
        return None
    return FAULT.get("kind", "raise")


def maybe_inject(stage: int, step: int, timeout_s: float = 1800.0, layers=()):
    """Inject the configured fault if this is its stage and training step (`step=N`);
    `timeout_s` is how long a partitioned process's own waits last (the group's timeout);
    `layers`: the stage's layers (kinds nan, nangrad). Returns a function that removes a
    one-step fault (call it before the next step), or None."""
    kind = _fires(stage)
    if kind is None or kind == "nojoin" or int(FAULT.get("step", -1)) != step:
        return None
    if kind in ("nan", "nangrad"):
        _log(stage, f"step {step}", kind)
        return _poison(kind, layers[0])
    _inject(kind, stage, f"step {step}", timeout_s)
    return None


def _poison(kind: str, layer):
    """NaN in `layer`'s output (nan) or in its first weight's gradient (nangrad); returns the undo."""
    import torch

    if kind == "nan":
        def nan_output(module, args, output):
            return {k: v * float("nan") if torch.is_tensor(v) and v.is_floating_point() else v
                    for k, v in output.items()}
        handle = layer.register_forward_hook(nan_output, prepend=True)  # before any watcher
    else:
        handle = next(layer.parameters()).register_hook(lambda grad: grad * float("nan"))
    return handle.remove


def maybe_inject_in_save(stage: int, save: int, timeout_s: float = 1800.0) -> None:
    """Inject the configured fault if this is its stage and checkpoint save (`save=N`)."""
    kind = _fires(stage)
    if kind is not None and kind != "nojoin" and int(FAULT.get("save", -1)) == save:
        _inject(kind, stage, f"save {save}", timeout_s)


def _inject(kind: str, stage: int, where: str, timeout_s: float) -> None:
    _log(stage, where, kind)
    if kind == "raise":
        raise RuntimeError(f"injected fault in stage {stage} at {where}")
    if kind == "exit":
        os._exit(3)
    if kind == "partition":
        partition(timeout_s)
        return
    os.kill(os.getpid(), signal.SIGKILL if kind == "kill" else signal.SIGSTOP)


def maybe_skip_join(stage: int) -> None:
    """`kind=nojoin`: this stage never reaches the rendezvous (it sleeps until killed)."""
    if _fires(stage) == "nojoin":
        _log(stage, "rendezvous", "nojoin")
        while True:
            time.sleep(3600)


def partition(timeout_s: float) -> None:
    """Cut this process off: every later torch.distributed operation goes nowhere, and waiting
    on it fails after `timeout_s` like gloo's own timeout ("Timed out waiting ...")."""
    import torch.distributed as dist

    for name in COMMUNICATION:
        if hasattr(dist, name):
            setattr(dist, name, _unreachable(name, timeout_s))


class _LostWork:
    """A send, receive or collective whose peers never answer."""

    def __init__(self, op: str, timeout_s: float) -> None:
        self.op, self.timeout_s = op, timeout_s

    def is_completed(self) -> bool:
        return False

    def wait(self, timeout=None) -> bool:
        time.sleep(self.timeout_s)
        raise RuntimeError(f"Timed out waiting {int(self.timeout_s * 1000)}ms for {self.op} to complete "
                           "(the network is partitioned: injected fault)")


def _unreachable(op: str, timeout_s: float):
    def lost(*args, async_op: bool = False, **kwargs):
        work = _LostWork(op, timeout_s)
        if op in ("isend", "irecv") or async_op:
            return work
        if op == "batch_isend_irecv":
            return [work]
        return work.wait()

    return lost


def _log(stage: int, where: str, kind: str) -> None:
    path = os.environ.get("GIANTPIPE_FAULT_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{time.time():.3f} stage {stage} {where} {kind}\n")
