"""Speech recognition with LAS: grapheme cross-entropy or MWER, SpecAugment, WER by beam search.

Everything but the score, the input augmentation and the samples' first column is
`Seq2SeqTask`'s. WER is jiwer's corpus word error rate over every utterance a split's epoch
transcribed, logged as `<split>/wer` in percent. SpecAugment masks are drawn per utterance
from a generator keyed by (seed, step, position in the global batch), like the keyed dropout,
so one device and any pipeline or replica layout train on the same masked features.
"""

from __future__ import annotations

import jiwer
import torch

from giantpipe.models.keyed_dropout import sample_keys
from giantpipe.platform.data.sampling import replica_of
from giantpipe.platform.data.spec_augment import SpecAugment
from giantpipe.platform.tasks.seq2seq import Seq2SeqTask

_SPEC_AUGMENT_SALT = 0x5A5A


class SpeechTask(Seq2SeqTask):
    """LAS training on `{features, feat_len, tgt_in, tgt_out, tgt_len, index}` batches.

    Args:
        vocab: the graphemes (`GraphemeVocab`).
        spec_augment: the `data.spec_augment` settings (no masks: off).
        See `Seq2SeqTask` for the rest.
    """

    metric = "wer"
    sample_columns = ("utterance", "reference", "hypothesis")

    def __init__(self, model_factory, optim, seed: int, loss, decode: dict, vocab, spec_augment):
        super().__init__(model_factory, optim, seed, loss, decode, vocab)
        self.augment = SpecAugment(**spec_augment)
        self.augment_on = spec_augment["freq_masks"] > 0 or spec_augment["time_masks"] > 0

    def batch_items(self, batch) -> int:
        return batch["features"].shape[0]

    def prepare_train_batch(self, batch, batch_idx):
        if not self.augment_on:
            return batch
        size = self.batch_items(batch)
        _, replica = replica_of(self.trainer)
        keys = sample_keys(self.seed ^ _SPEC_AUGMENT_SALT, self.global_step * 65_537 + batch_idx,
                           replica * size, size)
        features = batch["features"].clone()
        for b, (key, frames) in enumerate(zip(keys.tolist(), batch["feat_len"].tolist())):
            generator = torch.Generator().manual_seed(key & (2**63 - 1))
            features[b, :frames] = self.augment(features[b, :frames], generator=generator)
        return {**batch, "features": features}

    def score(self, hypotheses: list[str], references: list[str]) -> float:
        return 100.0 * word_error_rate(references, hypotheses)

    def source_text(self, split: str, index: int) -> str:
        return f"{split}/{index}"


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """jiwer's corpus WER (all word errors over all reference words); references are never
    empty (the scan skips utterances without text), hypotheses may be."""
    return jiwer.wer(list(references), list(hypotheses)) if references else 0.0
