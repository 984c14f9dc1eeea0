"""Turn a composed config into the objects Lightning needs: data, task, loggers, trainer.

Each builder gets only its own slice of the config. Model families register here: the family
names the data module and the task that go with a model.
"""

from __future__ import annotations

import os
from pathlib import Path

import hydra
import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf

from giantpipe.platform.callbacks import FinalCheckpoint
from giantpipe.platform.checkpoint_io import AtomicCheckpointIO
from giantpipe.platform.model_spec import model_factory
from giantpipe.platform.pipeline_metrics import PipelineMetrics
from giantpipe.platform.summary import ThroughputMonitor


def optim_settings(cfg: DictConfig) -> DictConfig:
    """What a task needs to build its optimizer: the `optim` option and the `lr_schedule` option
    (absent from a run directory's config written before the LR schedule was its own group;
    evaluation builds no optimizer)."""
    return OmegaConf.create({"optimizer": cfg.optim, "lr_schedule": cfg.get("lr_schedule")})


def build_language_model(cfg: DictConfig):
    from giantpipe.platform.data.text import TextDataModule
    from giantpipe.platform.tasks.language_model import LanguageModelTask

    data = TextDataModule(cfg.data, batch_size=cfg.data.batch_size, seed=cfg.seed)
    data.prepare()
    bytes_per_token = {s: data.stats[f"{k}_bytes_per_token"] for s, k in
                       (("train", "train"), ("val", "validation"), ("test", "test"))}
    task = LanguageModelTask(
        model_factory(cfg.model, vocab_size=data.vocab_size),
        optim=optim_settings(cfg),
        seed=cfg.seed,
        bytes_per_token=bytes_per_token,
        label_smoothing=cfg.loss.label_smoothing,
    )
    extras = {"data/unigram_bpb": data.stats["unigram_bpb"]}
    return data, task, extras


def build_translation(cfg: DictConfig):
    """GNMT on sentence pairs: vocabulary sizes and padding come from the data's wordpieces;
    cross-entropy or risk training (`loss=mwer`, e.g. GNMT's expected GLEU: `loss.risk=gleu`)."""
    from giantpipe.platform.data.translation import corpus_bleu
    from giantpipe.platform.data.translation_module import TranslationDataModule
    from giantpipe.platform.tasks.translation import TranslationTask

    pipeline = cfg.strategy.name == "pipeline"
    min_eval_batch = cfg.strategy.micro_batches * cfg.strategy.replicas if pipeline else 1
    data = TranslationDataModule(cfg.data, batch_size=cfg.data.batch_size, seed=cfg.seed,
                                 min_eval_batch=min_eval_batch)
    data.prepare()
    src, tgt = data.src_vocab, data.tgt_vocab
    factory = model_factory(cfg.model, src_vocab_size=src.vocab_size, tgt_vocab_size=tgt.vocab_size,
                            pad_id=tgt.pad_id)
    task = TranslationTask(factory, optim=optim_settings(cfg), seed=cfg.seed, loss=cfg.loss,
                           decode=OmegaConf.to_container(cfg.model.decode, resolve=True),
                           src_vocab=src, tgt_vocab=tgt)
    extras = {"bleu_signature": corpus_bleu([""], [""]).signature}
    return data, task, extras


def build_speech(cfg: DictConfig):
    """LAS on utterances: the grapheme vocabulary and padding come from the data."""
    from giantpipe.platform.data.speech_module import SpeechDataModule
    from giantpipe.platform.tasks.speech import SpeechTask

    pipeline = cfg.strategy.name == "pipeline"
    min_eval_batch = cfg.strategy.micro_batches * cfg.strategy.replicas if pipeline else 1
    data = SpeechDataModule(cfg.data, batch_size=cfg.data.batch_size, seed=cfg.seed,
                            min_eval_batch=min_eval_batch)
    vocab = data.prepare().vocab
    factory = model_factory(cfg.model, vocab_size=vocab.vocab_size, pad_id=vocab.pad_id)
    task = SpeechTask(factory, optim=optim_settings(cfg), seed=cfg.seed, loss=cfg.loss,
                      decode=OmegaConf.to_container(cfg.model.decode, resolve=True), vocab=vocab,
                      spec_augment=OmegaConf.to_container(cfg.data.spec_augment, resolve=True))
    return data, task, {}


FAMILIES = {"language_model": build_language_model, "translation": build_translation,
            "speech": build_speech}


def build_task(cfg: DictConfig):
    """(datamodule, task, extra summary metrics) for the configured model family."""
    return FAMILIES[cfg.model.family](cfg)


def build_loggers(cfg: DictConfig, sweep_group: str | None) -> list:
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if node is None:
            continue
        kwargs = {}
        if name == "wandb":
            os.environ.setdefault("WANDB_MODE", "offline")  # online only when the user asks for it
            if sweep_group and node.get("group") is None:
                kwargs["group"] = sweep_group
        logger = hydra.utils.instantiate(node, **kwargs)
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        loggers.append(logger)
    return loggers


def build_callbacks(cfg: DictConfig, has_logger: bool = True) -> tuple[list, ThroughputMonitor]:
    callbacks = [hydra.utils.instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node]
    if not cfg.trainer.enable_progress_bar:
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.ProgressBar)]
    if not has_logger:  # the LR monitor has nowhere to write
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
    if cfg.strategy.name == "pipeline" and cfg.strategy.timeline:
        callbacks.append(PipelineMetrics())
    monitor = ThroughputMonitor()
    finals = [FinalCheckpoint(c) for c in callbacks if isinstance(c, pl.callbacks.ModelCheckpoint) and c.save_last]
    return callbacks + finals + [monitor], monitor


def build_strategy(cfg: DictConfig):
    if cfg.strategy.name == "single":
        return "auto"
    from giantpipe.strategies.lightning_strategy import PipelineStrategy

    return PipelineStrategy(cfg.strategy)


def resolved_precision(precision) -> str:
    """`trainer.precision`, with `auto` made bf16-mixed on a GPU and 32-true elsewhere."""
    if precision == "auto":
        return "bf16-mixed" if torch.cuda.is_available() else "32-true"
    return str(precision)


def build_trainer(cfg: DictConfig, loggers: list, callbacks: list) -> pl.Trainer:
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg["precision"] = resolved_precision(trainer_cfg["precision"])
    return pl.Trainer(
        **trainer_cfg,
        logger=loggers or False,
        callbacks=callbacks,
        strategy=build_strategy(cfg),
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # our GlobalBatchSampler shards by data-parallel replica
        default_root_dir=str(Path(cfg.output_dir)),
        enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks),
    )
