"""Beam search: GNMT's length and coverage penalties, greedy at beam 1, scores that are what
they claim, exhaustive search on a toy decoder, N-best lists and length limits."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from giantpipe.models.beam_search import (
    beam_search,
    coverage_penalty,
    length_penalty,
    max_lengths,
)
from giantpipe.models.contract import build_materialized
from giantpipe.models.gnmt import GNMT

torch.set_num_threads(1)
PAD, BOS, EOS, V = 0, 1, 2, 9


def tiny_gnmt(seed=0) -> GNMT:
    model = build_materialized(
        lambda: GNMT(11, V, hidden_size=8, num_encoder_layers=2, num_decoder_layers=3,
                     embedding_size=6, dropout=0.0, init_weight=1.0),  # large init: peaky outputs
        seed=seed,
    ).eval()
    with torch.no_grad():  # make EOS rarer, so hypotheses differ in length
        model.layers[-1].linear.bias[EOS] -= 0.5
    return model


def source(seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, 11, (3, 4), generator=g)
    src_len = torch.tensor([4, 2, 3])
    src[1, 2:] = PAD
    src[2, 3:] = PAD
    return {"src": src, "src_len": src_len}


def test_length_and_coverage_penalties_match_hand_computation():
    assert length_penalty(3, 0.6) == pytest.approx((8 / 6) ** 0.6)
    assert length_penalty(1, 0.0) == 1.0
    assert float(length_penalty(torch.tensor(7.0), 1.0)) == pytest.approx(2.0)
    cov = torch.tensor([[0.5, 1.7, 0.2], [1.0, 1.0, 0.25]])
    expected = [0.2 * (math.log(0.5) + 0.0 + math.log(0.2)), 0.2 * math.log(0.25)]
    assert coverage_penalty(cov, 0.2).tolist() == pytest.approx(expected)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert coverage_penalty(cov, 0.2, mask).tolist() == pytest.approx([0.2 * math.log(0.5),
                                                                       expected[1]])


def test_max_lengths():
    src_len = torch.tensor([2, 5, 10])
    assert max_lengths(src_len, max_len=6).tolist() == [6, 6, 6]
    assert max_lengths(src_len, max_len_a=1.5, max_len_b=1).tolist() == [4, 8, 16]
    assert max_lengths(src_len, max_len=6, max_len_a=1.5, max_len_b=1).tolist() == [4, 6, 6]
    with pytest.raises(ValueError, match="max_len"):
        max_lengths(src_len)


def greedy_by_full_forward(model, batch, limit):
    """Independent greedy decoding: re-run the whole teacher-forced model on each prefix."""
    out = []
    for b in range(batch["src"].size(0)):
        one = {"src": batch["src"][b:b + 1], "src_len": batch["src_len"][b:b + 1]}
        prefix = [BOS]
        for t in range(1, limit + 1):
            if t == limit:
                break
            logits = model({**one, "tgt_in": torch.tensor([prefix])})["logits"][0, -1]
            logits[[PAD, BOS]] = float("-inf")
            token = int(logits.argmax())
            if token == EOS:
                break
            prefix.append(token)
        out.append(prefix[1:])
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_one_is_greedy(seed):
    model, batch = tiny_gnmt(seed), source(seed)
    result = beam_search(model.step_decoder(), model.encode(batch), batch["src_len"], bos_id=BOS,
                         eos_id=EOS, beam_size=1, max_len=6, banned_ids=(PAD, BOS))
    assert result.best() == greedy_by_full_forward(model, batch, 6)


def rescore(model, batch, b, tokens, alpha, beta):
    """log P / lp + cp of one hypothesis, recomputed by teacher forcing the whole model."""
    one = {"src": batch["src"][b:b + 1], "src_len": batch["src_len"][b:b + 1],
           "tgt_in": torch.tensor([[BOS, *tokens]])}
    model.emit_attention = True
    try:
        out = model(one)
    finally:
        model.emit_attention = False
    target = torch.tensor([[*tokens, EOS]])
    log_p = F.log_softmax(out["logits"], -1).gather(-1, target.unsqueeze(-1)).sum()
    coverage = out["attn"][0].sum(0)[: int(batch["src_len"][b])]
    return float(log_p / length_penalty(len(tokens) + 1, alpha) + coverage_penalty(coverage, beta))


def test_beam_hypotheses_are_sorted_and_scored_as_claimed():
    model, batch = tiny_gnmt(), source()
    alpha, beta = 0.6, 0.2
    result = beam_search(model.step_decoder(), model.encode(batch), batch["src_len"], bos_id=BOS,
                         eos_id=EOS, beam_size=4, n_best=4, alpha=alpha, beta=beta,
                         max_len_a=2.0, max_len_b=2, banned_ids=(PAD, BOS))
    limits = max_lengths(batch["src_len"], max_len_a=2.0, max_len_b=2)
    for b, hyps in enumerate(result.hypotheses):
        assert len(hyps) == 4
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == 4
        for h in hyps:
            assert len(h.tokens) + 1 <= limits[b]
            assert EOS not in h.tokens and PAD not in h.tokens and BOS not in h.tokens
            assert h.score == pytest.approx(rescore(model, batch, b, h.tokens, alpha, beta), abs=1e-4)
    ids, lengths = result.padded(PAD)
    assert ids.shape[:2] == (3, 4) and lengths[0, 0] == len(result.hypotheses[0][0].tokens)


class MarkovDecoder:
    """A toy decoder for the protocol: log P(next | last token) from a fixed table, no attention."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table.log_softmax(-1)

    def init_state(self, encoded, beam_size):
        return encoded["start"].repeat_interleave(beam_size)

    def step(self, tokens, state):
        return self.table[tokens], None, tokens

    def reorder(self, state, beam_indices):
        return state.index_select(0, beam_indices)


def brute_force(table, max_len, alpha):
    """The best EOS-terminated sequence of at most `max_len` tokens (EOS included), by score."""
    log_p = table.log_softmax(-1)
    best = (float("-inf"), None)
    for n in range(max_len):
        for seq in itertools.product([1, 2], repeat=n):  # tokens 1, 2; EOS is 0
            prev, total = 3, 0.0  # 3 = BOS
            for tok in (*seq, 0):
                total += float(log_p[prev, tok])
                prev = tok
            best = max(best, (total / length_penalty(n + 1, alpha), list(seq)))
    return best


@pytest.mark.parametrize("seed", range(8))
def test_wide_beam_is_exhaustive_on_a_toy_decoder(seed):
    table = torch.randn(4, 4, generator=torch.Generator().manual_seed(seed)) * 2
    table[:, 3] = -1e9  # never emit BOS
    table[:, 0] -= 1.0  # EOS a little rarer: longer winners
    decoder = MarkovDecoder(table)
    encoded = {"start": torch.tensor([3])}
    result = beam_search(decoder, encoded, torch.tensor([1]), bos_id=3, eos_id=0, beam_size=16,
                         alpha=0.8, max_len=4)
    score, seq = brute_force(table, 4, 0.8)
    assert result.hypotheses[0][0].tokens == seq
    assert result.hypotheses[0][0].score == pytest.approx(score, abs=1e-5)
    greedy = beam_search(decoder, encoded, torch.tensor([1]), bos_id=3, eos_id=0, beam_size=1,
                         alpha=0.8, max_len=4)
    assert greedy.hypotheses[0][0].score <= score + 1e-6


def test_bad_arguments():
    decoder = MarkovDecoder(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="n_best"):
        beam_search(decoder, {"start": torch.tensor([3])}, torch.tensor([1]), bos_id=3, eos_id=0,
                    beam_size=2, n_best=3, max_len=3)
