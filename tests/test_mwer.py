"""MWER: hand-computed loss and gradients, the N=1 limit, word errors against jiwer, and the
whole data flow (beam search -> N-best batch -> teacher-forced LAS forward -> loss)."""

from __future__ import annotations

import math

import jiwer
import pytest
import torch
import torch.nn.functional as F

from giantpipe.models.beam_search import BeamSearchResult, Hypothesis, beam_search
from giantpipe.models.contract import build_materialized
from giantpipe.models.las import LAS
from giantpipe.models.mwer import (
    MWERLoss,
    mwer_from_logprobs,
    nbest_batch,
    sequence_log_probs,
    word_edit_distance,
    word_error_rate,
)
from giantpipe.platform.data.graphemes import GraphemeVocab

torch.set_num_threads(1)
PAD, BOS, EOS = 0, 1, 2


def test_mwer_from_logprobs_by_hand():
    # list 1: P = (0.2, 0.1, 0.1) renormalizes to (0.5, 0.25, 0.25); W = (1, 2, 3), mean 2
    #   loss = 0.5 * (1 - 2) + 0.25 * (2 - 2) + 0.25 * (3 - 2) = -0.25
    #   d loss / d log P_k = P^_k * (W_k - sum_i P^_i W_i), sum_i P^_i W_i = 1.75
    #                      = (0.5 * -0.75, 0.25 * 0.25, 0.25 * 1.25) = (-0.375, 0.0625, 0.3125)
    # list 2: P = (0.3, 0.1, masked) -> (0.75, 0.25); W = (0, 4), mean 2
    #   loss = 0.75 * -2 + 0.25 * 2 = -1.0; expected W = 1; grads (0.75 * -1, 0.25 * 3, 0)
    log_probs = torch.tensor([[0.2, 0.1, 0.1], [0.3, 0.1, 0.5]]).log().requires_grad_()
    errors = torch.tensor([[1.0, 2.0, 3.0], [0.0, 4.0, 100.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    loss = mwer_from_logprobs(log_probs, errors, mask)
    assert torch.allclose(loss, torch.tensor([-0.25, -1.0]))
    loss.sum().backward()
    assert torch.allclose(log_probs.grad, torch.tensor([[-0.375, 0.0625, 0.3125],
                                                         [-0.75, 0.75, 0.0]]))


def test_mwer_loss_on_logits_by_hand():
    """Uniform logits over V=4: every token has log-prob log(1/4).

    hypothesis 1: 1 token + eos, log P = 2 log(1/4); W = 0
    hypothesis 2: 2 tokens + eos, log P = 3 log(1/4); W = 2
    renormalized: (1/16, 1/64) / (5/64) = (0.8, 0.2); mean W = 1
    MWER = 0.8 * (0 - 1) + 0.2 * (2 - 1) = -0.6
    reference: 1 token + eos, CE = 2 log 4; loss = -0.6 + 0.01 * 2 log 4
    d/d log P: 0.8 * (0 - 0.4) = -0.32 and 0.2 * (2 - 0.4) = 0.32; reference: -0.01 (as -log P)
    d log P / d logit[t, v] = onehot(y_t)[v] - 1/4 at real positions, 0 at padding.
    """
    tgt_out = torch.tensor([[[3, EOS, PAD], [3, 3, EOS], [3, EOS, PAD]]])  # (B=1, N+1=3, U=3)
    batch = {"tgt_out": tgt_out, "nbest_errors": torch.tensor([[0.0, 2.0]]),
             "nbest_mask": torch.tensor([[True, True]])}
    logits = torch.zeros(3, 3, 4, requires_grad=True)  # (B*(N+1), U, V), as the model emits
    loss_fn = MWERLoss(ce_weight=0.01, pad_id=PAD)
    loss = loss_fn({"logits": logits}, batch)
    assert loss.item() == pytest.approx(-0.6 + 0.01 * 2 * math.log(4), abs=1e-6)
    assert loss_fn.normalizer(batch) == 1.0
    loss.backward()
    expected = torch.zeros(3, 3, 4)
    for row, coefficient in enumerate((-0.32, 0.32, -0.01)):
        for t, token in enumerate(tgt_out[0, row].tolist()):
            if token != PAD:
                expected[row, t] = coefficient * (F.one_hot(torch.tensor(token), 4) - 0.25)
    assert torch.allclose(logits.grad, expected, atol=1e-6)


def test_one_hypothesis_leaves_only_the_weighted_cross_entropy():
    g = torch.Generator().manual_seed(0)
    tgt_out = torch.tensor([[[4, 5, EOS], [3, EOS, PAD]], [[5, EOS, PAD], [4, 4, EOS]]])
    batch = {"tgt_out": tgt_out, "nbest_errors": torch.tensor([[3.0], [1.0]]),
             "nbest_mask": torch.ones(2, 1, dtype=torch.bool)}
    logits = torch.randn(4, 3, 6, generator=g, requires_grad=True)
    loss = MWERLoss(ce_weight=0.01)({"logits": logits}, batch)
    ce = F.cross_entropy(logits.view(2, 2, 3, 6)[:, 1].reshape(-1, 6), tgt_out[:, 1].reshape(-1),
                         ignore_index=PAD, reduction="sum")
    assert torch.allclose(loss, 0.01 * ce)  # P^ = 1 and W - mean W = 0
    loss.backward()
    assert torch.all(logits.grad.view(2, 2, 3, 6)[:, 0] == 0)  # no gradient into the hypotheses


def test_sequence_log_probs_equals_summed_cross_entropy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 5, 7, generator=g)
    targets = torch.randint(1, 7, (2, 3, 5), generator=g)
    targets[0, 1, 3:] = PAD
    seq = sequence_log_probs(logits, targets, PAD)
    assert seq.shape == (2, 3)
    ce = F.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1), ignore_index=PAD,
                         reduction="none").view(2, 3, 5).sum(-1)
    assert torch.allclose(seq, -ce, atol=1e-5)


PAIRS = [
    ("the cat sat on the mat", "the cat sat on mat"),
    ("the cat sat on the mat", "a cat sat on the the mat"),
    ("twelve dollars and fifty cents", "twelve dollar fifty cents"),
    ("on may third", "on may third"),
    ("one two three", "four five"),
    ("hello", ""),
    ("half past seven", "seven thirty past half"),
]


@pytest.mark.parametrize("reference,hypothesis", PAIRS)
def test_word_edit_distance_matches_jiwer(reference, hypothesis):
    counts = jiwer.process_words(reference, hypothesis)
    assert word_edit_distance(reference, hypothesis) == (
        counts.substitutions + counts.deletions + counts.insertions)


def test_word_error_rate_matches_jiwer():
    refs, hyps = [r for r, _ in PAIRS], [h for _, h in PAIRS]
    assert word_error_rate(refs, hyps) == pytest.approx(jiwer.wer(refs, hyps))
    assert word_edit_distance("", "a b") == 2 and word_edit_distance(["a", "b"], ["b"]) == 1


def test_nbest_batch_layout():
    vocab = GraphemeVocab(list(" abc"))  # ids: ' '=4 a=5 b=6 c=7
    a, b, c, sp = 5, 6, 7, 4
    batch = {"features": torch.zeros(2, 3, 1), "feat_len": torch.tensor([3, 2]),
             "tgt_in": torch.tensor([[BOS, a, sp, b], [BOS, c, PAD, PAD]]),
             "tgt_out": torch.tensor([[a, sp, b, EOS], [c, EOS, PAD, PAD]]),
             "tgt_len": torch.tensor([4, 2])}
    result = BeamSearchResult([
        [Hypothesis([a, sp, b], -1.0, -1.0), Hypothesis([a, sp, c, c], -2.0, -2.0),
         Hypothesis([b], -3.0, -3.0)],
        [Hypothesis([c], -0.5, -0.5)],  # beam search found one hypothesis only
    ])
    out = nbest_batch(batch, result, vocab.decode, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    assert out["tgt_in"].shape == out["tgt_out"].shape == (2, 4, 5)  # N=3 hypotheses + reference
    assert out["tgt_in"][0, 1].tolist() == [BOS, a, sp, c, c]
    assert out["tgt_out"][0, 1].tolist() == [a, sp, c, c, EOS]
    assert out["tgt_out"][0, 3].tolist() == [a, sp, b, EOS, PAD]  # the reference row is last
    assert out["tgt_out"][1, 1].tolist() == [EOS, PAD, PAD, PAD, PAD]  # a missing hypothesis
    assert out["nbest_mask"].tolist() == [[True, True, True], [True, False, False]]
    # "a b" vs "a b" / "a cc" / "b"  and  "c" vs "c"
    assert out["nbest_errors"].tolist() == [[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    assert "tgt_len" not in out and torch.equal(out["features"], batch["features"])


def test_mwer_data_flow_through_las():
    """Beam search (no grad) -> N-best batch -> teacher-forced forward: the recomputed log-probs
    equal the beam's, gradients reach the listener, and micro-batches add up to the batch."""
    vocab = GraphemeVocab(list(" ab"))
    model = build_materialized(lambda: LAS(vocab.vocab_size, n_mels=4, listener_hidden=4,
                                           listener_layers=2, pyramid_levels=1, speller_hidden=6,
                                           speller_layers=2, dropout=0.0), seed=5).eval()
    g = torch.Generator().manual_seed(0)
    refs = ["ab a", "b", "a ba"]
    tgt = [vocab.encode(r) for r in refs]
    tgt_out = torch.nn.utils.rnn.pad_sequence([torch.tensor(t + [EOS]) for t in tgt], True, PAD)
    batch = {"features": torch.randn(3, 7, 4, generator=g), "feat_len": torch.tensor([7, 4, 6]),
             "tgt_out": tgt_out}
    encoded = model.encode(batch)
    result = beam_search(model.step_decoder(), encoded, encoded["src_len"], bos_id=BOS, eos_id=EOS,
                         beam_size=4, n_best=4, max_len=6, banned_ids=(PAD, BOS, vocab.unk_id))
    mwer_in = nbest_batch(batch, result, vocab.decode, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    n = mwer_in["nbest_errors"].size(1)
    assert n == 4

    out = model(mwer_in)
    rows = mwer_in["tgt_out"].shape
    seq = sequence_log_probs(out["logits"].view(*rows, -1), mwer_in["tgt_out"], PAD)
    for b, hyps in enumerate(result.hypotheses):
        beam = torch.tensor([h.log_prob for h in hyps])
        assert torch.allclose(seq[b, :len(hyps)], beam, atol=1e-4)

    loss_fn = MWERLoss()
    whole = loss_fn(out, mwer_in) / loss_fn.normalizer(mwer_in)
    parts = model.split(mwer_in, 2)
    split_sum = sum(loss_fn(model(p), p) for p in parts) / loss_fn.normalizer(mwer_in)
    assert torch.allclose(split_sum, whole, atol=1e-5)
    whole.backward()
    listener = model.layers[0].lstm.weight_ih_l0
    assert listener.grad is not None and listener.grad.abs().sum() > 0


def test_mwer_loss_refuses_a_plain_batch():
    with pytest.raises(ValueError, match="nbest_batch"):
        MWERLoss()({"logits": torch.zeros(2, 3, 4)}, {"tgt_out": torch.zeros(2, 3, dtype=int)})


def test_repeated_samples_count_once():
    """Sampled candidates may repeat: a repeat is masked out of the renormalization and the mean,
    so the loss equals that of the list without it."""
    vocab = GraphemeVocab(list(" ab"))
    a, b = vocab.encode("a")[0], vocab.encode("b")[0]
    batch = {"tgt_out": torch.tensor([[a, EOS]])}
    repeated = BeamSearchResult([[Hypothesis([a], -1.0, -1.0), Hypothesis([b], -2.0, -2.0),
                                  Hypothesis([a], -1.0, -1.0)]])
    unique = BeamSearchResult([repeated.hypotheses[0][:2]])
    out = {k: nbest_batch(batch, r, vocab.decode, bos_id=BOS, eos_id=EOS, pad_id=PAD)
           for k, r in (("repeated", repeated), ("unique", unique))}
    assert out["repeated"]["nbest_mask"].tolist() == [[True, True, False]]
    log_probs = torch.tensor([[-1.0, -2.0, -1.0]])
    assert torch.allclose(
        mwer_from_logprobs(log_probs, out["repeated"]["nbest_errors"], out["repeated"]["nbest_mask"]),
        mwer_from_logprobs(log_probs[:, :2], out["unique"]["nbest_errors"], out["unique"]["nbest_mask"]))
