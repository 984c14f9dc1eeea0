"""Translation with GNMT: label-smoothed token cross-entropy, corpus BLEU by beam search.

Everything but the score is `Seq2SeqTask`'s. BLEU is sacrebleu's corpus BLEU over every
sentence a split's epoch translated; its signature is logged once.
"""

from __future__ import annotations

import logging

from giantpipe.platform.data.translation import corpus_bleu
from giantpipe.platform.tasks.seq2seq import Seq2SeqTask

log = logging.getLogger(__name__)


class TranslationTask(Seq2SeqTask):
    """Sequence-to-sequence training on `{src, src_len, tgt_in, tgt_out, tgt_len, index}` batches.

    `src_vocab`/`tgt_vocab` are the wordpieces (`Wordpieces`); see `Seq2SeqTask` for the rest.
    """

    metric = "bleu"

    def __init__(self, model_factory, optim, seed: int, loss, decode: dict, src_vocab, tgt_vocab):
        super().__init__(model_factory, optim, seed, loss, decode, tgt_vocab)
        self.src_vocab = src_vocab
        self.signature_logged = False

    def translate(self, batch, **overrides) -> list[str]:
        """Detokenized best translations of a batch ({src, src_len} suffices)."""
        return self.transcribe(batch, **overrides)

    def score(self, hypotheses: list[str], references: list[str]) -> float:
        bleu = corpus_bleu(hypotheses, references)
        if self.trainer.is_global_zero and not self.signature_logged:
            self.signature_logged = True
            log.info("BLEU: sacrebleu %s", bleu.signature)
            for logger in self.loggers:
                logger.log_hyperparams({"bleu_signature": bleu.signature})
        return bleu.score

    def source_text(self, split: str, index: int) -> str:
        return self.src_vocab.decode(self.trainer.datamodule.dataset(split).src_ids[index])
