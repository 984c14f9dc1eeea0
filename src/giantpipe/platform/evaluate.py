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
import torch
from omegaconf import OmegaConf

from giantpipe.platform.config import ConfigError
from giantpipe.strategies.stage_checkpoint import atomic_save, consolidate

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
    if "giantpipe_shards" in torch.load(ckpt, map_location="cpu", weights_only=False):
        merged = ckpt.with_name(f"{ckpt.stem}.consolidated.ckpt")  # a pipelined checkpoint: one file first
        atomic_save(consolidate(ckpt), merged)
        ckpt = merged
    data, task, _ = build_task(cfg)
    trainer = pl.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, use_distributed_sampler=False,
                         limit_val_batches=cfg.trainer.limit_val_batches,
                         limit_test_batches=cfg.trainer.limit_test_batches)
    run = getattr(trainer, SPLITS[split])
    metrics = {k: float(v) for k, v in run(task, datamodule=data, ckpt_path=str(ckpt), verbose=False)[0].items()}
    return metrics


def single_file(ckpt: Path) -> Path:
    """A pipelined checkpoint (manifest + stage shards) consolidated into one file; else `ckpt`."""
    if "giantpipe_shards" not in torch.load(ckpt, map_location="cpu", weights_only=False):
        return ckpt
    merged = ckpt.with_name(f"{ckpt.stem}.consolidated.ckpt")
    atomic_save(consolidate(ckpt), merged)
    return merged


def translate(ckpt: Path, lines: list[str], overrides: list[str]) -> list[str]:
    """Translate source lines with a translation checkpoint (beam settings: model.decode.*)."""
    from giantpipe.models.contract import materialize
    from giantpipe.platform.build import build_task
    from giantpipe.platform.data.translation_module import source_batches
    from giantpipe.platform.tasks.base import LocalRunner

    if not ckpt.exists():
        raise ConfigError(f"checkpoint {ckpt} does not exist")
    cfg = run_config(ckpt, overrides)
    if cfg.model.get("family") != "translation":
        raise ConfigError(f"--input translates text: {ckpt} is a {cfg.model.get('family')} checkpoint")
    data, task, _ = build_task(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    materialize(task.model, range(len(task.model.layers)), device, cfg.seed)
    state = torch.load(single_file(ckpt), map_location=device, weights_only=False)
    task.load_state_dict(state["state_dict"])
    task.runner = LocalRunner(task.model, task.loss_fn)
    task.eval()
    out = [""] * len(lines)
    for rows, batch in source_batches(lines, data.src_vocab, cfg.data.batch_size, data.src_vocab.pad_id):
        for row, text in zip(rows, task.translate({k: v.to(device) for k, v in batch.items()})):
            out[row] = text
    return out


def translate_main(args) -> None:
    """--input FILE|-: translations to stdout, one a line; BLEU (with --refs) to stderr."""
    from giantpipe.platform.data.translation import corpus_bleu

    source = sys.stdin if str(args.input) == "-" else open(args.input, encoding="utf-8")
    with source:
        lines = [line.rstrip("\n") for line in source]
    hypotheses = translate(args.ckpt, lines, args.overrides)
    sys.stdout.write("".join(h + "\n" for h in hypotheses))
    sys.stdout.flush()
    if args.refs:
        references = args.refs.read_text(encoding="utf-8").splitlines()
        if len(references) != len(lines):
            raise ConfigError(f"--refs has {len(references)} lines but the input has {len(lines)}")
        bleu = corpus_bleu(hypotheses, references)
        print(f"BLEU {bleu.score:.2f}  {bleu.text}", file=sys.stderr)
        if args.out:
            args.out.write_text(json.dumps({"bleu": bleu.score, "bleu_signature": bleu.signature}, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="giantpipe-eval", description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", type=Path, help="a checkpoint written by giantpipe-train")
    parser.add_argument("--split", default="test", help="val or test (default: test)")
    parser.add_argument("--out", type=Path, help="also write the metrics as JSON here")
    parser.add_argument("--input", help="translation: translate this text file ('-': stdin) to stdout")
    parser.add_argument("--refs", type=Path, help="with --input: reference translations, one a line; prints BLEU")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. trainer.limit_test_batches=10")
    args = parser.parse_intermixed_args(argv)  # overrides may follow options
    if args.input is not None:
        try:
            translate_main(args)
        except ConfigError as err:
            print(f"giantpipe-eval: error: {err}", file=sys.stderr)
            sys.exit(2)
        return
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
