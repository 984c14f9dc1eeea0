"""Checks of a composed config that its schema cannot express: values Lightning or torch would
reject after a minute of imports and data preparation, and rules that span groups.

Torch-free (`giantpipe-train` runs these before importing torch or Lightning). The pipeline's
own rules are the strategies' (strategies/rules.py); this module calls them with the config's
numbers and turns their `ValueError` into a `ConfigError` that names the keys.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from giantpipe.platform.config import ConfigError
from giantpipe.platform.model_spec import layer_count
from giantpipe.strategies import rules

SEQ2SEQ_FAMILIES = {"translation", "speech"}
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
# Lightning's accepted precision strings (lightning.fabric.connector._PRECISION_INPUT_STR), and "auto".
PRECISIONS = ("auto", "64-true", "64", "32-true", "32", "16-true", "16-mixed", "16", "bf16-true",
              "bf16-mixed", "bf16", "transformer-engine", "transformer-engine-float16")


@contextmanager
def as_config_error(keys: str, fix: str = ""):
    """A strategy rule's ValueError, prefixed with the config keys it was given (and a fix in
    the config's terms, where the rule's own words cannot name the key to change)."""
    try:
        yield
    except ValueError as err:
        raise ConfigError(f"{keys}: {err}{f' ({fix})' if fix else ''}") from None


def validate_config(cfg) -> None:
    """Every check, cheapest first; the first failure raises ConfigError naming the fix."""
    check_trainer(cfg.trainer)
    check_optim(cfg.optim, cfg.get("lr_schedule"))
    check_family(cfg)
    check_model(cfg)
    if cfg.strategy.name == "single":
        if cfg.trainer.devices != 1 or cfg.trainer.num_nodes != 1:
            raise ConfigError(
                f"strategy=single runs on one device but trainer.devices={cfg.trainer.devices} "
                f"trainer.num_nodes={cfg.trainer.num_nodes}; use strategy=pipeline for more devices"
            )
        return
    check_pipeline(cfg)


def check_trainer(trainer) -> None:
    """The values lightning.Trainer rejects (or runs forever with), as one sentence each."""
    if trainer.accelerator not in ACCELERATORS:
        raise ConfigError(f"trainer.accelerator={trainer.accelerator!r}: choose {rules.words(ACCELERATORS)}")
    if str(trainer.precision) not in PRECISIONS:
        raise ConfigError(f"trainer.precision={trainer.precision!r}: choose auto, 32-true, bf16-mixed, 16-mixed, "
                          f"64-true or another Lightning precision ({', '.join(PRECISIONS)})")
    for key in ("devices", "num_nodes", "accumulate_grad_batches"):
        if trainer[key] < 1:
            raise ConfigError(f"trainer.{key}={trainer[key]}: must be at least 1")
    for key in ("max_steps", "max_epochs"):
        if trainer[key] < -1:
            raise ConfigError(f"trainer.{key}={trainer[key]}: give a positive number, or -1 for no limit")
    if trainer.max_steps == -1 and trainer.max_epochs == -1:
        raise ConfigError("trainer.max_steps=-1 and trainer.max_epochs=-1 would train forever: set one of them")
    if trainer.log_every_n_steps < 1:
        raise ConfigError(f"trainer.log_every_n_steps={trainer.log_every_n_steps}: must be at least 1")
    clip = trainer.gradient_clip_val
    if clip is not None and clip < 0:
        raise ConfigError(f"trainer.gradient_clip_val={clip}: give a positive norm, or null for no clipping")
    every = trainer.check_val_every_n_epoch
    if every is not None and every < 1:
        raise ConfigError(f"trainer.check_val_every_n_epoch={every}: must be at least 1, or null (count steps)")
    check_batches("val_check_interval", trainer.val_check_interval, zero=False)
    for key in ("limit_val_batches", "limit_test_batches"):
        check_batches(key, trainer[key], zero=True)
    if every is None and isinstance(trainer.val_check_interval, float):
        raise ConfigError(
            f"trainer.val_check_interval={trainer.val_check_interval} is a fraction of an epoch, but "
            "trainer.check_val_every_n_epoch=null counts steps: give a number of steps (int), or set "
            "trainer.check_val_every_n_epoch=1"
        )


def check_batches(key: str, value, zero: bool) -> None:
    """A number of batches (int) or a fraction of the split (float in [0, 1])."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"trainer.{key}={value!r}: give a number of batches (int) or a fraction (float)")
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise ConfigError(f"trainer.{key}={value}: a fraction (float) must lie in [0, 1]; give an int for batches")
    if value < 0 or (not zero and value == 0):
        raise ConfigError(f"trainer.{key}={value}: give a positive number of batches (int) or a fraction (float)")


def check_optim(optim, schedule) -> None:
    """What torch.optim's constructors reject, before the run starts."""
    if optim.lr <= 0:
        raise ConfigError(f"optim.lr={optim.lr}: the learning rate must be positive")
    if optim.get("weight_decay", 0.0) < 0:
        raise ConfigError(f"optim.weight_decay={optim.weight_decay}: must be 0 or more")
    betas = optim.get("betas")
    if betas is not None and (len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas)):
        raise ConfigError(f"optim.betas={list(betas)}: give two decay rates in [0, 1), e.g. [0.9, 0.999]")
    if optim.get("momentum", 0.0) < 0:
        raise ConfigError(f"optim.momentum={optim.momentum}: must be 0 or more")
    if optim.get("nesterov") and (optim.momentum <= 0 or optim.dampening != 0):
        raise ConfigError("optim.nesterov=true needs optim.momentum > 0 and optim.dampening=0")
    if schedule is None:
        return
    if schedule.warmup_steps < 0:
        raise ConfigError(f"lr_schedule.warmup_steps={schedule.warmup_steps}: must be 0 or more")
    if not 0.0 <= schedule.min_lr_ratio <= 1.0:
        raise ConfigError(f"lr_schedule.min_lr_ratio={schedule.min_lr_ratio}: a fraction of the peak LR, in [0, 1]")


def check_model(cfg) -> None:
    """Sizes the models' constructors (or torch's layers) reject."""
    model = cfg.model
    for key, value in model.items():
        if key.endswith(("_size", "_layers", "d_model", "d_ff", "n_heads", "hidden")) and isinstance(value, int) \
                and not isinstance(value, bool) and value < 1:
            raise ConfigError(f"model.{key}={value}: must be at least 1")
    if "dropout" in model and not 0.0 <= model.dropout < 1.0:
        raise ConfigError(f"model.dropout={model.dropout}: a probability in [0, 1)")
    if "n_heads" in model and model.d_model % model.n_heads:
        raise ConfigError(f"model.d_model={model.d_model} does not split into model.n_heads={model.n_heads} heads: "
                          "make d_model a multiple of n_heads")
    if "max_len" in model and "seq_len" in cfg.data and cfg.data.seq_len > model.max_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_len={model.max_len}: "
                          "raise model.max_len or lower data.seq_len")


def check_family(cfg) -> None:
    """Model, data and loss must belong together."""
    model, data, loss = cfg.model, cfg.data, cfg.loss
    if model.family != data.family:
        raise ConfigError(
            f"model={model_name(cfg)} needs {model.family} data but data={choice(cfg, 'data')} is "
            f"{data.family} data; pick a matching data= option"
        )
    if loss.name == "mwer" and model.family not in SEQ2SEQ_FAMILIES:
        raise ConfigError(
            f"loss=mwer scores whole output sequences by their word errors, so it needs a sequence-to-sequence "
            f"model that beam-searches N-best lists (model=gnmt or model=las); model={model_name(cfg)} is a "
            f"{model.family.replace('_', ' ')} that predicts one token at a time and has no words to count: "
            "use loss=cross_entropy"
        )
    if loss.name == "mwer":
        check_mwer(loss)
        check_mwer_start(cfg)


def check_mwer(loss) -> None:
    """The risk, the candidates and their count name something that exists."""
    from giantpipe.models.risks import RISKS  # torch-free

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
    if not Path(str(start)).exists():
        key = "init_from" if cfg.get("init_from") else "ckpt_path"
        raise ConfigError(f"{key}={start}: no such checkpoint file (loss=mwer starts from a trained model)")


def check_pipeline(cfg) -> None:
    """World size, placement, batch split, stage count, balance, schedule, re-materialization."""
    strategy, trainer, data = cfg.strategy, cfg.trainer, cfg.data
    with as_config_error("strategy.stages, strategy.replicas"):
        rules.check_dims(strategy.stages, strategy.replicas)
    if strategy.micro_batches < 1:
        raise ConfigError(f"strategy.micro_batches={strategy.micro_batches}: must be at least 1")
    keys = (f"strategy.stages={strategy.stages} x strategy.replicas={strategy.replicas} on "
            f"trainer.devices={trainer.devices} x trainer.num_nodes={trainer.num_nodes}")
    fix = f"set trainer.devices={max(strategy.stages * strategy.replicas // trainer.num_nodes, 1)}"
    with as_config_error(keys, fix):
        rules.check_world_size(strategy.stages, strategy.replicas, trainer.devices * trainer.num_nodes)
    if strategy.placement:
        with as_config_error(f"strategy.placement={list(strategy.placement)}"):
            rules.check_placement(strategy.placement, strategy.stages, strategy.replicas)
    if data.batch_size % strategy.replicas:
        raise ConfigError(
            f"data.batch_size={data.batch_size} does not split evenly over strategy.replicas={strategy.replicas}"
        )
    per_replica = data.batch_size // strategy.replicas
    if strategy.micro_batches > per_replica:
        raise ConfigError(
            f"strategy.micro_batches={strategy.micro_batches} is larger than the per-replica batch of "
            f"{per_replica}; lower micro_batches or raise data.batch_size"
        )
    layers, chunks = layer_count(cfg.model), strategy.get("virtual_stages", 1)
    if chunks < 1:
        raise ConfigError(f"strategy.virtual_stages={chunks}: must be at least 1")
    parts = strategy.stages * chunks  # virtual stages, each at least one layer
    keys = f"strategy.stages={strategy.stages}" + (f" x strategy.virtual_stages={chunks}" if chunks > 1 else "")
    with as_config_error(f"{keys} with model={model_name(cfg)}"):
        rules.check_stage_count(parts, layers)
    balance = strategy.balance if isinstance(strategy.balance, str) else list(strategy.balance)
    with as_config_error(f"strategy.balance={balance}"):
        rules.check_balance(balance, layers, parts)
    with as_config_error(f"strategy.schedule={strategy.schedule}", "or strategy.schedule=auto"):
        rules.check_schedule(strategy.schedule, strategy.stages, strategy.micro_batches, chunks)
    costs = strategy.get("schedule_costs", "equal")
    with as_config_error(f"strategy.schedule_costs={costs}"):
        rules.check_schedule_costs(costs, strategy.schedule)
    budget = strategy.get("memory_budget_mb")
    if budget is not None and budget <= 0:
        raise ConfigError(f"strategy.memory_budget_mb={budget}: give a positive number of MB, or null")
    with as_config_error(f"strategy.checkpoint={strategy.checkpoint}"):
        rules.check_checkpoint_mode(strategy.checkpoint)


def choice(cfg, group: str) -> str:
    """The option chosen for a group: Hydra's record (inside the app, or composed with the
    config by preflight), else "?"."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if HydraConfig.initialized():
        return str(HydraConfig.get().runtime.choices.get(group))
    return str(OmegaConf.select(cfg, f"hydra.runtime.choices.{group}", default="?"))


def model_name(cfg) -> str:
    """The model option's name, or its class when no Hydra record says which option it was."""
    name = choice(cfg, "model")
    return name if name not in ("?", "None") else cfg.model._target_.rsplit(".", 1)[-1]
