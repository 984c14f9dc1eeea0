"""`giantpipe-train`: the Hydra app over conf/train.yaml -- compose, check, fit, test, summarize.

Importing this module imports neither torch nor Lightning: `main` checks the whole command line
first (preflight), so a bad key or value fails in about a second. The training code's imports
come inside `run` and `run_job`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from giantpipe.platform import preflight
from giantpipe.platform.allocator import keep_freed_memory
from giantpipe.platform.checks import validate_config as validate
from giantpipe.platform.config import ConfigError, register_schemas
from giantpipe.strategies.topology import Topology

log = logging.getLogger("giantpipe")
# Known noise: every rank's loss is already global under the pipeline (no sync_dist needed),
# and a Lightning-internal deprecation.
for _pattern in (".*sync_dist=True.*", ".*LeafSpec.*", ".*litlogger.*"):
    warnings.filterwarnings("ignore", message=_pattern)

HELP_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--version", "--shell-completion", "-sc"}


def run(cfg: DictConfig, job: dict) -> dict:
    """Fit, validate and test one configuration; return the summary written to summary.json.

    `job` carries what only the Hydra process knows (group choices, sweep group), so that
    spawned workers can run this too.
    """
    validate(cfg)
    started = time.perf_counter()
    use_global_rank()
    import lightning.pytorch as pl

    from giantpipe.platform.build import build_callbacks, build_loggers, build_task, build_trainer
    from giantpipe.platform.report import print_results
    from giantpipe.platform.summary import write_summary

    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    data, task, extras = build_task(cfg)
    loggers = build_loggers(cfg, job["sweep_group"])
    callbacks, throughput = build_callbacks(cfg, has_logger=bool(loggers))
    trainer = build_trainer(cfg, loggers, callbacks)
    if cfg.init_from:
        task.load_weights(cfg.init_from)

    trainer.fit(task, datamodule=data, ckpt_path=cfg.ckpt_path)
    metrics = dict(trainer.callback_metrics)
    if throughput.last_val_step != trainer.global_step and trainer.limit_val_batches:
        metrics.update(trainer.validate(task, datamodule=data, verbose=False)[0])
    if cfg.run_test and trainer.limit_test_batches:
        metrics.update(trainer.test(task, datamodule=data, verbose=False)[0])
    metrics.update(extras)
    summary = {}
    if trainer.is_global_zero:
        summary = write_summary(
            Path(cfg.output_dir) / "summary.json",
            choices=job["choices"],
            metrics=metrics,
            steps=trainer.global_step,
            wall_time_s=time.perf_counter() - started,
            rates=throughput.rates(task),
        )
        print_results(summary, Path(cfg.output_dir))
    return summary


def use_global_rank() -> int:
    """Tell Lightning this process's global rank before any logger exists, so that only rank 0
    creates a logger's experiment (one wandb run, one TensorBoard writer per job). Lightning
    reads it when first imported, which in a spawned worker can come before the launcher has
    set RANK; loggers built then would each start their own run."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    rank_zero_only.rank = rank
    return rank


def job_info() -> dict:
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    return {
        "choices": {g: c for g, c in hydra_cfg.runtime.choices.items() if not g.startswith("hydra")},
        "sweep_group": Path(hydra_cfg.sweep.dir).name if multirun else None,
    }


def run_job(cfg: DictConfig) -> dict:
    """Run in this process (one device, or already launched by torchrun/SLURM), or spawn workers."""
    from giantpipe.platform.launch import launched_externally, spawn, start_worker_server

    world = cfg.trainer.devices * cfg.trainer.num_nodes
    job = job_info()
    if cfg.strategy.name == "single" or launched_externally():
        return run(cfg, job)
    if cfg.trainer.num_nodes > 1:
        raise ConfigError(
            f"trainer.num_nodes={cfg.trainer.num_nodes}: multi-node runs are started on every node by torchrun or "
            "SLURM (see 'Running on a cluster' in the README)"
        )
    start_worker_server(cfg.model.family)  # imports for the workers while this process imports too
    from giantpipe.platform.build import build_task
    from giantpipe.platform.plan import check_budget

    OmegaConf.resolve(cfg)  # workers have no HydraConfig to resolve ${hydra:...} with
    built = build_task(cfg)  # fail on bad data before starting processes, and fill the data cache once
    check_budget(cfg, built)  # strategy.memory_budget_mb: a plan over it stops here (platform/plan.py)

    placement = [list(r) for r in cfg.strategy.placement] if cfg.strategy.placement else None
    topology = Topology(cfg.strategy.stages, cfg.strategy.replicas, placement)

    def describe(rank: int) -> str:
        stage, replica = topology.coords(rank)
        return f"pipeline stage {stage} (rank {rank}, replica {replica})"

    spawn(run, (cfg, job), world, describe)
    path = Path(cfg.output_dir) / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


@hydra.main(version_base="1.3", config_path=str(preflight.CONF_DIR), config_name="train")
def hydra_app(cfg: DictConfig) -> float | None:
    try:
        summary = run_job(cfg)
    except ConfigError as err:  # bad input found once data or devices are known: one line, no traceback
        log.error("%s", err)
        print(f"giantpipe-train: error: {err}", file=sys.stderr)
        sys.exit(2)
    return summary.get("metrics", {}).get("val/loss")


def main() -> None:
    """Check the whole command line first (one clear message, exit 2), then hand over to Hydra."""
    keep_freed_memory()
    register_schemas()
    args = sys.argv[1:]
    if not HELP_FLAGS & set(args):
        overrides = [a for a in args if not a.startswith("-") and "=" in a]
        try:
            preflight.check(overrides)
        except ConfigError as err:
            print(f"giantpipe-train: error: {err}", file=sys.stderr)
            sys.exit(2)
    hydra_app()


if __name__ == "__main__":
    main()
