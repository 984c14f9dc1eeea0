"""A campaign of generated invalid configs: each one gets one clean ConfigError before any
process starts -- never another exception, a traceback or a hang."""

import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from giantpipe.platform.config import ConfigError
from giantpipe.platform.preflight import check, compose_train, conf_dir

BASE = compose_train([])
GROUPS = sorted(p.name for p in conf_dir().iterdir() if p.is_dir() and p.name not in ("hydra",))
INT_KEYS = [f"{g}.{k}" for g in ("model", "data", "trainer", "strategy") for k, v in BASE.get(g, {}).items()
            if isinstance(v, int) and not isinstance(v, bool)]
PIPE = ["strategy=pipeline"]

names = st.text(string.ascii_lowercase + "_", min_size=3, max_size=12)
unknown_key = st.tuples(st.sampled_from(["model", "data", "trainer", "strategy", "optim"]), names).filter(
    lambda gk: gk[1] not in BASE[gk[0]] and gk[1] not in ("family",)
).map(lambda gk: [f"{gk[0]}.{gk[1]}=1"])
unknown_choice = st.tuples(st.sampled_from(["model", "data", "loss", "strategy", "logger"]), names).filter(
    lambda gc: not (conf_dir() / gc[0] / f"{gc[1]}.yaml").exists()
).map(lambda gc: [f"{gc[0]}={gc[1]}"])
wrong_type = st.tuples(st.sampled_from(INT_KEYS), st.sampled_from(["abc", "1.5.2", "[1,2]", "{a:1}"])).map(
    lambda kv: [f"{kv[0]}={kv[1]}"]
)
bad_world = st.tuples(st.integers(1, 6), st.integers(1, 3), st.integers(1, 12)).filter(
    lambda t: t[0] * t[1] != t[2]
).map(lambda t: PIPE + [f"strategy.stages={t[0]}", f"strategy.replicas={t[1]}", f"trainer.devices={t[2]}"])
too_many_micro = st.integers(33, 500).map(lambda m: PIPE + ["trainer.devices=2", f"strategy.micro_batches={m}"])
bad_balance = st.lists(st.integers(0, 5), min_size=2, max_size=2).filter(lambda b: sum(b) != 6 or 0 in b).map(
    lambda b: PIPE + ["trainer.devices=2", f"strategy.balance=[{b[0]},{b[1]}]"]
)
non_positive = st.sampled_from(["strategy.stages", "strategy.replicas", "strategy.micro_batches"]).flatmap(
    lambda k: st.integers(-3, 0).map(lambda v: PIPE + ["trainer.devices=2", f"{k}={v}"])
)
bad_enum = st.tuples(st.sampled_from(["strategy.schedule", "strategy.checkpoint"]), names).map(
    lambda kv: PIPE + ["trainer.devices=2", f"{kv[0]}={kv[1]}"]
)
seq2seq = st.sampled_from(["model=gnmt", "model=las"])
family_mismatch = st.tuples(seq2seq, st.sampled_from(["data=stdlib_text", "data=translation_default",
                                                      "data=speech_default"])).filter(
    lambda md: (md[0] == "model=gnmt") != (md[1] == "data=translation_default")
).map(list)
mwer_start = st.tuples(seq2seq, st.sampled_from([[], ["init_from=/nonexistent/last.ckpt"],
                                                 ["ckpt_path=/nonexistent/x.ckpt"]])).map(
    lambda ms: [ms[0], "loss=mwer", *ms[1]]
)
too_many_stages = st.tuples(seq2seq, st.integers(20, 60)).map(
    lambda ms: [ms[0], *PIPE, f"strategy.stages={ms[1]}", f"trainer.devices={ms[1]}"]
)
optimizers = st.sampled_from(["optim=adamw", "optim=adam", "optim=sgd", "optim=adafactor"])
rejected_later = st.one_of(  # values Lightning or torch would reject after a minute of imports
    st.integers(-50, -2).map(lambda v: [f"trainer.max_steps={v}"]),
    st.integers(-50, 0).map(lambda v: [f"trainer.log_every_n_steps={v}"]),
    st.integers(-50, 0).map(lambda v: [f"trainer.accumulate_grad_batches={v}"]),
    st.floats(1.01, 1e3).map(lambda v: [f"trainer.limit_val_batches={v}"]),
    st.floats(-1e3, -0.01).map(lambda v: [f"trainer.gradient_clip_val={v}"]),
    st.tuples(optimizers, st.floats(-10.0, 0.0)).map(lambda ov: [ov[0], f"optim.lr={ov[1]}"]),
    st.floats(1.01, 10.0).map(lambda v: [f"lr_schedule.min_lr_ratio={v}"]),
    st.integers(-100, -1).map(lambda v: [f"lr_schedule.warmup_steps={v}"]),
)
invalid = st.one_of(unknown_key, unknown_choice, wrong_type, bad_world, too_many_micro, bad_balance, non_positive,
                    bad_enum, family_mismatch, mwer_start, too_many_stages, rejected_later)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(invalid)
def test_every_generated_invalid_config_gets_one_clean_error(overrides):
    try:
        check(overrides)
    except ConfigError as err:
        message = str(err)
        assert message and "Traceback" not in message and len(message) < 600, message
    else:
        raise AssertionError(f"accepted an invalid config: {overrides}")
