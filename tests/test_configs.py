"""Every config combination composes, or fails early with the sentence pinned for it."""

import itertools

import pytest

from giantpipe.platform.checks import validate_config as validate
from giantpipe.platform.config import ConfigError
from giantpipe.platform.preflight import check, compose_train, conf_dir


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


AUX = ["logger", "callbacks", "trainer", "optim", "lr_schedule"]  # independent of the rest: each option once

# What each option is for, written out here (not read from the configs) so a test can fail.
MODEL_FAMILY = {"giant_net": "language_model", "giant_conv": "language_model", "gnmt": "translation",
                "las": "speech"}
DATA_FAMILY = {
    "stdlib_text": "language_model", "text_files": "language_model", "hf_text": "language_model",
    "translation_default": "translation", "translation_files": "translation", "multi30k": "translation",
    "wmt16_de_en": "translation",
    "speech_default": "speech", "speech_files": "speech", "librispeech": "speech", "common_voice": "speech",
}


def expected_error(model: str, data: str, loss: str) -> str | None:
    """The start of the error a combination must get, or None when it must pass."""
    assert model in MODEL_FAMILY and data in DATA_FAMILY, f"new option {model}/{data}: add it to this test's tables"
    family = MODEL_FAMILY[model]
    if family != DATA_FAMILY[data]:
        return f"model={model} needs {family} data but data={data} is {DATA_FAMILY[data]} data"
    if loss == "mwer":
        if family == "language_model":
            return "loss=mwer scores whole output sequences by their word errors"
        return "loss=mwer fine-tunes a trained model: give init_from=PATH"
    return None


def outcome(overrides: list[str]) -> str | None:
    if "strategy=pipeline" in overrides:
        overrides = overrides + ["trainer.devices=2"]
    try:
        validate(compose_train(overrides, choices=True))
    except ConfigError as err:
        return str(err)
    return None


@pytest.mark.parametrize("model", options("model"))
def test_every_group_combination_gets_its_pinned_outcome(model):
    """Each model x data x loss once on one device; the combinations that run, pipelined too."""
    for data, loss in itertools.product(options("data"), options("loss")):
        want = expected_error(model, data, loss)
        for strategy in options("strategy") if want is None else ["single"]:
            combo = [f"model={model}", f"data={data}", f"loss={loss}", f"strategy={strategy}"]
            got = outcome(combo)
            if want is None:
                assert got is None, (combo, got)
            else:
                assert got is not None and got.startswith(want), (combo, got)


def test_every_auxiliary_option_composes():
    for group in AUX:
        for option in options(group):
            assert outcome([f"{group}={option}"]) is None, (group, option)


def test_experiments_and_searches_compose_and_validate_by_training_steps():
    for group in ("experiment", "hparams_search"):
        for name in options(group):
            start = [f"init_from={__file__}"] if "mwer" in name else []  # MWER needs a trained model
            check([f"{group}={name}", *start])
            trainer = compose_train([f"{group}={name}", *start]).trainer
            # whatever the epoch length of the user's data (an epoch shorter than the interval
            # would stop Lightning before the first step)
            assert trainer.check_val_every_n_epoch is None, name
            assert isinstance(trainer.val_check_interval, int), name


PIPE2 = ["strategy=pipeline", "trainer.devices=2"]


@pytest.mark.parametrize(
    "override, words",
    [
        (["model.nme=3"], ["unknown config key 'model.nme'", "n_layers", "valid keys of model"]),
        (["model=gnmtt"], ["unknown choice model=gnmtt", "giant_net"]),
        (["model.n_layers=abc"], ["model.n_layers"]),
        (["sede=1"], ["unknown config key 'sede'", "did you mean 'seed'"]),
        (["model=giant_conv", "model.n_heads=2", "model.d_ff=3"], ["unknown config key 'model.n_heads'", "kernel_size"]),
        (["loss=mwer"], ["loss=mwer scores whole output sequences", "model=giant_net is a language model",
                         "use loss=cross_entropy"]),
        (["optim.warmup_steps=3"], ["lr_schedule.warmup_steps"]),
        (["strategy=pipeline", "trainer.devices=3"], ["strategy.stages=2 x strategy.replicas=1"]),
        ([*PIPE2, "strategy.micro_batches=64"], ["micro_batches=64 is larger"]),
        ([*PIPE2, "strategy.schedule=zigzag"], ["strategy.schedule", "expected one of [gpipe, 1f1b", "zb_h1", "auto"]),
        ([*PIPE2, "strategy.schedule=zbv"], ["not defined for virtual_stages=1", "V in [2]"]),
        ([*PIPE2, "strategy.schedule=dualpipev", "strategy.virtual_stages=2", "strategy.micro_batches=3"],
         ["dualpipev needs micro_batches >= 2 x the 2 stages", "raise strategy.micro_batches to 4"]),
        ([*PIPE2, "strategy.schedule=1f1b", "strategy.schedule_costs=profiled"],
         ["strategy.schedule_costs=profiled: profiled costs rebuild only zb_h1, zb_h2 or zbv",
          "1f1b has a fixed order"]),
        ([*PIPE2, "strategy.schedule_costs=measured"], ["strategy.schedule_costs", "equal, profiled"]),
        ([*PIPE2, "strategy.virtual_stages=4"], ["strategy.virtual_stages=4", "cannot split 6 layers into 8 stages"]),
        ([*PIPE2, "strategy.schedule=auto", "strategy.memory_budget_mb=0"], ["memory_budget_mb=0"]),
        ([*PIPE2, "strategy.checkpoint=sometimes"], ["strategy.checkpoint", "always, except_last, never"]),
        (["strategy=single", "trainer.devices=2"], ["strategy=single runs on one device"]),
        ([*PIPE2, "strategy.balance=[3,4]"], ["strategy.balance=[3, 4]", "make the counts sum to 6 (e.g. [3, 3])"]),
        ([*PIPE2, "strategy.balance=[6,0]"], ["at least one layer"]),
        ([*PIPE2, "strategy.balance=[2,2,2]"], ["3 entries but the pipeline has 2 stages"]),
        (["strategy=pipeline", "trainer.devices=8", "strategy.stages=8"], ["cannot split 6 layers into 8 stages"]),
        (["model=gnmt", "strategy=pipeline", "trainer.devices=12", "strategy.stages=12"],
         ["model=gnmt", "cannot split 11 layers"]),
        ([*PIPE2, "strategy.balance=speed"], ["params, time or memory"]),
        (["strategy=pipeline", "trainer.devices=4", "strategy.replicas=2", "strategy.placement=[[0,1],[1,2]]"],
         ["strategy.placement", "exactly once"]),
        (["seed=1,2", "model.d_model=x"], ["model.d_model"]),
        (["trainer.max_steps=-5"], ["trainer.max_steps=-5", "-1 for no limit"]),
        (["trainer.max_steps=-1"], ["would train forever"]),
        (["trainer.val_check_interval=0"], ["trainer.val_check_interval=0"]),
        (["trainer.val_check_interval=0.5"], ["fraction of an epoch", "check_val_every_n_epoch=1"]),
        (["trainer.limit_val_batches=1.5"], ["must lie in [0, 1]"]),
        (["trainer.precision=17"], ["trainer.precision='17'"]),
        (["trainer.accelerator=abacus"], ["trainer.accelerator='abacus'"]),
        (["trainer.gradient_clip_val=-1"], ["gradient_clip_val=-1"]),
        (["optim.lr=0"], ["optim.lr=0"]),
        (["optim.betas=[0.9,1.5]"], ["optim.betas"]),
        (["optim=sgd", "optim.nesterov=true", "optim.momentum=0"], ["nesterov"]),
        (["lr_schedule.min_lr_ratio=2"], ["lr_schedule.min_lr_ratio=2"]),
        (["lr_schedule=cosine", "lr_schedule.name=zigzag"], ["lr_schedule.name"]),
        (["model.d_model=30", "model.n_heads=4"], ["multiple of n_heads"]),
        (["model.dropout=1.0"], ["model.dropout"]),
        (["data.seq_len=512"], ["data.seq_len=512 exceeds model.max_len=256"]),
    ],
)
def test_bad_configs_get_one_clear_error(override, words):
    with pytest.raises(ConfigError) as info:
        check(override)
    for word in words:
        assert word in str(info.value), str(info.value)


@pytest.mark.parametrize("model, overrides", [
    ("giant_net", {"n_layers": 3}), ("giant_conv", {"n_layers": 5}),
    ("gnmt", {"num_encoder_layers": 2, "num_decoder_layers": 3}),
    ("las", {"listener_layers": 2, "speller_layers": 3, "pyramid_levels": 1}),
])
def test_layer_count_formulas_match_the_built_models(model, overrides):
    """The config check counts layers without torch; the count must be the built model's."""
    import torch

    from giantpipe.platform.model_spec import LAYER_COUNTS, layer_count, model_factory

    cfg = compose_train([f"model={model}", *(f"model.{k}={v}" for k, v in overrides.items())]).model
    assert cfg._target_ in LAYER_COUNTS
    with torch.device("meta"):
        built = len(model_factory(cfg, **({"n_mels": 8} if model == "las" else {}))().layers)
    assert layer_count(cfg) == built


def test_the_config_check_imports_neither_torch_nor_lightning():
    import subprocess
    import sys

    code = ("import sys; from giantpipe.platform.preflight import check; import giantpipe.platform.train; "
            "check(['model=gnmt', 'strategy=pipeline', 'trainer.devices=2']); "
            "print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_slurm_launcher_config_composes_with_the_cluster_shape():
    from hydra import compose, initialize_config_dir

    from giantpipe.platform.config import register_schemas

    register_schemas()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "strategy=pipeline", "trainer.num_nodes=2",
                                          "trainer.devices=4", "strategy.stages=8"], return_hydra_config=True)
    assert cfg.hydra.launcher.nodes == 2 and cfg.hydra.launcher.tasks_per_node == 4
    assert "SlurmLauncher" in cfg.hydra.launcher._target_
