"""Start the processes of a multi-process run, once per Hydra job.

Lightning's own launcher re-runs the command line in each child, which breaks Hydra multirun
(Lightning #15737: every child re-runs the whole sweep). giantpipe spawns the workers of each
job itself, passing them the job's resolved config, so a sweep runs its jobs one after another
and each job has its own process group on a fresh port. Under `torchrun` (or SLURM) the
processes already exist and each runs the job directly.

If any worker fails, the others are terminated at once and the error names the stage.
"""

from __future__ import annotations

import os
import socket
import sys

import torch.multiprocessing as mp

from giantpipe.platform.allocator import keep_freed_memory
from giantpipe.platform.config import ConfigError

EXTERNAL_LAUNCH_VARS = ("TORCHELASTIC_RUN_ID", "SLURM_PROCID", "LOCAL_RANK")
# Once a worker failed, the others get this long to end by themselves, then SIGTERM, then as
# long again before SIGKILL (torch's default is 30 s; a stage blocked in a receive, or stopped,
# never handles SIGTERM, so the run would outlive strategy.timeout_s by half a minute).
SHUTDOWN_GRACE_S = 3.0


def launched_externally() -> bool:
    """True under torchrun, SLURM, or inside a worker this module started."""
    return any(v in os.environ for v in EXTERNAL_LAUNCH_VARS)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(local_rank: int, world_size: int, port: int, fn, args) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(local_rank),
        LOCAL_RANK=str(local_rank), NODE_RANK="0", LOCAL_WORLD_SIZE=str(world_size),
    )
    keep_freed_memory()  # for a parent that did not set the environment before spawning
    try:
        fn(*args)
    except ConfigError as err:
        print(f"giantpipe-train: error on rank {local_rank}: {err}", file=sys.stderr)
        sys.exit(2)


def spawn(fn, args: tuple, world_size: int, describe_rank) -> None:
    """Run `fn(*args)` in `world_size` fresh processes; raise ConfigError naming a failed rank."""
    try:
        context = mp.start_processes(_worker, args=(world_size, free_port(), fn, args), nprocs=world_size,
                                     join=False, start_method="spawn")
        while not context.join(grace_period=SHUTDOWN_GRACE_S):
            pass
    except mp.ProcessExitedException as err:
        raise ConfigError(
            f"{describe_rank(err.error_index)} exited with code {err.exit_code}"
            f"{' (killed by a signal)' if err.exit_code < 0 else ''}; the other processes were stopped"
        ) from None
    except mp.ProcessRaisedException as err:
        if os.environ.get("GIANTPIPE_DEBUG"):
            print(err, file=sys.stderr)
        last = [ln for ln in str(err).strip().splitlines() if ln.strip()][-1]
        raise ConfigError(f"{describe_rank(err.error_index)} failed: {last}; the other processes were stopped") from None
