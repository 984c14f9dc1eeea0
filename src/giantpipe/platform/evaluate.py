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

from giantpipe.platform.checkpoint_io import AtomicCheckpointIO
from giantpipe.platform.config import ConfigError
from giantpipe.strategies.stage_checkpoint import CheckpointError, load_checkpoint

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
    # AtomicCheckpointIO reads any checkpoint kind (a pipelined one is consolidated in memory)
    trainer = pl.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                         plugins=[AtomicCheckpointIO()],
                         enable_progress_bar=False, use_distributed_sampler=False,
                         limit_val_batches=cfg.trainer.limit_val_batches,
                         limit_test_batches=cfg.trainer.limit_test_batches)
    run = getattr(trainer, SPLITS[split])
    metrics = {k: float(v) for k, v in run(task, datamodule=data, ckpt_path=str(ckpt), verbose=False)[0].items()}
    return metrics


def load_for_inference(ckpt: Path, overrides: list[str], family: str, what: str):
    """(cfg, data, task on one device with the checkpoint's weights, device) for `--input`."""
    from giantpipe.models.contract import materialize
    from giantpipe.platform.build import build_task
    from giantpipe.platform.tasks.base import LocalRunner

    if not ckpt.exists():
        raise ConfigError(f"checkpoint {ckpt} does not exist")
    cfg = run_config(ckpt, overrides)
    if cfg.model.get("family") != family:
        raise ConfigError(f"--input {what}: {ckpt} is a {cfg.model.get('family')} checkpoint")
    data, task, _ = build_task(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    materialize(task.model, range(len(task.model.layers)), device, cfg.seed)
    try:
        state = load_checkpoint(ckpt)  # any kind: one file, or a manifest and its stage shards
    except CheckpointError as err:
        raise ConfigError(str(err)) from None
    task.load_state_dict(state["state_dict"])
    task.runner = LocalRunner(task.model, task.loss_fn)
    task.eval()
    return cfg, data, task, device


def translate(ckpt: Path, lines: list[str], overrides: list[str]) -> list[str]:
    """Translate source lines with a translation checkpoint (beam settings: model.decode.*)."""
    from giantpipe.platform.data.translation_module import source_batches

    cfg, data, task, device = load_for_inference(ckpt, overrides, "translation", "translates text")
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


def transcribe(ckpt: Path, paths: list[Path], overrides: list[str]) -> list[str]:
    """Transcribe audio files with a speech checkpoint (beam settings: model.decode.*); an
    unreadable file gets an empty transcript and a warning."""
    from giantpipe.platform.data.audio import AudioReadError, decode_audio

    cfg, data, task, device = load_for_inference(ckpt, overrides, "speech", "transcribes audio")
    dataset, collate = data.dataset("train"), data.prepare().collator()
    out = [""] * len(paths)
    items = []
    for row, path in enumerate(paths):
        try:
            features = dataset.features_of(decode_audio(path))
        except AudioReadError as err:
            print(f"giantpipe-eval: skipping unreadable {path}: {err}", file=sys.stderr)
            continue
        items.append({"features": features, "tgt": [], "index": row})
    items.sort(key=lambda item: item["features"].size(0))
    for start in range(0, len(items), cfg.data.batch_size):
        batch = collate(items[start:start + cfg.data.batch_size])
        texts = task.transcribe({k: batch[k].to(device) for k in ("features", "feat_len")})
        for row, text in zip(batch["index"].tolist(), texts):
            out[row] = text
    return out


def audio_inputs(path: Path) -> list[Path]:
    """One audio file, or every audio file in a folder (sorted)."""
    from giantpipe.platform.data.audio import AUDIO_SUFFIXES

    if not path.exists():
        raise ConfigError(f"--input {path} does not exist")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise ConfigError(f"--input {path} holds no audio files ({', '.join(AUDIO_SUFFIXES)})")
    return files


def transcribe_main(args) -> None:
    """--input FILE|DIR: `name<TAB>transcript` lines to stdout; WER (with --refs) to stderr."""
    from giantpipe.platform.data.graphemes import normalize_transcript
    from giantpipe.platform.tasks.speech import word_error_rate

    paths = audio_inputs(Path(args.input))
    hypotheses = transcribe(args.ckpt, paths, args.overrides)
    sys.stdout.write("".join(f"{p.name}\t{h}\n" for p, h in zip(paths, hypotheses)))
    sys.stdout.flush()
    if args.refs:  # "name transcript" lines, the name with or without its suffix
        refs = {}
        for line in args.refs.read_text(encoding="utf-8").splitlines():
            name, _, text = line.strip().partition(" ")
            refs[name] = normalize_transcript(text)
        missing = [p.name for p in paths if p.name not in refs and p.stem not in refs]
        if missing:
            raise ConfigError(f"--refs has no transcript for {missing[:3]} ({len(missing)} files)")
        references = [refs.get(p.name, refs.get(p.stem)) for p in paths]
        wer = 100.0 * word_error_rate(references, hypotheses)
        print(f"WER {wer:.2f}% over {len(paths)} files", file=sys.stderr)
        if args.out:
            args.out.write_text(json.dumps({"wer": wer, "files": len(paths)}, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="giantpipe-eval", description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", type=Path, help="a checkpoint written by giantpipe-train")
    parser.add_argument("--split", default="test", help="val or test (default: test)")
    parser.add_argument("--out", type=Path, help="also write the metrics as JSON here")
    parser.add_argument("--input", help="translation: translate this text file ('-': stdin) to stdout; "
                        "speech: transcribe this audio file or folder of audio files")
    parser.add_argument("--refs", type=Path, help="with --input: reference translations, one a line (prints "
                        "BLEU), or 'name transcript' lines for audio files (prints WER)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. trainer.limit_test_batches=10")
    args = parser.parse_intermixed_args(argv)  # overrides may follow options
    if args.input is not None:
        try:
            if not args.ckpt.exists():
                raise ConfigError(f"checkpoint {args.ckpt} does not exist")
            family = run_config(args.ckpt, args.overrides).model.get("family")
            (transcribe_main if family == "speech" else translate_main)(args)
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
