"""Joining the process group so that a stage that never arrives is named.

`torch.distributed.init_process_group` waits for every process at its rendezvous store and,
if one never comes, fails after the timeout with "1/2 clients joined": not which one. Here
every rank first checks in under its own key in the same store (the one `init_process_group`
then uses), so after `timeout` each waiting rank can say which stages are missing; a rank
that cannot reach the store at all says so, naming the address and the stage that serves it.

Under torchrun the agent hosts the store (`TORCHELASTIC_USE_AGENT_STORE`) and every rank is
its client, as torch's own env:// rendezvous does.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist


def join_store(address: str, port: int, rank: int, world_size: int, timeout: timedelta,
               describe: Callable[[int], str]) -> dist.Store:
    """The rendezvous store, once all `world_size` ranks checked in; RuntimeError naming the
    missing ranks (`describe(rank)`, e.g. "stage 1 (rank 1, replica 0)") after `timeout`."""
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    try:
        store = dist.TCPStore(address, port, world_size, is_master=rank == 0 and not agent_store,
                              timeout=timeout, wait_for_workers=False, multi_tenant=True)
    except Exception as err:  # DistNetworkError, TimeoutError, ...
        host = "the torchrun agent" if agent_store else describe(0)
        raise RuntimeError(
            f"{describe(rank)} cannot reach the rendezvous at {address}:{port} (served by {host}) within "
            f"strategy.timeout_s={timeout.total_seconds():g}: it did not start or is unreachable ({_first_line(err)})"
        ) from None
    prefix = f"giantpipe/joined/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    store.set(f"{prefix}{rank}", "1")
    keys = [f"{prefix}{r}" for r in range(world_size)]
    try:
        store.wait(keys, timeout)
    except Exception:
        missing = [r for r, key in enumerate(keys) if not store.check([key])]
        if not missing:
            raise
        raise RuntimeError(
            f"{describe(rank)}: {', '.join(describe(r) for r in missing)} did not join the pipeline within "
            f"strategy.timeout_s={timeout.total_seconds():g} (not started, hung, or unreachable from "
            f"{address}:{port})"
        ) from None
    return store


def _first_line(err: Exception) -> str:
    return next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
