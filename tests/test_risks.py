"""Sentence risks: each against a hand-computed example, and against sacrebleu/jiwer where they
have one; risks read detokenized text, so two segmentations of one sentence score the same."""

from __future__ import annotations

import math

import jiwer
import pytest
import sacrebleu
import torch

from giantpipe.models.beam_search import BeamSearchResult, Hypothesis
from giantpipe.models.mwer import nbest_batch
from giantpipe.models.risks import (
    RISKS,
    char_errors,
    chrf,
    gleu,
    risk_named,
    sentence_bleu,
    sentence_gleu,
    word_errors,
)
from giantpipe.platform.data.wordpieces import train_wordpieces

HYP, REF = "the cat sat on the mat", "the cat is on the mat"
PAIRS = [(HYP, REF), ("a b", "a b c"), ("twelve dollar fifty cents", "twelve dollars and fifty cents"),
         ("on may third", "on may third"), ("four five", "one two three"), ("", "hello"),
         ("seven thirty past half", "half past seven"), ("a a a", "a")]


def test_gleu_by_hand():
    # HYP vs REF, 6 words each: 6 + 5 + 4 + 3 = 18 n-grams on either side. Matches:
    #   1-grams the x2, cat, on, mat = 5; 2-grams "the cat", "on the", "the mat" = 3;
    #   3-grams "on the mat" = 1; 4-grams none. GLEU = 9 / 18.
    assert sentence_gleu(HYP, REF) == pytest.approx(0.5)
    assert gleu(HYP, REF) == pytest.approx(0.5)
    # precision 3/3, recall 3/6 (a, b, "a b" of a, b, c, "a b", "b c", "a b c"): the minimum
    assert sentence_gleu("a b", "a b c") == pytest.approx(0.5)
    # clipped: "a" matches once; the hypothesis has a x3, "a a" x2, "a a a": 6 n-grams
    assert sentence_gleu("a a a", "a") == pytest.approx(1 / 6)
    assert gleu(REF, REF) == 0.0 and gleu("", REF) == 1.0


def test_sentence_bleu_by_hand_and_against_sacrebleu():
    # precisions 5/6, 3/5, 1/4 and 0/3 -> exp smoothing 1/(2 * 3); equal lengths: BP = 1
    expected = (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25
    assert sentence_bleu(HYP, REF) == pytest.approx(1 - expected)
    # effective order 2, precisions 1 and 1, BP = exp(1 - 3/2)
    assert sentence_bleu("a b", "a b c") == pytest.approx(1 - math.exp(-0.5))
    for hyp, ref in PAIRS:
        score = sacrebleu.sentence_bleu(hyp, [ref], smooth_method="exp", use_effective_order=True)
        assert sentence_bleu(hyp, ref) == pytest.approx(1 - score.score / 100), (hyp, ref)


def test_chrf_by_hand_and_against_sacrebleu():
    # characters (spaces dropped) "abc" vs "abd", beta = 2: order 1 P = R = 2/3, order 2
    # P = R = 1/2, order 3 nothing matches; chrF = mean(2/3, 1/2, 0) = 7/18
    assert chrf("abc", "abd") == pytest.approx(1 - 7 / 18)
    assert chrf(REF, REF) == pytest.approx(0.0)
    for hyp, ref in PAIRS:
        assert chrf(hyp, ref) == pytest.approx(1 - sacrebleu.sentence_chrf(hyp, [ref]).score / 100)


def test_edit_distances_by_hand_and_against_jiwer():
    assert word_errors(HYP, REF) == 1.0 and word_errors("", "a b c") == 3.0
    assert char_errors("kitten", "sitting") == 3.0  # k->s, e->i, +g
    assert char_errors("sat", "sit") == 1.0 and char_errors("a  b", "a b") == 0.0
    for hyp, ref in PAIRS:
        words = jiwer.process_words(ref, hyp)
        assert word_errors(hyp, ref) == words.substitutions + words.deletions + words.insertions
        assert char_errors(hyp, ref) == pytest.approx(jiwer.cer(ref, hyp) * len(ref)), (hyp, ref)


@pytest.mark.parametrize("name", sorted(RISKS))
def test_every_risk_is_zero_for_the_reference_and_positive_otherwise(name):
    risk = risk_named(name)
    assert risk(REF, REF) == pytest.approx(0.0, abs=1e-9)
    assert risk(HYP, REF) > 0 and risk("", REF) > risk(HYP, REF)


def test_unknown_risk_names_the_choices():
    with pytest.raises(ValueError, match="word_errors, char_errors, gleu"):
        risk_named("bleu")


def test_risks_read_detokenized_text_not_wordpiece_ids():
    """'hello world' spelt as whole pieces and as single characters: different ids, one text,
    so every risk is 0; a wrong word costs the same whatever its segmentation."""
    pieces = train_wordpieces(["hello world", "hello there world", "word"] * 20, vocab_size=60)
    whole = pieces.encode("hello world")
    chars = [pieces.tokenizer.token_to_id(t) for t in ["▁", "h", "e", "l", "l", "o", "▁", "w", "o",
                                                        "r", "l", "d"]]
    assert None not in chars and whole != chars and pieces.decode(chars) == "hello world"
    wrong = pieces.encode("hello word")
    tgt_out = torch.tensor([whole + [pieces.eos_id]])
    result = BeamSearchResult([[Hypothesis(whole, 0.0, 0.0), Hypothesis(chars, 0.0, 0.0),
                                Hypothesis(wrong, 0.0, 0.0)]])
    for name in RISKS:
        out = nbest_batch({"tgt_out": tgt_out}, result, pieces.decode, bos_id=pieces.bos_id,
                          eos_id=pieces.eos_id, pad_id=pieces.pad_id, risk=risk_named(name))
        errors = out["nbest_errors"][0].tolist()
        assert errors[0] == errors[1] == pytest.approx(0.0, abs=1e-6), name
        assert errors[2] == pytest.approx(risk_named(name)("hello word", "hello world")), name
