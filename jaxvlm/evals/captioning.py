"""CIDEr-D for captioning, in pure Python (no Java), equal to pycocoevalcap's `Cider` scorer.

Vedantam, Zitnick & Parikh, "CIDEr: Consensus-based Image Description Evaluation" (CVPR 2015,
arXiv:1411.5726), in the CIDEr-D form of the COCO caption evaluation code
(`pycocoevalcap/cider/cider_scorer.py`, tylin/coco-caption):

- each sentence is a bag of its 1- to 4-grams, weighted by TF-IDF; the document frequency of an
  n-gram is the number of images whose *reference* set contains it, over the evaluated corpus, and
  the IDF is `log(num_images) - log(max(1, df))`;
- per n, the score against one reference is the cosine similarity with the candidate's weights
  clipped by the reference's (`min(candidate, reference) * reference`), times a Gaussian length
  penalty `exp(-delta² / (2 σ²))` with σ = 6;
- the per-image score is the mean over n, averaged over the references, times 10; the corpus score
  is the mean over images (about 0–10, the scale pycocoevalcap reports).

Two details are kept exactly as pycocoevalcap computes them, so the numbers match: the length in
the penalty is the number of *bigrams* of a sentence (its `if n == 1` counts the 2-gram slot), and
a corpus of one image scores 0 (every IDF is `log(1) - log(1) = 0`).

The COCO PTBTokenizer needs Java; `tokenize_caption` is a documented stand-in applied identically
to predictions and references (see there). Scores are therefore close to, not identical with,
COCO-server numbers, whose tokenizer splits clitics ("dog's" → "dog 's") and keeps hyphenated
words whole.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

MAX_NGRAM = 4
SIGMA = 6.0

_NON_WORD = re.compile(r"[^\w\s]")


def tokenize_caption(text: str) -> list[str]:
    """Lowercases, replaces every punctuation character with a space, splits on whitespace.

    "A dog's ball, red-and-white." → ["a", "dog", "s", "ball", "red", "and", "white"].
    """
    return _NON_WORD.sub(" ", text.lower()).split()


def _ngram_counts(tokens: Sequence[str]) -> Counter:
    counts = Counter()
    for order in range(1, MAX_NGRAM + 1):
        for start in range(len(tokens) - order + 1):
            counts[tuple(tokens[start : start + order])] += 1
    return counts


def _tfidf(counts: Counter, document_frequency: Counter, log_num_images: float):
    """→ (one {n-gram: weight} per order, the L2 norm per order, the sentence's bigram count)."""
    weights = [{} for _ in range(MAX_NGRAM)]
    squared_norms = [0.0] * MAX_NGRAM
    length = 0
    for ngram, term_frequency in counts.items():
        order = len(ngram) - 1
        idf = log_num_images - math.log(max(1.0, document_frequency[ngram]))
        weight = float(term_frequency) * idf
        weights[order][ngram] = weight
        squared_norms[order] += weight**2
        if order == 1:  # pycocoevalcap's length: the number of bigrams (see module docstring).
            length += term_frequency
    return weights, [math.sqrt(value) for value in squared_norms], length


def _similarity(candidate, reference) -> list[float]:
    """Clipped cosine similarity per n-gram order, times the Gaussian length penalty."""
    candidate_weights, candidate_norms, candidate_length = candidate
    reference_weights, reference_norms, reference_length = reference
    delta = float(candidate_length - reference_length)
    penalty = math.e ** (-(delta**2) / (2 * SIGMA**2))
    values = []
    for order in range(MAX_NGRAM):
        value = 0.0
        for ngram, weight in candidate_weights[order].items():
            reference_weight = reference_weights[order].get(ngram, 0.0)
            value += min(weight, reference_weight) * reference_weight  # CIDEr-D clipping
        if candidate_norms[order] != 0 and reference_norms[order] != 0:
            value /= candidate_norms[order] * reference_norms[order]
        values.append(value * penalty)
    return values


def cider_d_per_example(
    predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> list[float]:
    """CIDEr-D of each prediction against its references; IDF over this corpus's references."""
    if len(predictions) != len(references):
        raise ValueError(
            f"cider_d: {len(predictions)} predictions but {len(references)} reference sets"
        )
    for index, reference_set in enumerate(references):
        if isinstance(reference_set, str) or len(reference_set) == 0:
            raise ValueError(
                f"cider_d: references[{index}] must be a non-empty list of strings, "
                f"got {reference_set!r}"
            )
    candidate_counts = [_ngram_counts(tokenize_caption(text)) for text in predictions]
    reference_counts = [
        [_ngram_counts(tokenize_caption(text)) for text in reference_set]
        for reference_set in references
    ]
    document_frequency = Counter()
    for counts_per_reference in reference_counts:
        document_frequency.update(set().union(*counts_per_reference))
    log_num_images = math.log(float(len(references)))

    scores = []
    for candidate, counts_per_reference in zip(candidate_counts, reference_counts, strict=True):
        candidate_vector = _tfidf(candidate, document_frequency, log_num_images)
        totals = [0.0] * MAX_NGRAM
        for counts in counts_per_reference:
            reference_vector = _tfidf(counts, document_frequency, log_num_images)
            similarities = _similarity(candidate_vector, reference_vector)
            totals = [total + value for total, value in zip(totals, similarities, strict=True)]
        mean_over_orders = sum(totals) / MAX_NGRAM
        scores.append(10.0 * mean_over_orders / len(counts_per_reference))
    return scores


def cider_d(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus CIDEr-D (pycocoevalcap scale, about 0–10): the mean of `cider_d_per_example`."""
    if len(predictions) == 0:
        raise ValueError("cider_d: no predictions")
    scores = cider_d_per_example(predictions, references)
    return sum(scores) / len(scores)
