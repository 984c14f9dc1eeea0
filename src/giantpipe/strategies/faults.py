"""Deliberate faults for testing failure handling: GIANTPIPE_FAULT="stage=1,step=3,kind=kill".

Kinds: `raise` (an exception in the step), `exit` (os._exit(3)), `kill` (SIGKILL to itself),
`stop` (SIGSTOP to itself: a hung peer). Read once per process; costs one dict lookup a step.
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("GIANTPIPE_FAULT")
FAULT = dict(item.split("=", 1) for item in _SPEC.split(",")) if _SPEC else None


def maybe_inject(stage: int, step: int) -> None:
    if FAULT is None or int(FAULT.get("stage", -1)) != stage or int(FAULT.get("step", -1)) != step:
        return
    kind = FAULT.get("kind", "raise")
    if kind == "raise":
        raise RuntimeError(f"injected fault in stage {stage} at step {step}")
    if kind == "exit":
        os._exit(3)
    os.kill(os.getpid(), signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
