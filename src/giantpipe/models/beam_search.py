"""Batched beam search scored as in GNMT (Wu et al. 2016): s(Y, X) = log P(Y|X) / lp(Y) + cp(X; Y).

    lp(Y)    = ((5 + |Y|) / 6) ** alpha                  |Y| counts the EOS token
    cp(X; Y) = beta * sum_i log(min(sum_j p_ij, 1))      i: real source positions, j: target steps

The search is written against a small protocol (`StepDecoder`) so that one implementation
serves GNMT, LAS and a decoder whose layers live on several pipeline stages (where `step`
crosses processes). Beams are ranked by log P while they grow (like fairseq); a hypothesis
that emits EOS among the top `beam_size` candidates is finished and scored with lp and cp;
a sentence is done once it holds `beam_size` finished hypotheses or reaches its maximum
length, where EOS is forced. `beam_size=1` is greedy decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

State = Any


class StepDecoder(Protocol):
    """What beam search needs from a model. N = batch * beam rows, grouped by sentence."""

    def init_state(self, encoded: dict[str, Tensor], beam_size: int) -> State:
        """State for N rows: every sentence of `encoded` repeated `beam_size` times, in order."""
        ...

    def step(self, tokens: Tensor, state: State) -> tuple[Tensor, Tensor | None, State]:
        """Feed tokens (N,); return log-probabilities (N, V), attention (N, S) or None, state."""
        ...

    def reorder(self, state: State, beam_indices: Tensor) -> State:
        """Keep rows `beam_indices` (N,) of the state, in that order."""
        ...


def length_penalty(length: Tensor | float, alpha: float) -> Tensor | float:
    """lp(Y) = ((5 + |Y|) / 6) ** alpha."""
    return ((5.0 + length) / 6.0) ** alpha


def coverage_penalty(coverage: Tensor, beta: float, mask: Tensor | None = None) -> Tensor:
    """cp = beta * sum_i log(min(coverage_i, 1)) over the last dim; `mask` False drops positions.

    `coverage` (..., S) is the attention mass each source position received, summed over steps.
    """
    logs = torch.log(coverage.clamp(max=1.0))
    if mask is not None:
        logs = logs.masked_fill(~mask, 0.0)
    return beta * logs.sum(-1)


@dataclass
class Hypothesis:
    tokens: list[int]  # without BOS and EOS
    score: float  # log_prob / lp + cp
    log_prob: float  # log P(tokens + EOS | source)
    coverage_penalty: float = 0.0


@dataclass
class BeamSearchResult:
    """Per sentence, up to `n_best` hypotheses, best score first."""

    hypotheses: list[list[Hypothesis]] = field(default_factory=list)

    def best(self) -> list[list[int]]:
        return [h[0].tokens if h else [] for h in self.hypotheses]

    def scores(self) -> list[list[float]]:
        return [[h.score for h in hyps] for hyps in self.hypotheses]

    def padded(self, pad_id: int) -> tuple[Tensor, Tensor]:
        """N-best token ids (B, n, L) padded with `pad_id`, and lengths (B, n) (0 where missing)."""
        n = max((len(h) for h in self.hypotheses), default=0)
        longest = max((len(x.tokens) for h in self.hypotheses for x in h), default=0)
        ids = torch.full((len(self.hypotheses), n, longest), pad_id, dtype=torch.long)
        lengths = torch.zeros(len(self.hypotheses), n, dtype=torch.long)
        for b, hyps in enumerate(self.hypotheses):
            for k, hyp in enumerate(hyps):
                ids[b, k, : len(hyp.tokens)] = torch.tensor(hyp.tokens, dtype=torch.long)
                lengths[b, k] = len(hyp.tokens)
        return ids, lengths


def max_lengths(src_len: Tensor, max_len: int | None = None, max_len_a: float | None = None,
                max_len_b: float = 0.0) -> Tensor:
    """Per-sentence output limit (tokens incl. EOS): min(max_len, floor(a * src_len + b)), >= 1."""
    if max_len is None and max_len_a is None:
        raise ValueError("give max_len, max_len_a (limit a * src_len + b) or both")
    limits = torch.full_like(src_len, max_len if max_len is not None else 2**31 - 1)
    if max_len_a is not None:
        limits = torch.minimum(limits, (max_len_a * src_len.double() + max_len_b).floor().long())
    return limits.clamp(min=1)


@torch.no_grad()
def beam_search(
    decoder: StepDecoder,
    encoded: dict[str, Tensor],
    src_len: Tensor,
    *,
    bos_id: int,
    eos_id: int,
    beam_size: int = 4,
    alpha: float = 0.6,
    beta: float = 0.1,
    max_len: int | None = None,
    max_len_a: float | None = None,
    max_len_b: float = 0.0,
    n_best: int = 1,
    banned_ids: Sequence[int] = (),
) -> BeamSearchResult:
    """Decode every sentence of `encoded`; `banned_ids` (e.g. pad, bos) are never emitted."""
    if beam_size < 1 or not 1 <= n_best <= beam_size:
        raise ValueError(f"need beam_size >= 1 and 1 <= n_best <= beam_size, got "
                         f"beam_size={beam_size}, n_best={n_best}")
    batch, k = src_len.numel(), beam_size
    limits = max_lengths(src_len, max_len, max_len_a, max_len_b).tolist()
    state = decoder.init_state(encoded, k)
    device = src_len.device
    tokens = torch.full((batch * k,), bos_id, dtype=torch.long, device=device)
    history = torch.empty(batch * k, 0, dtype=torch.long, device=device)
    cum = torch.full((batch, k), float("-inf"), device=device)
    cum[:, 0] = 0.0  # only one live beam per sentence at the start
    coverage: Tensor | None = None
    row_src_len = src_len.repeat_interleave(k)
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
    done = [False] * batch

    for t in range(1, max(limits) + 1):
        log_probs, attn, state = decoder.step(tokens, state)
        if attn is not None:
            coverage = attn.float() if coverage is None else coverage + attn.float()
        at_limit = torch.tensor([lim <= t for lim in limits], device=device)
        top_scores, src_beam, top_tok = _top_candidates(log_probs, cum, banned_ids, at_limit, eos_id)
        is_eos = top_tok == eos_id

        # an EOS among the best k candidates finishes a hypothesis
        for b, r in (is_eos[:, :k] & torch.isfinite(top_scores[:, :k])).nonzero().tolist():
            if not done[b]:
                row = b * k + int(src_beam[b, r])
                finished[b].append(_finish(history[row], float(top_scores[b, r]), t, coverage,
                                           row, row_src_len[row], alpha, beta))

        cum, rows, tokens = _survivors(top_scores, src_beam, top_tok, is_eos, k)
        history = torch.cat([history.index_select(0, rows), tokens.unsqueeze(1)], dim=1)
        coverage = None if coverage is None else coverage.index_select(0, rows)
        state = decoder.reorder(state, rows)

        for b in range(batch):
            done[b] = done[b] or len(finished[b]) >= k or limits[b] <= t
        if all(done):
            break
    return BeamSearchResult([sorted(f, key=lambda h: -h.score)[:n_best] for f in finished])


def _top_candidates(log_probs: Tensor, cum: Tensor, banned_ids: Sequence[int], at_limit: Tensor,
                    eos_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """The 2k best continuations of each sentence's k beams: (score, source beam, token)."""
    (batch, k), vocab = cum.shape, log_probs.size(-1)
    log_probs = log_probs.float().clone()
    if banned_ids:
        log_probs[:, list(banned_ids)] = float("-inf")
    lp_bkv = log_probs.view(batch, k, vocab)
    _only_eos_where(lp_bkv, at_limit, eos_id)
    cand = (cum.unsqueeze(2) + lp_bkv).view(batch, k * vocab)
    top_scores, top_idx = cand.topk(min(2 * k, k * vocab), dim=1)  # >= k candidates
    return top_scores, top_idx // vocab, top_idx % vocab


def _survivors(top_scores: Tensor, src_beam: Tensor, top_tok: Tensor, is_eos: Tensor,
               k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The best k candidates that did not end live on: their scores (B, k), the rows of the
    beams they extend (B*k) and their tokens (B*k)."""
    batch, width = top_scores.shape
    rank = torch.arange(width, device=top_scores.device).expand_as(top_scores)
    keep = (rank + is_eos.long() * width).argsort(dim=1)[:, :k]
    cum = torch.where(is_eos.gather(1, keep), float("-inf"), top_scores.gather(1, keep))
    rows = torch.arange(batch, device=top_scores.device).unsqueeze(1) * k + src_beam.gather(1, keep)
    return cum, rows.view(-1), top_tok.gather(1, keep).view(-1)


def _only_eos_where(lp_bkv: Tensor, forced_b: Tensor, eos_id: int) -> None:
    """Sentences at their length limit may only end: all their other tokens get -inf."""
    if forced_b.any():
        eos = lp_bkv[:, :, eos_id].clone()
        lp_bkv[forced_b] = float("-inf")
        lp_bkv[:, :, eos_id] = torch.where(forced_b.unsqueeze(1), eos, lp_bkv[:, :, eos_id])


def _finish(prefix: Tensor, log_prob: float, length: int, coverage: Tensor | None, row: int,
            src_len: Tensor, alpha: float, beta: float) -> Hypothesis:
    cp = 0.0
    if coverage is not None and beta != 0.0:
        cov = coverage[row]
        mask = torch.arange(cov.numel(), device=cov.device) < src_len
        cp = float(coverage_penalty(cov, beta, mask))
    score = log_prob / float(length_penalty(float(length), alpha)) + cp
    return Hypothesis(prefix.tolist(), score, log_prob, cp)
