"""Sampled candidates: the right distribution, keyed per source (not per batch), EOS and length
rules, and GNMT's teacher-forced log-probs of sampled and beam candidates equal the search's."""

from __future__ import annotations

import math

import pytest
import torch

from giantpipe.models.beam_search import beam_search
from giantpipe.models.candidate_sampling import sample_candidates
from giantpipe.models.contract import build_materialized
from giantpipe.models.gnmt import GNMT
from giantpipe.models.keyed_dropout import sample_keys
from giantpipe.models.mwer import MWERLoss, nbest_batch, sequence_log_probs

torch.set_num_threads(1)
PAD, BOS, EOS, V = 0, 1, 2, 6


class MarkovDecoder:
    """log p(next | last token) from a fixed table: a StepDecoder with known probabilities."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.log_softmax(torch.randn(V, V, generator=g), dim=-1)

    def init_state(self, encoded, beam_size):
        return None

    def step(self, tokens, state):
        return self.table[tokens], None, state

    def reorder(self, state, beam_indices):
        return state


def draw(keys, samples=3, **kw):
    kw = {"max_len": 8, "bos_id": BOS, "eos_id": EOS, "banned_ids": (PAD, BOS), **kw}
    return sample_candidates(MarkovDecoder(), {}, torch.full((len(keys),), 5), keys=keys,
                             samples=samples, **kw)


def test_first_tokens_follow_the_model_distribution():
    keys = sample_keys(3, 0, 0, 3000)
    result = draw(keys, samples=2, max_len=1 + 1)
    allowed = MarkovDecoder().table[BOS].clone()
    allowed[[PAD, BOS]] = float("-inf")
    p = torch.softmax(allowed, 0)
    counts = torch.zeros(V)
    for hyps in result.hypotheses:
        for h in hyps:
            counts[h.tokens[0] if h.tokens else EOS] += 1
    freq = counts / counts.sum()
    assert counts[PAD] == counts[BOS] == 0  # banned
    assert torch.allclose(freq, p, atol=0.03), (freq, p)  # 6000 draws: sd <= 0.007


def test_samples_depend_on_the_source_key_not_on_the_batch():
    keys = sample_keys(1, 4, 0, 6)
    whole = draw(keys).hypotheses
    assert draw(keys).hypotheses == whole  # the same keys draw the same samples
    part = draw(keys[[4, 1]]).hypotheses  # another batch: items 4 and 1 alone, reordered
    assert [[h.tokens for h in hs] for hs in part] == [[h.tokens for h in hs] for hs in
                                                       (whole[4], whole[1])]
    other = draw(sample_keys(1, 5, 0, 6)).hypotheses  # the next step: other samples
    assert [[h.tokens for h in hs] for hs in other] != [[h.tokens for h in hs] for hs in whole]


def test_log_probs_eos_and_length_limit():
    table = MarkovDecoder().table
    result = draw(sample_keys(2, 0, 0, 20), samples=4, max_len=3)
    for hyps in result.hypotheses:
        assert len(hyps) == 4
        for h in hyps:
            assert len(h.tokens) <= 2 and EOS not in h.tokens  # EOS forced at the 3rd token
            path = [BOS, *h.tokens, EOS]
            expected = sum(float(table[a, b]) for a, b in zip(path, path[1:]))
            assert h.log_prob == pytest.approx(expected, abs=1e-5)


def test_a_cold_temperature_samples_the_greedy_path():
    table = MarkovDecoder().table.clone()
    table[:, [PAD, BOS]] = float("-inf")
    greedy, last = [], BOS
    for _ in range(5):
        last = int(table[last].argmax())
        if last == EOS:
            break
        greedy.append(last)
    result = draw(sample_keys(0, 0, 0, 5), temperature=1e-4, max_len=6)
    assert all(h.tokens == greedy for hs in result.hypotheses for h in hs)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="temperature"):
        draw(sample_keys(0, 0, 0, 2), temperature=0.0)
    with pytest.raises(ValueError, match="2 sample keys for 3 sources"):
        sample_candidates(MarkovDecoder(), {}, torch.full((3,), 5), keys=sample_keys(0, 0, 0, 2),
                          samples=2, bos_id=BOS, eos_id=EOS, max_len=4)


@pytest.mark.parametrize("candidates", ["beam", "sample"])
def test_gnmt_teacher_forced_candidates_equal_the_search(candidates):
    """Search (no grad) -> N-best batch (B, N+1, T) -> GNMT forward (encoder once per source):
    the recomputed log P of each candidate equals the search's, and micro-batches add up."""
    model = build_materialized(lambda: GNMT(9, 8, hidden_size=6, num_encoder_layers=2,
                                            num_decoder_layers=3, dropout=0.0), seed=2).eval()
    g = torch.Generator().manual_seed(0)
    src_len = torch.tensor([5, 3, 4])
    src = torch.randint(4, 9, (3, 5), generator=g) * (torch.arange(5) < src_len.unsqueeze(1))
    tgt_out = torch.tensor([[4, 5, EOS], [6, EOS, PAD], [7, 4, EOS]])
    batch = {"src": src, "src_len": src_len, "tgt_out": tgt_out}
    encoded = model.encode(batch)
    search = dict(bos_id=BOS, eos_id=EOS, max_len=6, banned_ids=(PAD, BOS))
    if candidates == "beam":
        result = beam_search(model.step_decoder(), encoded, src_len, beam_size=4, n_best=4, **search)
    else:
        result = sample_candidates(model.step_decoder(), encoded, src_len, samples=4,
                                   keys=sample_keys(0, 0, 0, 3), temperature=2.0, **search)
    words = lambda ids: " ".join(str(i) for i in ids if i > EOS)  # noqa: E731
    mwer_in = nbest_batch(batch, result, words, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    out = model(mwer_in)
    seq = sequence_log_probs(out["logits"].view(*mwer_in["tgt_out"].shape, -1), mwer_in["tgt_out"])
    for b, hyps in enumerate(result.hypotheses):
        beam = torch.tensor([h.log_prob for h in hyps])
        assert torch.allclose(seq[b, :len(hyps)], beam.float(), atol=1e-4)
    loss_fn = MWERLoss(0.017)
    whole = loss_fn(out, mwer_in)
    split = sum(loss_fn(model(p), p) for p in model.split(mwer_in, 2))
    assert math.isfinite(whole.item()) and torch.allclose(split, whole, atol=1e-5)
