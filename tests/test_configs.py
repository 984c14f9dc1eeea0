"""Every config combination composes or fails early with a sentence that names the fix."""

import itertools

import pytest

from giantpipe.platform.config import ConfigError, validate
from giantpipe.platform.preflight import check, compose_train, conf_dir


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


CORE = ["model", "data", "loss", "strategy"]  # the groups whose combinations carry meaning
AUX = ["logger", "callbacks", "trainer", "optim"]  # independent of the rest: each option once


def compose_or_explain(overrides: list[str]) -> bool:
    if "strategy=pipeline" in overrides:
        overrides = overrides + ["trainer.devices=2"]
    try:
        validate(compose_train(overrides))
        return True
    except ConfigError as err:
        assert "mwer" in str(err) or "data" in str(err), err
        return False


def test_every_group_combination_composes_or_explains():
    outcomes = [
        compose_or_explain([f"{g}={c}" for g, c in zip(CORE, combo)])
        for combo in itertools.product(*(options(g) for g in CORE))
    ]
    assert any(outcomes) and not all(outcomes)
    for group in AUX:
        for option in options(group):
            assert compose_or_explain([f"{group}={option}"])


def test_experiments_and_searches_compose():
    for group in ("experiment", "hparams_search"):
        for name in options(group):
            start = [f"init_from={__file__}"] if "mwer" in name else []  # MWER needs a trained model
            check([f"{group}={name}", *start])


@pytest.mark.parametrize(
    "override, words",
    [
        (["model.nme=3"], ["unknown config key 'model.nme'", "n_layers", "valid keys of model"]),
        (["model=gnmtt"], ["unknown choice model=gnmtt", "giant_net"]),
        (["model.n_layers=abc"], ["model.n_layers"]),
        (["sede=1"], ["unknown config key 'sede'", "did you mean 'seed'"]),
        (["model=giant_conv", "model.n_heads=2", "model.d_ff=3"], ["unknown config key 'model.n_heads'", "kernel_size"]),
        (["loss=mwer"], ["loss=mwer needs a sequence-to-sequence model"]),
        (["strategy=pipeline", "trainer.devices=3"], ["strategy.stages=2 x strategy.replicas=1"]),
        (["strategy=pipeline", "trainer.devices=2", "strategy.micro_batches=64"], ["micro_batches=64 is larger"]),
        (["strategy=pipeline", "trainer.devices=2", "strategy.schedule=zigzag"], ["unknown pipeline schedule 'zigzag'", "zb_h1", "auto"]),
        (["strategy=pipeline", "trainer.devices=2", "strategy.schedule=zbv"], ["not defined for virtual_stages=1", "V in [2]"]),
        (["strategy=pipeline", "trainer.devices=2", "strategy.virtual_stages=4"], ["x strategy.virtual_stages=4 is more than the 6 layers"]),
        (["strategy=pipeline", "trainer.devices=2", "strategy.schedule=auto", "strategy.memory_budget_mb=0"], ["memory_budget_mb=0"]),
        (["strategy=single", "trainer.devices=2"], ["strategy=single runs on one device"]),
        (["strategy=pipeline", "trainer.devices=2", "strategy.balance=[3,4]"], ["sum to the model's 6 layers"]),
        (["strategy=pipeline", "trainer.devices=2", "strategy.balance=[6,0]"], ["at least one layer"]),
        (["strategy=pipeline", "trainer.devices=8", "strategy.stages=8"], ["more than the 6 layers"]),
        (["strategy=pipeline", "trainer.devices=2", "strategy.balance=speed"], ["params, time or memory"]),
        (["seed=1,2", "model.d_model=x"], ["model.d_model"]),
    ],
)
def test_bad_configs_get_one_clear_error(override, words):
    with pytest.raises(ConfigError) as info:
        check(override)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_the_slurm_launcher_config_composes_with_the_cluster_shape():
    from hydra import compose, initialize_config_dir

    from giantpipe.platform.config import register_schemas

    register_schemas()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "strategy=pipeline", "trainer.num_nodes=2",
                                          "trainer.devices=4", "strategy.stages=8"], return_hydra_config=True)
    assert cfg.hydra.launcher.nodes == 2 and cfg.hydra.launcher.tasks_per_node == 4
    assert "SlurmLauncher" in cfg.hydra.launcher._target_
