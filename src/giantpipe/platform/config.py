"""Structured-config schemas (one dataclass per config group option) and cross-field checks.

Each YAML option in `conf/<group>/` starts from its schema here (`defaults: [<name>_schema]`),
so a misspelt key, a wrong type or a value outside a choice list fails while Hydra composes,
before anything runs. Checks of values and across groups live in `checks.py` (`validate`), which
raises `ConfigError` with a sentence that says what to change. This module imports no torch:
the command line is checked in about a second.

Choice fields are `StrEnum`s: OmegaConf 2.3 rejects `typing.Literal` fields but validates Enum
ones (a value is taken by member name, the error lists the members), and a `StrEnum` member is
a `str`, so the code downstream compares it with plain strings. The pipeline's choice lists are
built from the strategies' own (strategies/rules.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from giantpipe.platform.data.cache import CACHE_DIR
from giantpipe.platform.data.hf import HF_SPLITS
from giantpipe.strategies.rules import CheckpointMode, ScheduleCosts, ScheduleName


class ConfigError(ValueError):
    """A configuration that composes but cannot run; the message says the fix."""


# ---------------------------------------------------------------- model
@dataclass
class GiantNetConfig:
    """Decoder-only Transformer LM (DESIGN §7 'giant net')."""

    _target_: str = "giantpipe.models.giant_net.GiantNet"  # the model class
    family: str = "language_model"  # which data and task go with it (platform/build.py)
    vocab_size: int = 256  # overwritten from the data's tokenizer
    d_model: int = 128  # width of the residual stream
    n_layers: int = 4  # Transformer blocks; the layer list adds an embedding and a head
    n_heads: int = 4  # attention heads; must divide d_model
    d_ff: int = 512  # width of each block's feed-forward layer
    max_len: int = 256  # longest sequence (learned positions); data.seq_len must fit
    dropout: float = 0.1  # on embeddings, attention and feed-forward outputs


@dataclass
class GiantConvConfig:
    """Causal convolution LM with BatchNorm: exercises micro-batch statistics."""

    _target_: str = "giantpipe.models.giant_conv.GiantConvNet"  # the model class
    family: str = "language_model"  # which data and task go with it
    vocab_size: int = 256  # overwritten from the data's tokenizer
    d_model: int = 128  # channels
    n_layers: int = 6  # convolution blocks; the layer list adds an embedding and a head
    kernel_size: int = 5  # causal kernel width, in tokens
    max_len: int = 256  # longest sequence (learned positions); data.seq_len must fit
    dropout: float = 0.1  # after each block


@dataclass
class DecodeConfig:
    """Beam search for validation/test BLEU and giantpipe-eval, scored as in GNMT (DESIGN §7):
    log P / lp + cp with lp = ((5 + |Y|) / 6) ** alpha and cp = beta * sum_i log min(sum_j p_ij, 1)."""

    beam_size: int = 5  # 1 is greedy decoding
    alpha: float = 0.6  # length-penalty exponent (NVIDIA GNMT v2: len_norm_factor 0.6)
    beta: float = 0.1  # coverage-penalty weight (NVIDIA GNMT v2: cov_penalty_factor 0.1)
    max_len: int | None = 150  # hard cap on output tokens, EOS included
    max_len_a: float | None = 2.0  # and per sentence at most floor(a * source length + b)
    max_len_b: float = 10.0  # the per-sentence cap's constant term
    num_samples: int = 8  # sample translations logged (as a table) per evaluation


@dataclass
class GNMTConfig:
    """GNMT v2 (DESIGN §7): bidirectional first encoder layer, residuals from layer 3,
    attention queried by the bottom decoder layer and fed to the upper ones."""

    _target_: str = "giantpipe.models.gnmt.GNMT"  # the model class
    family: str = "translation"  # which data and task go with it
    src_vocab_size: int = 1000  # overwritten from the data's wordpieces
    tgt_vocab_size: int = 1000  # overwritten from the data's wordpieces
    hidden_size: int = 256  # LSTM width (each direction of encoder layer 1)
    num_encoder_layers: int = 4  # counting the bidirectional first layer
    num_decoder_layers: int = 4  # counting the attention layer
    embedding_size: int | None = None  # defaults to hidden_size
    dropout: float = 0.2  # on the input of every LSTM layer
    attention: str = "normalized_bahdanau"  # normalized_bahdanau | bahdanau | dot
    init_weight: float = 0.1  # parameters start uniform in (-w, w)
    decode: DecodeConfig = field(default_factory=DecodeConfig)  # beam search for BLEU


@dataclass
class LASDecodeConfig(DecodeConfig):
    """Beam search for LAS: the length cap is per listener frame (8 per 80 ms at 3 pyramid levels)."""

    beam_size: int = 4  # hypotheses kept per step for WER decoding (1 is greedy)
    alpha: float = 0.6  # length-penalty exponent
    beta: float = 0.0  # no coverage penalty: a pyramidal listener's attention is not one-to-one
    max_len: int | None = 300  # graphemes, EOS included
    max_len_a: float | None = 3.0  # and per utterance at most floor(a * listener frames + b)
    max_len_b: float = 10.0  # the per-utterance cap's constant term


@dataclass
class LASConfig:
    """Listen, Attend and Spell (DESIGN §7): pyramidal BLSTM listener, attention, LSTM speller
    over graphemes."""

    _target_: str = "giantpipe.models.las.LAS"  # the model class
    family: str = "speech"  # which data and task go with it
    vocab_size: int = 32  # overwritten from the data's graphemes
    n_mels: int = "${data.n_mels}"  # type: ignore[assignment]  # the features' width
    listener_hidden: int = 256  # each direction of every BLSTM
    listener_layers: int = 4  # BLSTM layers over the frames
    pyramid_levels: int = 3  # listener layers 2..levels+1 halve time: reduction 2**levels
    frame_stack: int = 1  # the first listener layer reads this many frames at a time
    speller_hidden: int = 512  # LSTM width of the speller
    speller_layers: int = 2  # counting the attention layer
    embedding_size: int | None = None  # defaults to speller_hidden
    dropout: float = 0.1  # on the input of every LSTM layer
    attention: str = "normalized_bahdanau"  # normalized_bahdanau | bahdanau | dot
    init_weight: float = 0.1  # parameters start uniform in (-w, w)
    decode: LASDecodeConfig = field(default_factory=LASDecodeConfig)  # beam search for WER


# ---------------------------------------------------------------- data
@dataclass
class TextDataConfig:
    """Text for the language model: stdlib source (embedded), a HF dataset, or local files."""

    family: str = "language_model"  # the task family; checked against model.family
    source: str = "stdlib"  # stdlib | hf | files
    name: str | None = None  # HF dataset name (source=hf)
    config_name: str | None = None  # HF dataset configuration (source=hf)
    hf_split: str = "train"  # the HF split read and cut into train/val/test (source=hf)
    text_field: str = "text"  # the record field holding the text (source=hf)
    paths: list[str] = field(default_factory=list)  # source=files: text files or globs
    max_bytes: int = 4_000_000  # source=stdlib: how much source text to read
    tokenizer: str = "bytes"  # bytes | bpe
    vocab_size: int = 4096  # tokenizer=bpe
    seq_len: int = 128  # tokens per training sequence
    batch_size: int = 32  # global batch (all replicas together)
    val_fraction: float = 0.03  # share of the text held out for validation
    test_fraction: float = 0.03  # ... and for test
    num_workers: int = 0  # DataLoader worker processes
    cache_dir: str = CACHE_DIR  # prepared corpora and tokenizers (GIANTPIPE_CACHE)


@dataclass
class TranslationDataConfig:
    """Sentence pairs: the embedded En->De verbalization corpus, local files or a HF dataset."""

    family: str = "translation"  # the task family; checked against model.family
    source: str = "default"  # default | files | hf
    src_lang: str = "en"  # source language key of the records
    tgt_lang: str = "de"  # target language key
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
    hf_splits: dict[str, str] = field(default_factory=lambda: dict(HF_SPLITS))  # our split -> hub split
    size: int = 40_000  # source=default: pairs generated
    split_seed: int = 0  # generates the default corpus and cuts splits; not the run's seed,
    # so runs with different seeds share one test set
    val_size: int = 1000  # distinct source sentences cut off for validation (when cutting)
    test_size: int = 1000  # ... and for test
    max_words: int | None = 250  # pairs with longer sentences are skipped (and counted)
    tokenizer: str = "bpe"  # bpe | unigram | wordpiece, trained on the train split
    tokenizer_sample: int = 500_000  # wordpieces train on a uniform sample of this many train pairs
    vocab_size: int = 1000  # wordpiece vocabulary size
    shared_vocab: bool = True  # one vocabulary for both languages
    max_tokens: int | None = 128  # training pairs longer than this (in wordpieces) are skipped
    eval_max_tokens: int | None = None  # the same for validation/test (None keeps all)
    batch_size: int = 64  # global batch (all replicas together)
    pool_batches: int = 50  # length bucketing: sort within pools of this many batches
    num_workers: int = 0  # DataLoader worker processes
    cache_dir: str = CACHE_DIR  # prepared corpora and tokenizers (GIANTPIPE_CACHE)


@dataclass
class SpecAugmentConfig:
    """Frequency and time masks on training features (Park et al. 2019); 0 masks turn it off."""

    freq_masks: int = 2  # frequency masks per utterance
    freq_width: int = 27  # widest frequency mask, in mel bins
    time_masks: int = 2  # time masks per utterance
    time_width: int = 40  # widest time mask, in frames
    max_time_ratio: float = 0.2  # a time mask covers at most this share of the utterance


@dataclass
class SpeechDataConfig:
    """Utterances and transcripts: the embedded eSpeak corpus, local audio files or a HF dataset."""

    family: str = "speech"  # the task family; checked against model.family
    source: str = "default"  # default | files | hf
    # source=default: synthesized once and cached; validation and test use held-out voices
    train_size: int = 4000  # utterances synthesized per split
    val_size: int = 300
    test_size: int = 300
    corpus_seed: int = 0  # generates the default corpus; not the run's seed
    noise_prob: float = 0.5  # share of utterances with additive noise (SNR 10-30 dB)
    # source=files: a transcript file per split (LibriSpeech *.trans.txt / Kaldi `text` lines
    # "name transcript", or .jsonl/.csv with file_name + text), audio resolved beside it
    train_paths: list[str] = field(default_factory=list)
    validation_paths: list[str] = field(default_factory=list)
    test_paths: list[str] = field(default_factory=list)
    audio_dir: str | None = None  # where audio files live when not beside the transcripts
    # source=hf: {"audio": {"array", "sampling_rate"}, "text"} records
    hf_name: str | None = None  # e.g. librispeech_asr
    hf_config: str | None = None  # e.g. clean
    hf_splits: dict[str, str] = field(default_factory=lambda: dict(HF_SPLITS))  # our split -> hub split
    streaming: bool = False  # read the hub's shards as they come (no full download)
    audio_field: str = "audio"  # record fields (source=hf)
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
    num_workers: int = 0  # DataLoader worker processes
    cache_dir: str = CACHE_DIR  # prepared corpora and tokenizers (GIANTPIPE_CACHE)


# ---------------------------------------------------------------- loss
@dataclass
class CrossEntropyConfig:
    """Token-level cross-entropy (teacher forcing), summed over tokens and divided by their count."""

    name: str = "cross_entropy"  # fixed by the option
    label_smoothing: float = 0.0  # share of the target's probability spread over the vocabulary


@dataclass
class MWERConfig:
    """Minimum risk over N candidates (Prabhavalkar et al. 2018; GNMT's expected GLEU; MRT)."""

    name: str = "mwer"  # fixed by the option
    nbest: int = 4  # N: beam-search hypotheses or samples per item
    ce_weight: float = 0.01  # + ce_weight x CE (MWER 0.01, GNMT's alpha 0.017)
    label_smoothing: float = 0.0  # of that cross-entropy term
    risk: str = "word_errors"  # word_errors | char_errors | gleu | sentence_bleu | chrf
    candidates: str = "beam"  # beam (N-best list) | sample (N samples, MRT-style)
    sample_temperature: float = 1.0  # candidates=sample draws from softmax(logits / temperature)


# ---------------------------------------------------------------- strategy
@dataclass
class SingleStrategyConfig:
    """Plain Lightning on one device."""

    name: str = "single"  # fixed by the option


@dataclass
class PipelineStrategyConfig:
    """GPipe: `stages` composite layers x `replicas` data-parallel copies of each. The choice
    lists and rules are the strategies' own (strategies/rules.py, strategies/schedule.py)."""

    name: str = "pipeline"  # fixed by the option
    stages: int = 2  # composite layers, one process each (per replica)
    replicas: int = 1  # data-parallel copies of the whole pipeline; stages x replicas = devices
    micro_batches: int = 4  # each replica's batch is cut into this many, run through the schedule
    schedule: ScheduleName = ScheduleName.gpipe  # order of work on each stage; auto: profiled choice
    virtual_stages: int = 1  # chunks per stage (V): interleaved_1f1b, zb_h1/zb_h2 any V, zbv/dualpipev V=2
    schedule_costs: ScheduleCosts = ScheduleCosts.equal  # zb_h1/zb_h2/zbv built for one clock per F/B/W, or profiled: for F/B/W times measured in 3 steps at start-up
    checkpoint: CheckpointMode = CheckpointMode.except_last  # re-materialization: which micro-batches recompute
    balance: Any = "params"  # layer counts per stage ([3, 3]), or automatic: params | time | memory
    placement: Any = None  # ranks of each stage's replicas ([[0, 2], [1, 3]]); default pipeline-major
    timeout_s: float = 300.0  # a stage silent this long is reported as dead
    deferred_batch_norm: bool = False  # BatchNorm running statistics of the whole mini-batch
    timeline: bool = False  # record per-stage timings: metrics every step, timeline.png + trace at the end
    memory_budget_mb: float | None = None  # MiB per process: over it by giantpipe-plan stops before training; a stage over it at run time fails, named; auto skips schedules predicted to hold more activations


# ---------------------------------------------------------------- trainer / optimizer
@dataclass
class TrainerConfig:
    """The subset of `lightning.Trainer` arguments giantpipe exposes (checked in checks.py)."""

    accelerator: str = "auto"  # auto | cpu | gpu | cuda | mps
    devices: int = 1  # processes on this node; stages x replicas under strategy=pipeline
    num_nodes: int = 1  # nodes (multi-node runs start under torchrun or SLURM)
    precision: str = "auto"  # auto: bf16-mixed on GPU, 32-true on CPU; or any Lightning precision
    max_steps: int = 400  # optimizer steps to train; -1: until max_epochs
    max_epochs: int = -1  # -1: until max_steps
    val_check_interval: Any = 200  # validate every this many training steps (a float: fraction of an epoch)
    check_val_every_n_epoch: int | None = None  # null: val_check_interval counts steps across epochs
    limit_val_batches: Any = 20  # validation batches per check (int), or a fraction of the split (float)
    limit_test_batches: Any = 40  # test batches (int), or a fraction of the split (float)
    log_every_n_steps: int = 10  # how often training metrics reach the loggers
    gradient_clip_val: float | None = 1.0  # clip the global gradient norm (all stages) to this; null: off
    accumulate_grad_batches: int = 1  # batches summed into one optimizer step
    deterministic: bool = False  # torch's deterministic algorithms (slower)
    enable_progress_bar: bool = True  # the rich progress bar (callbacks=default)


# ---------------------------------------------------------------- optimizer and LR schedule
@dataclass
class AdamWConfig:
    """torch.optim.AdamW (decoupled weight decay). Every optimizer is a partial (`_partial_`):
    the task passes its parameter groups, weight decay on matrices and none on vectors."""

    _target_: str = "torch.optim.AdamW"  # any torch.optim-style class taking (params, lr=...)
    _partial_: bool = True  # built by the task with its parameter groups
    lr: float = 3e-3  # peak learning rate; lr_schedule scales it each step
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # moment decay rates
    eps: float = 1e-8  # added to the second moment's root
    weight_decay: float = 0.01  # decoupled decay of matrices (biases and norms get none)


@dataclass
class AdamConfig(AdamWConfig):
    """torch.optim.Adam: weight decay, if any, is L2 added to the gradient (not decoupled)."""

    _target_: str = "torch.optim.Adam"
    weight_decay: float = 0.0  # L2 penalty on matrices


@dataclass
class SGDConfig:
    """torch.optim.SGD with (Nesterov) momentum."""

    _target_: str = "torch.optim.SGD"
    _partial_: bool = True
    lr: float = 0.1  # peak learning rate; lr_schedule scales it each step
    momentum: float = 0.9  # 0 turns momentum off
    dampening: float = 0.0  # must be 0 with nesterov
    nesterov: bool = False  # Nesterov's look-ahead momentum (needs momentum > 0)
    weight_decay: float = 0.0  # L2 penalty on matrices


@dataclass
class AdafactorConfig:
    """torch.optim.Adafactor (Shazeer & Stern 2018): factored second moments, no first moment,
    so its state is a row and a column vector per matrix instead of two full copies."""

    _target_: str = "torch.optim.Adafactor"
    _partial_: bool = True
    lr: float = 1e-2  # peak learning rate; lr_schedule scales it each step
    beta2_decay: float = -0.8  # second-moment decay follows 1 - step ** beta2_decay
    eps: list[float | None] = field(default_factory=lambda: [None, 1e-3])  # denominator, update-clip floors
    d: float = 1.0  # update clipping threshold
    weight_decay: float = 0.0  # decoupled decay of matrices


class LRScheduleName(StrEnum):
    cosine = "cosine"  # cosine decay to min_lr_ratio at max_steps
    constant = "constant"  # flat after warmup
    inverse_sqrt = "inverse_sqrt"  # sqrt(warmup / step) after warmup (Transformer-style)


@dataclass
class LRScheduleConfig:
    """A multiplier on optim.lr per optimizer step: linear warmup, then the named decay."""

    name: LRScheduleName = LRScheduleName.cosine  # the decay after warmup
    warmup_steps: int = 50  # linear ramp from lr / warmup_steps to lr
    min_lr_ratio: float = 0.1  # cosine: the last step's LR as a fraction of the peak


GROUP_SCHEMAS = {
    "model": {"giant_net": GiantNetConfig, "giant_conv": GiantConvConfig, "gnmt": GNMTConfig,
              "las": LASConfig},
    "data": {"stdlib_text": TextDataConfig, "translation": TranslationDataConfig,
             "speech": SpeechDataConfig},
    "loss": {"cross_entropy": CrossEntropyConfig, "mwer": MWERConfig},
    "strategy": {"single": SingleStrategyConfig, "pipeline": PipelineStrategyConfig},
    "trainer": {"default": TrainerConfig},
    "optim": {"adamw": AdamWConfig, "adam": AdamConfig, "sgd": SGDConfig, "adafactor": AdafactorConfig},
    "lr_schedule": {"lr_schedule": LRScheduleConfig},
}


def register_schemas() -> None:
    cs = ConfigStore.instance()
    for group, options in GROUP_SCHEMAS.items():
        for name, node in options.items():
            cs.store(group=group, name=f"{name}_schema", node=node)


__all__ = ["ConfigError", "register_schemas", "MISSING"]
