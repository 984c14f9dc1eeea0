"""What translation and speech recognition share: beam-search decoding on val/test, a corpus
score at the end of the epoch, sample tables, and MWER training over N-best lists.

Training and the loss-only half of evaluation are the base task's (`runner.train_loss`,
`runner.eval_loss`). Validation and test also decode every batch with the configured beam
(`runner.decode`: one device, or every rank of a pipeline together) and score the split at the
end of the epoch (`score`: BLEU for translation, WER for speech). Sample outputs go to a
table: a wandb Table when wandb logs the run, TensorBoard text when TensorBoard does, and
always `samples/<split>_step<N>.md` in the run directory.

With `loss=mwer` every training step first decodes N candidates per item, with no
gradients and the model in eval mode (no dropout), through the same runner: the N-best list
of beam search (`loss.candidates=beam`) or N samples (`sample`, at `loss.sample_temperature`).
Sampling is keyed like SpecAugment, by (seed, step, position in the global batch) in training
and by (seed, dataset index) in evaluation, so one device and any pipeline layout draw the
same candidates. Each candidate is scored by `loss.risk` on detokenized text
(`models/risks.py`), and the teacher-forced forward runs on `nbest_batch`'s (B, N+1, U)
targets (`models/mwer.py`).
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path

import torch
import torch.distributed as dist

from giantpipe.models.keyed_dropout import sample_keys
from giantpipe.models.losses import TokenCrossEntropy
from giantpipe.models.mwer import MWERLoss, nbest_batch
from giantpipe.models.risks import risk_named
from giantpipe.platform.data.sampling import replica_of
from giantpipe.platform.tasks.base import Task

SEARCH_KEYS = ("beam_size", "alpha", "beta", "max_len", "max_len_a", "max_len_b")
LENGTH_KEYS = ("max_len", "max_len_a", "max_len_b")
_CANDIDATE_SALT = 0xC0FFEE  # sampling keys: apart from dropout's and SpecAugment's
_EVAL_STEP = -1  # the "step" of evaluation's sampling keys


class Seq2SeqTask(Task):
    """Training and evaluation on `{..., tgt_in, tgt_out, tgt_len, index}` batches.

    Args:
        model_factory: builds the attention seq2seq model on the meta device.
        loss: the `loss` config: `cross_entropy` (label_smoothing) or `mwer` (nbest, ce_weight,
            risk, candidates, sample_temperature).
        decode: beam search settings (`DecodeConfig`).
        tgt_vocab: the target vocabulary (pad/bos/eos ids, `decode`, `decode_batch`).
    """

    metric: str  # the corpus score logged as `<split>/<metric>`
    sample_columns: tuple[str, ...] = ("source", "reference", "hypothesis")

    def __init__(self, model_factory, optim, seed: int, loss, decode: dict, tgt_vocab):
        if loss.name == "mwer":
            loss_fn = MWERLoss(loss.ce_weight, pad_id=tgt_vocab.pad_id)
        else:
            loss_fn = TokenCrossEntropy(loss.label_smoothing, ignore_index=tgt_vocab.pad_id,
                                        target_key="tgt_out")
        super().__init__(model_factory, loss_fn, optim, seed)
        self.nbest = loss.nbest if loss.name == "mwer" else 0
        if self.nbest:
            self.risk = risk_named(loss.risk)
            self.candidates, self.temperature = loss.candidates, loss.sample_temperature
        self.decode_cfg = dict(decode)
        self.tgt_vocab = tgt_vocab
        self.hypotheses: dict[str, list[tuple[int, str]]] = {"val": [], "test": []}

    def batch_tokens(self, batch) -> int:
        """Reference target tokens (EOS included, padding not): what tokens_per_s counts."""
        tgt_out = batch["tgt_out"]
        if tgt_out.dim() == 3:  # an N-best batch: the reference is the last row
            tgt_out = tgt_out[:, -1]
        return int((tgt_out != self.tgt_vocab.pad_id).sum())

    # ----------------------------------------------------------- decoding
    def search_kwargs(self, **overrides) -> dict:
        kwargs = {k: self.decode_cfg[k] for k in SEARCH_KEYS if k in self.decode_cfg}
        kwargs.update(bos_id=self.tgt_vocab.bos_id, eos_id=self.tgt_vocab.eos_id,
                      banned_ids=(self.tgt_vocab.pad_id, self.tgt_vocab.bos_id))
        kwargs.update(overrides)
        return kwargs

    def transcribe(self, batch, **overrides) -> list[str]:
        """Detokenized best hypotheses of a batch (the source side suffices)."""
        result = self.runner.decode(batch, **self.search_kwargs(**overrides))
        return self.tgt_vocab.decode_batch(result.best())

    # ----------------------------------------------------------- MWER training
    def training_step(self, batch, batch_idx):
        batch = self.prepare_train_batch(batch, batch_idx)
        if self.nbest:
            batch = self.with_nbest(batch, self.candidate_keys(batch, batch_idx))
        return super().training_step(batch, batch_idx)

    def prepare_train_batch(self, batch, batch_idx):
        """A hook for training-only input transforms (SpecAugment)."""
        return batch

    def candidate_keys(self, batch, batch_idx: int | None = None):
        """Each item's sampling key: (seed, step, position in the global batch) in training,
        (seed, dataset index) in evaluation (`batch_idx` None)."""
        seed = self.seed ^ _CANDIDATE_SALT
        if batch_idx is None:
            return torch.cat([sample_keys(seed, _EVAL_STEP, int(i), 1) for i in batch["index"]])
        size = self.batch_items(batch)
        _, replica = replica_of(self.trainer)
        return sample_keys(seed, self.global_step * 65_537 + batch_idx, replica * size, size)

    def with_nbest(self, batch, keys):
        """Replace the targets by the N candidates plus the reference (see the module docstring)."""
        was_training = self.model.training
        self.model.eval()
        try:
            if self.candidates == "sample":
                result = self.runner.sample(batch, **self.sample_kwargs(keys))
            else:
                result = self.runner.decode(batch, **self.search_kwargs(
                    beam_size=max(self.nbest, self.decode_cfg.get("beam_size", 1)),
                    n_best=self.nbest))
        finally:
            self.model.train(was_training)
        vocab = self.tgt_vocab
        return nbest_batch(batch, result, vocab.decode, bos_id=vocab.bos_id, eos_id=vocab.eos_id,
                           pad_id=vocab.pad_id, risk=self.risk)

    def sample_kwargs(self, keys) -> dict:
        kwargs = {k: self.decode_cfg[k] for k in LENGTH_KEYS if k in self.decode_cfg}
        kwargs.update(keys=keys, samples=self.nbest, temperature=self.temperature,
                      bos_id=self.tgt_vocab.bos_id, eos_id=self.tgt_vocab.eos_id,
                      banned_ids=(self.tgt_vocab.pad_id, self.tgt_vocab.bos_id))
        return kwargs

    # ----------------------------------------------------------- evaluation
    def _eval_step(self, batch, split: str) -> None:
        if self.nbest:
            batch_for_loss = self.with_nbest(batch, self.candidate_keys(batch))
        else:
            batch_for_loss = batch
        loss = self.runner.eval_loss(batch_for_loss)
        self.log(f"{split}/loss", loss, batch_size=self.batch_items(batch), prog_bar=split == "val")
        if self.trainer.sanity_checking:  # an untrained model decodes to the length limit: skip
            return
        hypotheses = self.transcribe(batch)
        self.hypotheses[split] += list(zip(batch["index"].tolist(), hypotheses, strict=True))

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self.hypotheses["val"] = []

    def on_test_epoch_start(self) -> None:
        self.hypotheses["test"] = []

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._score_split("val")

    def on_test_epoch_end(self) -> None:
        self._score_split("test")

    def _score_split(self, split: str) -> None:
        """The corpus score of everything this split's epoch decoded, over all replicas."""
        decoded = dict(self._gather(self.hypotheses[split]))
        if not decoded:
            return
        indices = sorted(decoded)
        references = self.trainer.datamodule.references(split)
        hypotheses = [decoded[i] for i in indices]
        value = self.score(hypotheses, [references[i] for i in indices])
        self.log(f"{split}/{self.metric}", torch.tensor(value), prog_bar=True)
        if self.trainer.is_global_zero:
            count = self.decode_cfg.get("num_samples", 8)
            rows = [[self.source_text(split, i), references[i], decoded[i]] for i in indices[:count]]
            self._log_samples(split, rows, f"{self.metric.upper()} {value:.2f}")

    @abstractmethod
    def score(self, hypotheses: list[str], references: list[str]) -> float:
        """The corpus score of a split's outputs."""

    @abstractmethod
    def source_text(self, split: str, index: int) -> str:
        """What the samples table shows as the input of item `index`."""

    def _gather(self, pairs: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """Every replica's (index, hypothesis) pairs; a pipeline's stages all hold the same."""
        replicas, _ = replica_of(self.trainer)
        if replicas == 1 or not dist.is_initialized():
            return pairs
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, pairs)
        return [pair for part in everyone for pair in part]

    # ----------------------------------------------------------- logging
    def _log_samples(self, split: str, rows: list[list[str]], score: str) -> None:
        """Sample outputs as a table in every logger that shows tables, and a markdown file."""
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        columns = list(self.sample_columns)
        step = self.global_step
        table = samples_markdown(columns, rows, f"{split} samples at step {step} ({score})")
        out = Path(self.trainer.default_root_dir) / "samples" / f"{split}_step{step:06d}.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table, encoding="utf-8")
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key=f"{split}/samples", columns=columns, data=rows)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text(f"{split}/samples", table, step)


def samples_markdown(columns: list[str], rows: list[list[str]], title: str) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [f"### {title}", "", "| " + " | ".join(columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
