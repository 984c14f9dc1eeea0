"""Fail before any process starts: compose the config once and explain what is wrong.

Hydra reports a misspelt key as "Key 'nme' is not in struct"; a user needs the valid keys and
the closest match. Sweeps (`a=1,2`) are checked with each swept value in turn, so a bad value
anywhere in a multirun fails before the first job.
"""

from __future__ import annotations

import difflib
import itertools
import re
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from giantpipe.platform.checks import validate_config as validate
from giantpipe.platform.config import ConfigError, register_schemas

CONF_DIR = Path(__file__).resolve().parents[3] / "conf"
# Keys that moved to another group, and where they live now.
MOVED = {
    "optim.warmup_steps": "lr_schedule.warmup_steps",
    "optim.schedule": "the lr_schedule group (lr_schedule=cosine, constant or inverse_sqrt)",
    "optim.min_lr_ratio": "lr_schedule.min_lr_ratio",
}


def conf_dir() -> Path:
    if not CONF_DIR.is_dir():
        raise ConfigError(f"config tree not found at {CONF_DIR}; install giantpipe editable (pip install -e .)")
    return CONF_DIR


def concrete_override_sets(overrides: list[str], limit: int = 64) -> list[list[str]]:
    """Expand sweep overrides (a=1,2) into concrete override lists (at most `limit`)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for o in parsed:
        if o.is_hydra_override():
            continue
        key = o.get_key_element()
        if o.is_sweep_override():
            values = list(itertools.islice(o.sweep_string_iterator(), 16)) if o.is_discrete_sweep() else None
            if values is None:  # a range/interval sweep (optuna): its values are drawn later
                continue
            choices.append([f"{key}={v}" for v in values])
        else:
            choices.append([o.input_line])
    return [list(c) for c in itertools.islice(itertools.product(*choices), limit)]


def compose_train(overrides: list[str], choices: bool = False) -> DictConfig:
    """The composed train config; with `choices`, also `hydra.runtime.choices` (which option each
    group took), so error messages can name the option as the user chose it."""
    register_schemas()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=choices)


def check(overrides: list[str]) -> None:
    """Compose and validate every concrete combination; raise ConfigError with the fix."""
    try:
        sets = concrete_override_sets(overrides)
    except Exception as err:  # grammar errors from Hydra's parser
        raise ConfigError(f"cannot parse the overrides: {first_line(err)}") from None
    for concrete in sets:
        try:
            cfg = compose_train(concrete, choices=True)
        except Exception as err:
            raise ConfigError(explain(err, concrete)) from None
        validate(cfg)


def first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def explain(err: Exception, overrides: list[str]) -> str:
    text = "\n".join(str(e) for e in causes(err))  # Hydra wraps OmegaConf's error, which names the key
    missing_choice = re.search(r"Could not find '([\w/]+)/(\w+)'", text)
    if missing_choice:
        group, choice = missing_choice.groups()
        valid = sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))
        return f"unknown choice {group}={choice}; valid choices for {group}: {', '.join(valid)}" + hint(choice, valid)
    key = re.search(r"full_key: ([\w.\[\]]+)", text) or re.search(r"override '([\w.]+)'", text)
    if key:
        full_key = key.group(1)
        parent_path, _, leaf = full_key.rpartition(".")
        groups = {p.name for p in conf_dir().iterdir() if p.is_dir()}
        rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in groups]  # group choices only
        try:
            node = compose_train(rest)
            parent = OmegaConf.select(node, parent_path) if parent_path else node
        except Exception:
            parent = None
        if isinstance(parent, DictConfig) and leaf not in parent:
            valid = sorted(str(k) for k in parent.keys())
            where = parent_path or "the top level"
            if full_key in MOVED:
                return f"unknown config key '{full_key}': the LR schedule is its own group now; use {MOVED[full_key]}"
            return f"unknown config key '{full_key}'; valid keys of {where}: {', '.join(valid)}" + hint(leaf, valid)
        reason = [ln for ln in text.splitlines() if ln.strip() and "full_key" not in ln and "object_type" not in ln
                  and not ln.startswith("Error merging override")]
        return f"bad value for '{full_key}': {reason[-1].strip() if reason else text}"
    return first_line(err)


def causes(err: BaseException) -> list[BaseException]:
    """The error and the errors it was raised from, outermost first."""
    chain = [err]
    while chain[-1].__cause__ is not None and len(chain) < 8:
        chain.append(chain[-1].__cause__)
    return chain


def hint(word: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(word, valid, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
