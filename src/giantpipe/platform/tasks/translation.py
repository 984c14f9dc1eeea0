"""Translation with GNMT: label-smoothed token cross-entropy, BLEU by beam search, samples.

Training and the loss-only half of evaluation are the base task's (`runner.train_loss`,
`runner.eval_loss`). Validation and test also translate every batch with the configured beam
(`runner.decode`: one device, or every rank of a pipeline together) and score the split's
corpus BLEU with sacrebleu at the end of the epoch; its signature is logged once. Sample
translations go to a table: a wandb Table when wandb logs the run, TensorBoard text when
TensorBoard does, and always `samples/<split>_step<N>.md` in the run directory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist

from giantpipe.models.losses import TokenCrossEntropy
from giantpipe.platform.data.sampling import replica_of
from giantpipe.platform.data.translation import corpus_bleu
from giantpipe.platform.tasks.base import Task

log = logging.getLogger(__name__)
SEARCH_KEYS = ("beam_size", "alpha", "beta", "max_len", "max_len_a", "max_len_b")


class TranslationTask(Task):
    """Sequence-to-sequence training on `{src, src_len, tgt_in, tgt_out, tgt_len, index}` batches.

    Args:
        model_factory: builds the seq2seq model (GNMT) on the meta device.
        decode: beam search settings (`DecodeConfig`: beam_size, alpha, beta, max_len,
            max_len_a, max_len_b, num_samples).
        src_vocab, tgt_vocab: the wordpieces (`Wordpieces`), for texts and special ids.
        label_smoothing: of the token cross-entropy; padding is ignored.
    """

    def __init__(self, model_factory, optim, seed: int, decode: dict, src_vocab, tgt_vocab,
                 label_smoothing: float = 0.0):
        loss = TokenCrossEntropy(label_smoothing, ignore_index=tgt_vocab.pad_id, target_key="tgt_out")
        super().__init__(model_factory, loss, optim, seed)
        self.decode_cfg = dict(decode)
        self.src_vocab, self.tgt_vocab = src_vocab, tgt_vocab
        self.hypotheses: dict[str, list[tuple[int, str]]] = {"val": [], "test": []}
        self.signature_logged = False

    def batch_tokens(self, batch) -> int:
        """Target tokens (EOS included, padding not): what tokens_per_s counts."""
        return int((batch["tgt_out"] != self.tgt_vocab.pad_id).sum())

    # ----------------------------------------------------------- decoding
    def search_kwargs(self, **overrides) -> dict:
        kwargs = {k: self.decode_cfg[k] for k in SEARCH_KEYS if k in self.decode_cfg}
        kwargs.update(bos_id=self.tgt_vocab.bos_id, eos_id=self.tgt_vocab.eos_id,
                      banned_ids=(self.tgt_vocab.pad_id, self.tgt_vocab.bos_id))
        kwargs.update(overrides)
        return kwargs

    def translate(self, batch, **overrides) -> list[str]:
        """Detokenized best hypotheses of a batch ({src, src_len} suffices)."""
        result = self.runner.decode(batch, **self.search_kwargs(**overrides))
        return self.tgt_vocab.decode_batch(result.best())

    # ----------------------------------------------------------- evaluation
    def _eval_step(self, batch, split: str) -> None:
        loss = self.runner.eval_loss(batch)
        self.log(f"{split}/loss", loss, batch_size=self.batch_items(batch), prog_bar=split == "val")
        if self.trainer.sanity_checking:  # an untrained model decodes to the length limit: skip
            return
        hypotheses = self.translate(batch)
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
            self._score("val")

    def on_test_epoch_end(self) -> None:
        self._score("test")

    def _score(self, split: str) -> None:
        """Corpus BLEU of everything this split's epoch decoded, over all replicas."""
        decoded = dict(self._gather(self.hypotheses[split]))
        if not decoded:
            return
        indices = sorted(decoded)
        references = self.trainer.datamodule.references(split)
        hypotheses = [decoded[i] for i in indices]
        bleu = corpus_bleu(hypotheses, [references[i] for i in indices])
        self.log(f"{split}/bleu", torch.tensor(bleu.score), prog_bar=True)
        if self.trainer.is_global_zero:
            self._log_signature(bleu.signature)
            count = self.decode_cfg.get("num_samples", 8)
            rows = [[self._source_text(split, i), references[i], decoded[i]] for i in indices[:count]]
            self._log_samples(split, rows, bleu.score)

    def _gather(self, pairs: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """Every replica's (index, hypothesis) pairs; a pipeline's stages all hold the same."""
        replicas, _ = replica_of(self.trainer)
        if replicas == 1 or not dist.is_initialized():
            return pairs
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, pairs)
        return [pair for part in everyone for pair in part]

    def _source_text(self, split: str, index: int) -> str:
        return self.src_vocab.decode(self.trainer.datamodule.dataset(split).src_ids[index])

    # ----------------------------------------------------------- logging
    def _log_signature(self, signature: str) -> None:
        if self.signature_logged:
            return
        self.signature_logged = True
        log.info("BLEU: sacrebleu %s", signature)
        for logger in self.loggers:
            logger.log_hyperparams({"bleu_signature": signature})

    def _log_samples(self, split: str, rows: list[list[str]], bleu: float) -> None:
        """Sample translations as a table in every logger that shows tables, and a markdown file."""
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        columns = ["source", "reference", "hypothesis"]
        step = self.global_step
        table = samples_markdown(columns, rows, f"{split} samples at step {step} (BLEU {bleu:.2f})")
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
