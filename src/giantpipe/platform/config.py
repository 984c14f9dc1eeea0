"""Structured-config schemas (one dataclass per config group option) and cross-field checks.

Each YAML option in `conf/<group>/` starts from its schema here (`defaults: [<name>_schema]`),
so a misspelt key or a wrong type fails while Hydra composes, before anything runs. Checks that
involve several groups live in `validate`, which raises `ConfigError` with a sentence that says
what to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from giantpipe.platform.data.cache import CACHE_DIR
from giantpipe.platform.data.hf import HF_SPLITS


class ConfigError(ValueError):
    """A configuration that composes but cannot run; the message says the fix."""


# ---------------------------------------------------------------- model
@dataclass
class GiantNetConfig:
    """Decoder-only Transformer LM (DESIGN §7 'giant net')."""

    _target_: str = "giantpipe.models.giant_net.GiantNet"
    family: str = "language_model"
    vocab_size: int = 256  # overwritten from the data's tokenizer
    d_model: int = 128
    n_layers: int = 4  # Transformer blocks; the layer list adds an embedding and a head
    n_heads: int = 4
    d_ff: int = 512
    max_len: int = 256
    dropout: float = 0.1


@dataclass
class GiantConvConfig:
    """Causal convolution LM with BatchNorm: exercises micro-batch statistics."""

    _target_: str = "giantpipe.models.giant_conv.GiantConvNet"
    family: str = "language_model"
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 6
    kernel_size: int = 5
    max_len: int = 256
    dropout: float = 0.1


@dataclass
class DecodeConfig:
    """Beam search for validation/test BLEU and giantpipe-eval, scored as in GNMT (DESIGN §7):
    log P / lp + cp with lp = ((5 + |Y|) / 6) ** alpha and cp = beta * sum_i log min(sum_j p_ij, 1)."""

    beam_size: int = 5  # 1 is greedy decoding
    alpha: float = 0.6  # length-penalty exponent (NVIDIA GNMT v2: len_norm_factor 0.6)
    beta: float = 0.1  # coverage-penalty weight (NVIDIA GNMT v2: cov_penalty_factor 0.1)
    max_len: int | None = 150  # hard cap on output tokens, EOS included
    max_len_a: float | None = 2.0  # and per sentence at most floor(a * source length + b)
    max_len_b: float = 10.0
    num_samples: int = 8  # sample translations logged (as a table) per evaluation


@dataclass
class GNMTConfig:
    """GNMT v2 (DESIGN §7): bidirectional first encoder layer, residuals from layer 3,
    attention queried by the bottom decoder layer and fed to the upper ones."""

    _target_: str = "giantpipe.models.gnmt.GNMT"
    family: str = "translation"
    src_vocab_size: int = 1000  # overwritten from the data's wordpieces
    tgt_vocab_size: int = 1000  # overwritten from the data's wordpieces
    hidden_size: int = 256  # LSTM width (each direction of encoder layer 1)
    num_encoder_layers: int = 4  # counting the bidirectional first layer
    num_decoder_layers: int = 4  # counting the attention layer
    embedding_size: int | None = None  # defaults to hidden_size
    dropout: float = 0.2  # on the input of every LSTM layer
    attention: str = "normalized_bahdanau"  # normalized_bahdanau | bahdanau | dot
    init_weight: float = 0.1  # parameters start uniform in (-w, w)
    decode: DecodeConfig = field(default_factory=DecodeConfig)


@dataclass
class LASDecodeConfig(DecodeConfig):
    """Beam search for LAS: the length cap is per listener frame (8 per 80 ms at 3 pyramid levels)."""

    beam_size: int = 4
    alpha: float = 0.6
    beta: float = 0.0  # no coverage penalty: a pyramidal listener's attention is not one-to-one
    max_len: int | None = 300  # graphemes, EOS included
    max_len_a: float | None = 3.0
    max_len_b: float = 10.0


@dataclass
class LASConfig:
    """Listen, Attend and Spell (DESIGN §7): pyramidal BLSTM listener, attention, LSTM speller
    over graphemes."""

    _target_: str = "giantpipe.models.las.LAS"
    family: str = "speech"
    vocab_size: int = 32  # overwritten from the data's graphemes
    n_mels: int = "${data.n_mels}"  # type: ignore[assignment]  # the features' width
    listener_hidden: int = 256  # each direction of every BLSTM
    listener_layers: int = 4
    pyramid_levels: int = 3  # listener layers 2..levels+1 halve time: reduction 2**levels
    frame_stack: int = 1  # the first listener layer reads this many frames at a time
    speller_hidden: int = 512
    speller_layers: int = 2
    embedding_size: int | None = None  # defaults to speller_hidden
    dropout: float = 0.1
    attention: str = "normalized_bahdanau"  # normalized_bahdanau | bahdanau | dot
    init_weight: float = 0.1
    decode: LASDecodeConfig = field(default_factory=LASDecodeConfig)


# ---------------------------------------------------------------- data
@dataclass
class TextDataConfig:
    """Text for the language model: stdlib source (embedded), a HF dataset, or local files."""

    family: str = "language_model"
    source: str = "stdlib"  # stdlib | hf | files
    name: str | None = None  # HF dataset name (source=hf)
    config_name: str | None = None
    hf_split: str = "train"
    text_field: str = "text"
    paths: list[str] = field(default_factory=list)  # source=files: text files or globs
    max_bytes: int = 4_000_000  # source=stdlib: how much source text to read
    tokenizer: str = "bytes"  # bytes | bpe
    vocab_size: int = 4096  # tokenizer=bpe
    seq_len: int = 128
    batch_size: int = 32  # global batch (all replicas together)
    val_fraction: float = 0.03
    test_fraction: float = 0.03
    num_workers: int = 0
    cache_dir: str = CACHE_DIR


@dataclass
class TranslationDataConfig:
    """Sentence pairs: the embedded En->De verbalization corpus, local files or a HF dataset."""

    family: str = "translation"
    source: str = "default"  # default | files | hf
    src_lang: str = "en"
    tgt_lang: str = "de"
    # source=files: one json/jsonl/tsv file or a [source.txt, target.txt] pair, cut into
    # splits by val_size/test_size; or one such entry per split: train_paths, validation_paths
    # and test_paths (all three, or train_paths alone, which is then cut)
    paths: list[str] = field(default_factory=list)
    train_paths: list[str] = field(default_factory=list)
    validation_paths: list[str] = field(default_factory=list)
    test_paths: list[str] = field(default_factory=list)
    hf_name: str | None = None  # source=hf, e.g. wmt16
    hf_config: str | None = None  # e.g. de-en
    streaming: bool = False  # source=hf: read the hub's shards as they come (no full download)
    hf_splits: dict[str, str] = field(default_factory=lambda: dict(HF_SPLITS))
    size: int = 40_000  # source=default: pairs generated
    split_seed: int = 0  # generates the default corpus and cuts splits; not the run's seed,
    # so runs with different seeds share one test set
    val_size: int = 1000  # distinct source sentences cut off for validation (when cutting)
    test_size: int = 1000
    max_words: int | None = 250  # pairs with longer sentences are skipped (and counted)
    tokenizer: str = "bpe"  # bpe | unigram | wordpiece, trained on the train split
    tokenizer_sample: int = 500_000  # wordpieces train on a uniform sample of this many train pairs
    vocab_size: int = 1000
    shared_vocab: bool = True  # one vocabulary for both languages
    max_tokens: int | None = 128  # training pairs longer than this (in wordpieces) are skipped
    eval_max_tokens: int | None = None  # the same for validation/test (None keeps all)
    batch_size: int = 64  # global batch (all replicas together)
    pool_batches: int = 50  # length bucketing: sort within pools of this many batches
    num_workers: int = 0
    cache_dir: str = CACHE_DIR


@dataclass
class SpecAugmentConfig:
    """Frequency and time masks on training features (Park et al. 2019); 0 masks turn it off."""

    freq_masks: int = 2
    freq_width: int = 27
    time_masks: int = 2
    time_width: int = 40
    max_time_ratio: float = 0.2


@dataclass
class SpeechDataConfig:
    """Utterances and transcripts: the embedded eSpeak corpus, local audio files or a HF dataset."""

    family: str = "speech"
    source: str = "default"  # default | files | hf
    # source=default: synthesized once and cached; validation and test use held-out voices
    train_size: int = 4000
    val_size: int = 300
    test_size: int = 300
    corpus_seed: int = 0  # generates the default corpus; not the run's seed
    noise_prob: float = 0.5  # share of utterances with additive noise (SNR 10-30 dB)
    # source=files: a transcript file per split (LibriSpeech *.trans.txt / Kaldi `text` lines
    # "name transcript", or .jsonl/.csv with file_name + text), audio resolved beside it
    train_paths: list[str] = field(default_factory=list)
    validation_paths: list[str] = field(default_factory=list)
    test_paths: list[str] = field(default_factory=list)
    audio_dir: str | None = None
    # source=hf: {"audio": {"array", "sampling_rate"}, "text"} records
    hf_name: str | None = None
    hf_config: str | None = None
    hf_splits: dict[str, str] = field(default_factory=lambda: dict(HF_SPLITS))
    streaming: bool = False  # read the hub's shards as they come (no full download)
    audio_field: str = "audio"
    text_field: str = "text"
    units: str = "graphemes"  # graphemes | wordpieces (BPE trained on the train transcripts)
    vocab_size: int = 500  # units=wordpieces
    n_mels: int = 80  # log-mel, 25 ms window, 10 ms hop
    normalization: str = "utterance"  # utterance | global | none
    cache_features: bool = True  # log-mel frames computed once into memory-mapped shards on
    # disk (false: the decoded audio is stored instead and features are computed per batch)
    spec_augment: SpecAugmentConfig = field(default_factory=SpecAugmentConfig)
    max_seconds: float | None = 30.0  # longer utterances are skipped (and counted)
    batch_size: int = 32  # global batch (all replicas together)
    pool_batches: int = 50  # length bucketing: sort within pools of this many batches
    num_workers: int = 0
    cache_dir: str = CACHE_DIR


# ---------------------------------------------------------------- loss
@dataclass
class CrossEntropyConfig:
    name: str = "cross_entropy"
    label_smoothing: float = 0.0


@dataclass
class MWERConfig:
    """Minimum risk over N candidates (Prabhavalkar et al. 2018; GNMT's expected GLEU; MRT)."""

    name: str = "mwer"
    nbest: int = 4  # N: beam-search hypotheses or samples per item
    ce_weight: float = 0.01  # + ce_weight x CE (MWER 0.01, GNMT's alpha 0.017)
    label_smoothing: float = 0.0
    risk: str = "word_errors"  # word_errors | char_errors | gleu | sentence_bleu | chrf
    candidates: str = "beam"  # beam (N-best list) | sample (N samples, MRT-style)
    sample_temperature: float = 1.0  # candidates=sample draws from softmax(logits / temperature)


# ---------------------------------------------------------------- strategy
@dataclass
class SingleStrategyConfig:
    name: str = "single"


@dataclass
class PipelineStrategyConfig:
    """GPipe: `stages` composite layers x `replicas` data-parallel copies of each."""

    name: str = "pipeline"
    stages: int = 2
    replicas: int = 1
    micro_batches: int = 4
    schedule: str = "gpipe"  # one of strategies.schedule.SCHEDULE_NAMES, or auto (profiled choice)
    virtual_stages: int = 1  # chunks per stage (V): interleaved_1f1b, zb_h1/zb_h2 any V, zbv V=2
    memory_budget_mb: float | None = None  # auto: skip schedules predicted to hold more activations per stage
    checkpoint: str = "except_last"  # always | except_last | never (re-materialization)
    balance: Any = "params"  # list of layer counts per stage, or params | time | memory
    placement: Any = None  # optional list of rank lists, one per stage
    timeout_s: float = 300.0
    deferred_batch_norm: bool = False
    timeline: bool = False  # record per-stage timings: metrics every step, timeline.png + trace at the end
    memory_budget_mb: float | None = None  # MiB per process: over it by giantpipe-plan stops before training; a stage over it at run time fails, named


# ---------------------------------------------------------------- trainer / optimizer
@dataclass
class TrainerConfig:
    """The subset of `lightning.Trainer` arguments giantpipe exposes."""

    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    precision: str = "auto"  # auto: bf16-mixed on GPU, 32-true on CPU
    max_steps: int = 400
    max_epochs: int = -1
    val_check_interval: Any = 200
    check_val_every_n_epoch: int | None = 1  # null: validate every val_check_interval steps across epochs
    limit_val_batches: Any = 20
    limit_test_batches: Any = 40
    log_every_n_steps: int = 10
    gradient_clip_val: float | None = 1.0
    accumulate_grad_batches: int = 1
    deterministic: bool = False
    enable_progress_bar: bool = True


@dataclass
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | constant | inverse_sqrt
    min_lr_ratio: float = 0.1


GROUP_SCHEMAS = {
    "model": {"giant_net": GiantNetConfig, "giant_conv": GiantConvConfig, "gnmt": GNMTConfig,
              "las": LASConfig},
    "data": {"stdlib_text": TextDataConfig, "translation": TranslationDataConfig,
             "speech": SpeechDataConfig},
    "loss": {"cross_entropy": CrossEntropyConfig, "mwer": MWERConfig},
    "strategy": {"single": SingleStrategyConfig, "pipeline": PipelineStrategyConfig},
    "trainer": {"default": TrainerConfig},
    "optim": {"adamw": OptimConfig},
}


def register_schemas() -> None:
    cs = ConfigStore.instance()
    for group, options in GROUP_SCHEMAS.items():
        for name, node in options.items():
            cs.store(group=group, name=f"{name}_schema", node=node)


# ---------------------------------------------------------------- cross-field checks
SEQ2SEQ_FAMILIES = {"translation", "speech"}


def validate(cfg) -> None:
    """Checks that span groups; raise ConfigError naming the keys and the fix."""
    model, data, loss, strategy, trainer = cfg.model, cfg.data, cfg.loss, cfg.strategy, cfg.trainer
    for key in ("val_check_interval", "limit_val_batches", "limit_test_batches"):
        value = trainer.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"trainer.{key}={value!r}: give a number of batches (int) or a fraction (float)")
    if model.family != data.family:
        raise ConfigError(
            f"model={cfg_choice(cfg, 'model')} needs {model.family} data but data={cfg_choice(cfg, 'data')} "
            f"is {data.family} data; pick a matching data= option"
        )
    if loss.name == "mwer" and model.family not in SEQ2SEQ_FAMILIES:
        raise ConfigError(
            f"loss=mwer needs a sequence-to-sequence model with N-best decoding (gnmt or las), "
            f"not model={cfg_choice(cfg, 'model')}; use loss=cross_entropy"
        )
    if loss.name == "mwer":
        check_mwer(loss)
        check_mwer_start(cfg)
    if strategy.name == "single":
        if trainer.devices != 1 or trainer.num_nodes != 1:
            raise ConfigError(
                f"strategy=single runs on one device but trainer.devices={trainer.devices} "
                f"trainer.num_nodes={trainer.num_nodes}; use strategy=pipeline for more devices"
            )
        return
    world = trainer.devices * trainer.num_nodes
    if strategy.stages < 1 or strategy.replicas < 1 or strategy.micro_batches < 1:
        raise ConfigError("strategy.stages, strategy.replicas and strategy.micro_batches must be >= 1")
    if strategy.stages * strategy.replicas != world:
        raise ConfigError(
            f"strategy.stages={strategy.stages} x strategy.replicas={strategy.replicas} = "
            f"{strategy.stages * strategy.replicas} processes, but trainer.devices x trainer.num_nodes = {world}; "
            f"set trainer.devices={strategy.stages * strategy.replicas // trainer.num_nodes} or change the stages"
        )
    per_replica = data.batch_size // strategy.replicas
    if data.batch_size % strategy.replicas:
        raise ConfigError(
            f"data.batch_size={data.batch_size} does not split evenly over strategy.replicas={strategy.replicas}"
        )
    if strategy.micro_batches > per_replica:
        raise ConfigError(
            f"strategy.micro_batches={strategy.micro_batches} is larger than the per-replica batch of "
            f"{per_replica}; lower micro_batches or raise data.batch_size"
        )
    check_partition(cfg)
    from giantpipe.strategies.schedule import check_schedule  # torch-free

    try:
        if strategy.schedule != "auto":  # auto picks the schedule and V itself
            check_schedule(strategy.schedule, strategy.get("virtual_stages", 1))
    except ValueError as err:
        raise ConfigError(f"strategy.schedule={strategy.schedule!r}: {err}; or strategy.schedule=auto") from None
    budget = strategy.get("memory_budget_mb")
    if budget is not None and budget <= 0:
        raise ConfigError(f"strategy.memory_budget_mb={budget}: give a positive number of MB, or null")
    if strategy.checkpoint not in ("always", "except_last", "never"):
        raise ConfigError(f"strategy.checkpoint={strategy.checkpoint!r}: choose always, except_last or never")


def check_mwer(loss) -> None:
    """The risk, the candidates and their count name something that exists."""
    from giantpipe.models.risks import RISKS

    if loss.risk not in RISKS:
        raise ConfigError(f"loss.risk={loss.risk!r}: choose one of {', '.join(RISKS)}")
    if loss.candidates not in ("beam", "sample"):
        raise ConfigError(f"loss.candidates={loss.candidates!r}: choose beam (N-best list) or sample")
    if loss.nbest < 1 or loss.sample_temperature <= 0:
        raise ConfigError(f"loss.nbest={loss.nbest} and loss.sample_temperature="
                          f"{loss.sample_temperature} must be positive")


def check_mwer_start(cfg) -> None:
    """MWER fine-tunes a trained model (its N-best lists are meaningless from random weights)."""
    start = cfg.get("init_from") or cfg.get("ckpt_path")
    if not start:
        raise ConfigError(
            "loss=mwer fine-tunes a trained model: give init_from=PATH, a cross-entropy checkpoint "
            "such as outputs/las/<run>/checkpoints/last.ckpt (or ckpt_path=PATH to resume an MWER run)"
        )
    from pathlib import Path

    if not Path(str(start)).exists():
        key = "init_from" if cfg.get("init_from") else "ckpt_path"
        raise ConfigError(f"{key}={start}: no such checkpoint file (loss=mwer starts from a trained model)")


def check_partition(cfg) -> None:
    """Stage count and explicit balance against the model's layer count (built on meta: free)."""
    from giantpipe.platform.build import layer_count

    strategy = cfg.strategy
    layers = layer_count(cfg.model)
    chunks = strategy.get("virtual_stages", 1)
    if strategy.stages * chunks > layers:
        raise ConfigError(
            f"strategy.stages={strategy.stages} x strategy.virtual_stages={chunks} is more than the {layers} layers "
            f"of model={cfg_choice(cfg, 'model')}; use at most {layers} virtual stages or a deeper model"
        )
    balance = strategy.balance
    if isinstance(balance, str):
        if balance not in ("params", "time", "memory"):
            raise ConfigError(f"strategy.balance={balance!r}: give a list of layer counts, or params, time or memory")
        return
    balance = list(balance)
    parts = strategy.stages * chunks
    if len(balance) != parts or sum(balance) != layers or min(balance) < 1:
        raise ConfigError(
            f"strategy.balance={balance} must give each of the {parts} (virtual) stages at least one layer and sum "
            f"to the model's {layers} layers, e.g. strategy.balance={even_balance(layers, parts)}"
        )


def even_balance(layers: int, stages: int) -> list[int]:
    return [layers // stages + (1 if s < layers % stages else 0) for s in range(stages)]


def cfg_choice(cfg, group: str) -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().runtime.choices.get(group))
    except ValueError:
        return str(cfg.get("choices", {}).get(group, "?"))


__all__ = ["ConfigError", "register_schemas", "validate", "MISSING"]
