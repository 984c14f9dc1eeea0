"""Every model x loss pair either trains or is refused in preflight with one line saying why.

The matrix is read from the config tree (conf/model/*.yaml x conf/loss/*.yaml), so a new model
or loss option joins it by existing. For `loss=mwer` every risk and both kinds of candidates
are walked too (each risk once, beam and sampled candidates in turn). An accepted pair runs one real optimizer step in this process (Lightning fit
on the task and data that `giantpipe-train` builds, shrunk) and must change the weights with a
finite loss; a refused pair must fail in `check` (the preflight) with a single-line
ConfigError that names the fix.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from giantpipe.models.risks import RISKS
from giantpipe.platform.build import build_task
from giantpipe.platform.config import ConfigError
from giantpipe.platform.preflight import CONF_DIR, check, compose_train

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
LOSSES = sorted(p.stem for p in (CONF_DIR / "loss").glob("*.yaml"))
REFUSED = {("giant_net", "mwer"), ("giant_conv", "mwer")}  # a language model has no N-best list

TINY = {
    "giant_net": ["model.d_model=16", "model.n_layers=2", "model.n_heads=2", "model.d_ff=32",
                  "model.max_len=16", "data.seq_len=16", "data.max_bytes=300000"],
    "giant_conv": ["model.d_model=16", "model.n_layers=2", "model.max_len=16", "data.seq_len=16",
                   "data.max_bytes=300000"],
    "gnmt": ["model.hidden_size=8", "model.num_encoder_layers=2", "model.num_decoder_layers=2",
             "model.decode.max_len=8", "data.size=2000", "data.val_size=40", "data.test_size=40",
             "data.vocab_size=200"],
    "las": ["model.listener_hidden=8", "model.listener_layers=2", "model.pyramid_levels=1",
            "model.speller_hidden=8", "model.speller_layers=1", "model.decode.max_len=8",
            "data.n_mels=20", "data.train_size=48", "data.val_size=12", "data.test_size=12"],
}
# every risk once, beam and sampled candidates in turn
LOSS_VARIANTS = {"cross_entropy": [[]],
                 "mwer": [[f"loss.risk={r}", f"loss.candidates={('beam', 'sample')[i % 2]}",
                           "loss.nbest=2"] for i, r in enumerate(RISKS)]}
PAIRS = [(m, loss) for m in MODELS for loss in LOSSES]


def test_the_matrix_covers_every_option_and_the_refusals_are_real():
    assert {"giant_net", "giant_conv", "gnmt", "las"} <= set(MODELS)
    assert {"cross_entropy", "mwer"} <= set(LOSSES) and set(LOSS_VARIANTS) == set(LOSSES)
    assert REFUSED <= set(PAIRS)


class Watch(pl.Callback):
    """Snapshot the weights when training starts; keep the step's loss."""

    def on_train_start(self, trainer, task):
        self.before = {n: p.detach().clone() for n, p in task.named_parameters()}

    def on_train_batch_end(self, trainer, task, outputs, batch, batch_idx):
        self.loss = float(outputs["loss"])


def one_step(overrides: list[str], root: Path) -> tuple[float, float]:
    cfg = compose_train(overrides + ["data.batch_size=4", "data.num_workers=0"])
    cfg.output_dir = str(root)
    data, task, _ = build_task(cfg)
    watch = Watch()
    trainer = pl.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[watch],
                         use_distributed_sampler=False, default_root_dir=str(root))
    trainer.fit(task, datamodule=data)
    moved = max(float((p.detach() - watch.before[n]).abs().max()) for n, p in task.named_parameters())
    return watch.loss, moved


@pytest.mark.parametrize("model,loss", PAIRS)
def test_model_loss_pair_trains_or_is_refused_in_preflight(model, loss, tmp_path):
    start = [f"init_from={__file__}"] if loss == "mwer" else []  # MWER starts from a checkpoint
    for variant in LOSS_VARIANTS[loss]:
        overrides = [f"model={model}", f"loss={loss}", *start, *TINY[model], *variant]
        if (model, loss) in REFUSED:
            with pytest.raises(ConfigError) as err:
                check(overrides)
            message = str(err.value)
            assert "\n" not in message and f"loss={loss}" in message and "use loss=" in message
            return  # the refusal is about the loss, not its variant
        check(overrides)
        torch.manual_seed(0)
        value, moved = one_step(overrides, tmp_path)
        assert math.isfinite(value) and moved > 0, (overrides, value, moved)
