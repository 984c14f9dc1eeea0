"""N candidate sequences per source sampled from the model, for risk training (MRT, Shen et al. 2016).

Ancestral sampling one token at a time through the same `StepDecoder` protocol as beam search,
so a decoder spread over pipeline stages samples stage by stage. Each token is drawn by the
Gumbel-max trick,

    y_t = argmax_v ( log p(v | y_<t, x) / temperature + g_v ),   g_v = -log(-log u_v),

with u drawn by `keyed_uniform` from the source's key (seed, step, position in the global
batch: the task's business), the candidate's number and the step t. The draws therefore
depend on which sentence it is, never on the batch, micro-batches or pipeline layout, and
every rank of a pipeline (which all see the same log-probabilities) draws the same tokens.

Sentences stop at EOS or at their length limit (EOS forced, as in beam search). The result is
a `BeamSearchResult` holding the N samples of each source in draw order, each with its
log P(y + EOS | x) under the model at temperature 1; repeats are kept (MWER masks them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from giantpipe.models.beam_search import BeamSearchResult, Hypothesis, StepDecoder, max_lengths
from giantpipe.models.keyed_dropout import keyed_uniform

_SALT = 0x5EED_0000  # + step: distinct from every dropout site's salt


def gumbel_noise(keys_b: Tensor, samples: int, vocab: int, step: int) -> Tensor:
    """(B * samples, vocab) Gumbel(0, 1) noise keyed by (source key, sample number, step)."""
    u = keyed_uniform(keys_b, torch.Size((keys_b.numel(), samples, vocab)), _SALT + step)
    u = u.double().clamp(min=1e-300)  # u = 0 would give -inf noise: that token is never drawn
    return (-torch.log(-torch.log(u))).view(-1, vocab)


@torch.no_grad()
def sample_candidates(
    decoder: StepDecoder,
    encoded: dict[str, Tensor],
    src_len: Tensor,
    *,
    keys: Tensor,
    samples: int,
    bos_id: int,
    eos_id: int,
    temperature: float = 1.0,
    max_len: int | None = None,
    max_len_a: float | None = None,
    max_len_b: float = 0.0,
    banned_ids: Sequence[int] = (),
) -> BeamSearchResult:
    """Draw `samples` sequences per source; `keys` (B,) int64 key each source's draws."""
    if samples < 1 or temperature <= 0:
        raise ValueError(f"need samples >= 1 and temperature > 0, got samples={samples}, "
                         f"temperature={temperature}")
    batch = src_len.numel()
    if keys.numel() != batch:
        raise ValueError(f"{keys.numel()} sample keys for {batch} sources")
    device = src_len.device
    limits = max_lengths(src_len, max_len, max_len_a, max_len_b).repeat_interleave(samples)
    state = decoder.init_state(encoded, samples)
    tokens = torch.full((batch * samples,), bos_id, dtype=torch.long, device=device)
    alive = torch.ones(batch * samples, dtype=torch.bool, device=device)
    log_prob = torch.zeros(batch * samples, dtype=torch.float64, device=device)
    drawn: list[Tensor] = []
    for t in range(1, int(limits.max()) + 1):
        log_probs, _, state = decoder.step(tokens, state)
        log_probs = log_probs.float().clone()
        if banned_ids:
            log_probs[:, list(banned_ids)] = float("-inf")
        at_limit = (limits <= t).to(device)
        if at_limit.any():  # only EOS may follow
            eos = log_probs[:, eos_id].clone()
            log_probs[at_limit] = float("-inf")
            log_probs[:, eos_id] = torch.where(at_limit, eos, log_probs[:, eos_id])
        noise = gumbel_noise(keys.to(device), samples, log_probs.size(1), t).to(device)
        choice = (log_probs.double() / temperature + noise).argmax(dim=1)
        log_prob += torch.where(alive, log_probs.gather(1, choice.unsqueeze(1)).squeeze(1).double(),
                                0.0)
        drawn.append(torch.where(alive, choice, eos_id))
        alive = alive & (choice != eos_id)
        tokens = torch.where(alive, choice, eos_id)
        if not alive.any():
            break
    return _as_result(torch.stack(drawn, 1).tolist(), log_prob.tolist(), batch, samples, eos_id)


def _as_result(rows: list[list[int]], log_probs: list[float], batch: int, samples: int,
               eos_id: int) -> BeamSearchResult:
    hypotheses = []
    for b in range(batch):
        hyps = []
        for i in range(b * samples, (b + 1) * samples):
            tokens = rows[i][:rows[i].index(eos_id)] if eos_id in rows[i] else rows[i]
            hyps.append(Hypothesis(tokens, log_probs[i], log_probs[i]))
        hypotheses.append(hyps)
    return BeamSearchResult(hypotheses)
