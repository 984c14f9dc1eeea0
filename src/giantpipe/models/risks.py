"""Sentence-level risks for sequence training: how bad one hypothesis is against its reference.

Every risk reads detokenized text (what `vocab.decode` returns), never wordpiece or grapheme
ids, so a risk means the same whatever the subword vocabulary. Lower is better; 0 is a
perfect hypothesis.

    word_errors    word edit distance (substitutions + deletions + insertions): MWER's W
    char_errors    character edit distance over the whole string, spaces included (jiwer's CER
                   numerator)
    gleu           1 - GLEU, GNMT's sentence reward (Wu et al. 2016, §5): every 1..4-gram of
                   hypothesis and reference; GLEU = matching n-grams / max(hypothesis n-grams,
                   reference n-grams) = min(precision, recall)
    sentence_bleu  1 - sacrebleu's sentence BLEU / 100 (exponential smoothing, effective order)
    chrf           1 - sacrebleu's sentence chrF / 100

The edit distances are counts (MWER's scale), the others lie in [0, 1]. This module sits in
`models/` because `mwer.py` scores its N-best lists with it, and `models/` never imports
`platform/`.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Sequence

Risk = Callable[[str, str], float]  # (hypothesis, reference) -> risk


def edit_distance(reference: Sequence, hypothesis: Sequence) -> int:
    """Levenshtein distance between two sequences (substitutions + deletions + insertions)."""
    row = list(range(len(hypothesis) + 1))
    for i, r in enumerate(reference, 1):
        diagonal, row[0] = row[0], i
        for j, h in enumerate(hypothesis, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (r != h))
    return row[-1]


def word_errors(hypothesis: str, reference: str) -> float:
    return float(edit_distance(reference.split(), hypothesis.split()))


def char_errors(hypothesis: str, reference: str) -> float:
    return float(edit_distance(" ".join(reference.split()), " ".join(hypothesis.split())))


def ngrams(words: Sequence[str], max_order: int = 4) -> Counter:
    """Every n-gram of 1..max_order words, counted."""
    return Counter(tuple(words[i:i + n]) for n in range(1, max_order + 1)
                   for i in range(len(words) - n + 1))


def sentence_gleu(hypothesis: str, reference: str, max_order: int = 4) -> float:
    """GNMT's GLEU: clipped n-gram matches over the larger of the two n-gram totals."""
    hyp, ref = ngrams(hypothesis.split(), max_order), ngrams(reference.split(), max_order)
    matches = sum((hyp & ref).values())
    return matches / max(1, sum(hyp.values()), sum(ref.values()))


def gleu(hypothesis: str, reference: str) -> float:
    return 1.0 - sentence_gleu(hypothesis, reference)


@functools.cache
def _sacrebleu_scorers():
    from sacrebleu.metrics import BLEU, CHRF

    return BLEU(effective_order=True), CHRF()


def sentence_bleu(hypothesis: str, reference: str) -> float:
    return 1.0 - _sacrebleu_scorers()[0].sentence_score(hypothesis, [reference]).score / 100.0


def chrf(hypothesis: str, reference: str) -> float:
    return 1.0 - _sacrebleu_scorers()[1].sentence_score(hypothesis, [reference]).score / 100.0


RISKS: dict[str, Risk] = {"word_errors": word_errors, "char_errors": char_errors, "gleu": gleu,
                          "sentence_bleu": sentence_bleu, "chrf": chrf}


def risk_named(name: str) -> Risk:
    if name not in RISKS:
        raise ValueError(f"unknown risk {name!r}; choose one of {', '.join(RISKS)}")
    return RISKS[name]
