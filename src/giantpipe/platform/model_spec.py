"""What the platform knows of a model from its config alone: how to build it, and its depth.

Torch-free, so the config check (config.py) can compare the stage count and balance with the
layer count before torch is imported. The layer counts of the built-in models are formulas
over their config (tests/test_configs.py checks each against the built layer list); any other
`_target_` is built on the meta device to count (that imports torch, but costs no memory).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import hydra
from omegaconf import DictConfig, OmegaConf

# Config keys the platform reads; the model's constructor never sees them.
PLATFORM_KEYS = ("_target_", "family", "decode")

# [embedding, blocks..., head]; GNMT: [src embedding, encoder..., tgt embedding, decoder..., projection];
# LAS: [listener..., speller embedding, speller..., projection].
LAYER_COUNTS: dict[str, Callable[[DictConfig], int]] = {
    "giantpipe.models.giant_net.GiantNet": lambda m: m.n_layers + 2,
    "giantpipe.models.giant_conv.GiantConvNet": lambda m: m.n_layers + 2,
    "giantpipe.models.gnmt.GNMT": lambda m: m.num_encoder_layers + m.num_decoder_layers + 3,
    "giantpipe.models.las.LAS": lambda m: m.listener_layers + m.speller_layers + 2,
}


def model_factory(model_cfg: DictConfig, **overrides) -> functools.partial:
    """A zero-argument callable building the model (called under the meta device by the task)."""
    kwargs = {k: v for k, v in OmegaConf.to_container(model_cfg, resolve=True).items() if k not in PLATFORM_KEYS}
    kwargs.update(overrides)
    return functools.partial(hydra.utils.get_class(model_cfg._target_), **kwargs)


def layer_count(model_cfg: DictConfig) -> int:
    """How many layers the model's layer list has: a formula, or a meta-device build."""
    formula = LAYER_COUNTS.get(model_cfg._target_)
    if formula is not None:
        return formula(model_cfg)
    import torch

    with torch.device("meta"):
        return len(model_factory(model_cfg)().layers)
