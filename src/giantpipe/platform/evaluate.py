"""`giantpipe-eval CKPT`: evaluate a saved checkpoint on a split with the config it was trained with.

The run's composed config is read from the Hydra directory beside the checkpoint
(`<run>/.hydra/config.yaml`), so no flags need repeating; `key=value` overrides still apply.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
from omegaconf import OmegaConf

from giantpipe.platform.config import ConfigError

SPLITS = {"val": "validate", "validation": "validate", "test": "test"}


def run_config(ckpt: Path, overrides: list[str]):
    for parent in ckpt.resolve().parents:
        config = parent / ".hydra" / "config.yaml"
        if config.exists():
            cfg = OmegaConf.load(config)
            cfg.merge_with(OmegaConf.from_dotlist(overrides))
            cfg.output_dir = str(parent)
            return cfg
    raise ConfigError(f"no .hydra/config.yaml above {ckpt}; evaluate a checkpoint inside its run directory")


def evaluate(ckpt: Path, split: str, overrides: list[str]) -> dict:
    from giantpipe.platform.build import build_task

    if not ckpt.exists():
        raise ConfigError(f"checkpoint {ckpt} does not exist")
    if split not in SPLITS:
        raise ConfigError(f"--split {split}: choose one of {', '.join(SPLITS)}")
    cfg = run_config(ckpt, overrides)
    data, task, _ = build_task(cfg)
    trainer = pl.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, use_distributed_sampler=False,
                         limit_val_batches=cfg.trainer.limit_val_batches,
                         limit_test_batches=cfg.trainer.limit_test_batches)
    run = getattr(trainer, SPLITS[split])
    metrics = {k: float(v) for k, v in run(task, datamodule=data, ckpt_path=str(ckpt), verbose=False)[0].items()}
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="giantpipe-eval", description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", type=Path, help="a checkpoint written by giantpipe-train")
    parser.add_argument("--split", default="test", help="val or test (default: test)")
    parser.add_argument("--out", type=Path, help="also write the metrics as JSON here")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. trainer.limit_test_batches=10")
    args = parser.parse_args(argv)
    try:
        metrics = evaluate(args.ckpt, args.split, args.overrides)
    except ConfigError as err:
        print(f"giantpipe-eval: error: {err}", file=sys.stderr)
        sys.exit(2)
    text = json.dumps(metrics, indent=2, sort_keys=True)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
