"""Minimum word error rate training (Prabhavalkar et al. 2018) in the pipeline's SumLoss form.

Per utterance x with reference y* and an N-best list y_1..y_N from beam search (or N samples
from the model, MRT-style: `models/candidate_sampling.py`; repeats count once):

    P^(y_i|x) = P(y_i|x) / sum_j P(y_j|x)                (softmax of the list's log-probs)
    L_MWER    = sum_i P^(y_i|x) * (W(y_i, y*) - W^)      W: the risk, W^: its list mean
    L         = L_MWER + ce_weight * CE(y*)               CE = -log P(y* | x), lambda = 0.01

W is word edit distance in MWER; any sentence risk of `models/risks.py` (1 - GLEU is GNMT's
expected-reward refinement, 1 - sentence BLEU Shen et al.'s MRT) is computed on detokenized
text the same way.

log P(y_i|x) is recomputed with teacher forcing, so it carries gradients; W and W^ are
constants. Subtracting W^ changes the loss value, not its gradient (sum_i P^ = 1); it keeps
the loss centred, as in the paper.

How the platform runs it (the N-best lists never split across micro-batches):

1. No gradients: `encoded = model.encode(batch)`; `result = beam_search(model.step_decoder(),
   encoded, encoded["src_len"], beam_size=4, n_best=4, ...)` (stage by stage when the
   decoder is pipelined).
2. `batch = nbest_batch(batch, result, decode=vocab.decode, bos_id=..., eos_id=..., pad_id=...)`
   replaces `tgt_in`/`tgt_out` by (B, N+1, U) tensors, rows 0..N-1 the hypotheses and row N the
   reference, and adds `nbest_errors` (B, N) (the risks, float) and `nbest_mask` (B, N)
   (False where beam search found fewer than N, or for a repeated sample). Every tensor keeps
   dim 0 = B, so `split` cuts micro-batches between utterances, never inside an N-best list.
3. With gradients, the ordinary pipelined forward: the model runs its encoder once per
   utterance and its decoder over the B*(N+1) teacher-forced rows (the target embedding
   flattens (B, N+1, U) and repeats the memory), giving logits (B*(N+1), U, V).
4. `MWERLoss()(out, micro_batch)` sums the per-utterance losses of a micro-batch;
   `normalizer(batch)` is the number of utterances, so the gradients equal the mini-batch's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from giantpipe.models.beam_search import BeamSearchResult
from giantpipe.models.contract import Batch, Carry
from giantpipe.models.risks import Risk, edit_distance, word_errors


def word_edit_distance(reference: str | Sequence[str], hypothesis: str | Sequence[str]) -> int:
    """Levenshtein distance between word sequences (substitutions + deletions + insertions)."""
    ref = reference.split() if isinstance(reference, str) else list(reference)
    hyp = hypothesis.split() if isinstance(hypothesis, str) else list(hypothesis)
    return edit_distance(ref, hyp)


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus WER: all word errors over all reference words."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    errors = sum(word_edit_distance(r, h) for r, h in zip(references, hypotheses))
    words = sum(len(r.split()) for r in references)
    return errors / max(words, 1)


def sequence_log_probs(logits: Tensor, targets: Tensor, pad_id: int = 0) -> Tensor:
    """log P(targets) per sequence: sum over positions t of log softmax(logits_t)[targets_t],
    padded positions skipped. logits (..., U, V), targets (..., U) -> (...)."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(targets == pad_id, 0.0).sum(-1)


def mwer_from_logprobs(log_probs: Tensor, word_errors: Tensor,
                       mask: Tensor | None = None) -> Tensor:
    """Per-utterance MWER loss (B,) from N-best log-probs (B, N) and word errors (B, N).

    `mask` (B, N) False drops a hypothesis from the renormalization and the mean; a list of
    one (or none) gives 0.
    """
    errors = word_errors.to(log_probs.dtype)
    if mask is None:
        mask = torch.ones_like(errors, dtype=torch.bool)
    # a finite fill keeps an all-masked row (uniform, then zeroed by the mask) free of NaN
    posterior = torch.softmax(log_probs.masked_fill(~mask, torch.finfo(log_probs.dtype).min), -1)
    mean = (errors * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    return (posterior * (errors - mean) * mask).sum(-1)


def nbest_risks(hypotheses: Sequence[Sequence[str]], references: Sequence[str], n: int,
                risk: Risk = word_errors) -> Tensor:
    """risk(y_i, y*) as a (B, n) float tensor (word errors: MWER's W); hypotheses[b] may hold
    fewer than n texts."""
    errors = torch.zeros(len(references), n, dtype=torch.float64)
    for b, (hyps, ref) in enumerate(zip(hypotheses, references)):
        for i, hyp in enumerate(hyps[:n]):
            errors[b, i] = risk(hyp, ref)
    return errors


def nbest_batch(batch: Batch, result: BeamSearchResult, decode: Callable[[Sequence[int]], str], *,
                bos_id: int, eos_id: int, pad_id: int,
                references: Sequence[str] | None = None, risk: Risk = word_errors) -> Batch:
    """The teacher-forcing batch for MWER: see step 2 of the module docstring.

    The reference is read from `tgt_out` (y + eos); its text for the risk is `decode(y)` unless
    `references` are given. `risk` scores detokenized texts (`models/risks.py`); its values go
    to `nbest_errors`. Repeated hypotheses (sampled candidates) count once: a repeat is masked.
    """
    refs = [row[row != pad_id][:-1].tolist() for row in batch["tgt_out"]]  # drop eos
    n = max((len(h) for h in result.hypotheses), default=0)
    hyps = [[h.tokens for h in hs] for hs in result.hypotheses]
    if references is None:
        references = [decode(r) for r in refs]
    errors = nbest_risks([[decode(t) for t in hs] for hs in hyps], references, n, risk)
    mask = torch.tensor([[i < len(hs) and hs[i] not in hs[:i] for i in range(n)] for hs in hyps],
                        dtype=torch.bool)
    rows = [[*(hs + [[]] * (n - len(hs))), ref] for hs, ref in zip(hyps, refs)]
    longest = max(len(t) for r in rows for t in r) + 1
    tgt_in = torch.full((len(rows), n + 1, longest), pad_id, dtype=torch.long)
    tgt_out = torch.full_like(tgt_in, pad_id)
    for b, row in enumerate(rows):
        for i, tokens in enumerate(row):
            tgt_in[b, i, :len(tokens) + 1] = torch.tensor([bos_id, *tokens])
            tgt_out[b, i, :len(tokens) + 1] = torch.tensor([*tokens, eos_id])
    device = batch["tgt_out"].device
    out = {k: v for k, v in batch.items() if k != "tgt_len"}
    out.update(tgt_in=tgt_in.to(device), tgt_out=tgt_out.to(device),
               nbest_errors=errors.to(device, torch.get_default_dtype()), nbest_mask=mask.to(device))
    return out


class MWERLoss:
    """L_MWER + ce_weight * CE per utterance, summed over a micro-batch (see the docstring)."""

    def __init__(self, ce_weight: float = 0.01, pad_id: int = 0) -> None:
        self.ce_weight, self.pad_id = ce_weight, pad_id

    def per_utterance(self, out: Carry, micro_batch: Batch) -> Tensor:
        tgt_out = micro_batch["tgt_out"]  # (B, N+1, U): N hypotheses, then the reference
        if tgt_out.dim() != 3 or "nbest_errors" not in micro_batch:
            raise ValueError("MWERLoss needs an N-best batch (tgt_out (B, N+1, U), nbest_errors): "
                             "build it with giantpipe.models.mwer.nbest_batch after beam search")
        b, rows, length = tgt_out.shape
        logits = out["logits"].reshape(b, rows, length, -1)
        seq = sequence_log_probs(logits, tgt_out, self.pad_id)  # (B, N+1)
        mwer = mwer_from_logprobs(seq[:, :-1], micro_batch["nbest_errors"],
                                  micro_batch.get("nbest_mask"))
        return mwer - self.ce_weight * seq[:, -1]

    def __call__(self, out: Carry, micro_batch: Batch) -> Tensor:
        return self.per_utterance(out, micro_batch).sum()

    def normalizer(self, batch: Batch) -> float:
        return float(batch["tgt_out"].size(0))
