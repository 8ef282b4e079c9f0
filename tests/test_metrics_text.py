"""Text metrics: CIDEr-D against pycocoevalcap and by hand; VQA accuracy and normalisation by hand."""

import math

import pytest

from jaxvlm.evals.captioning import cider_d, cider_d_per_example, tokenize_caption
from jaxvlm.evals.vqa import first_line, mean_vqa_accuracy, normalize_answer, vqa_accuracy

# Five references per image, with case and punctuation the normaliser has to remove.
REFERENCES = [
    [
        "A cat is sitting on a mat.",
        "A grey cat sits on the mat.",
        "The cat is lying on a red mat",
        "a cat resting on a rug",
        "Cat on a mat, looking at the camera.",
    ],
    [
        "Two dogs play with a frisbee in the park.",
        "Two dogs running on the grass.",
        "A pair of dogs chase a red frisbee.",
        "dogs playing in a park",
        "Two brown dogs playing fetch on the grass.",
    ],
    [
        "A man riding a bike down a city street.",
        "A cyclist rides through traffic.",
        "A man on a bicycle in the street.",
        "Person riding a bicycle next to cars.",
        "A man rides his bike on a busy road.",
    ],
    [
        "A plate of pasta with tomato sauce.",
        "Spaghetti and sauce on a white plate.",
        "A dish of pasta on a table.",
        "A close-up of spaghetti with red sauce.",
        "Pasta with tomato sauce and basil on a plate.",
    ],
    [
        "A red double-decker bus on a street.",
        "A bus driving down the road.",
        "A large red bus parked by the curb.",
        "The red bus is stopped at a bus stop.",
        "A double decker bus in London.",
    ],
]
PREDICTIONS = [
    "A cat is sitting on a mat.",  # exact match of one reference
    "two dogs playing with a frisbee",  # partial match
    "",  # empty prediction
    "pasta pasta pasta pasta with sauce sauce",  # repeated words: clipping matters
    "a red bus on the street in the city at night near the people",  # long: length penalty
]


def _pycocoevalcap_scores(predictions, references):
    """pycocoevalcap's Cider on the same normalised token strings that `cider_d` sees."""
    cider_module = pytest.importorskip("pycocoevalcap.cider.cider")

    def normalized(text):
        return " ".join(tokenize_caption(text))

    predicted = {index: [normalized(text)] for index, text in enumerate(predictions)}
    referenced = {
        index: [normalized(text) for text in reference_set]
        for index, reference_set in enumerate(references)
    }
    score, scores = cider_module.Cider().compute_score(referenced, predicted)
    return float(score), [float(value) for value in scores]


def test_tokenize_caption():
    assert tokenize_caption("A dog's ball, red-and-white.") == [
        "a",
        "dog",
        "s",
        "ball",
        "red",
        "and",
        "white",
    ]
    assert tokenize_caption("  Two  DOGS!\n") == ["two", "dogs"]
    assert tokenize_caption("") == []


@pytest.mark.parametrize(
    "predictions, references",
    [
        (PREDICTIONS, REFERENCES),
        ([references[0] for references in REFERENCES], REFERENCES),  # every prediction exact
        (PREDICTIONS[:2], REFERENCES[:2]),
        (["a cat on a mat", "a cat on a mat"], [REFERENCES[0], REFERENCES[0]]),  # IDF all zero
        (["one word", "word"], [["word"], ["one word here", "word"]]),  # 0- and 1-bigram lengths
    ],
)
def test_cider_d_matches_pycocoevalcap(predictions, references):
    reference_score, reference_scores = _pycocoevalcap_scores(predictions, references)
    assert cider_d(predictions, references) == pytest.approx(reference_score, abs=1e-9)
    assert cider_d_per_example(predictions, references) == pytest.approx(reference_scores, abs=1e-9)


def test_cider_d_fixed_corpus_properties():
    scores = cider_d_per_example(PREDICTIONS, REFERENCES)
    assert scores[2] == 0.0  # the empty prediction
    assert scores[0] > scores[1] > 0.0  # exact reference beats a partial match
    assert 0.0 < cider_d(PREDICTIONS, REFERENCES) < 10.0


def test_cider_d_single_example_corpus_is_zero():
    # With one image every IDF is log(1) - log(1) = 0, so pycocoevalcap scores 0 even for an exact
    # match; we follow it.
    assert cider_d(["a cat on a mat"], [["a cat on a mat", "a cat"]]) == 0.0
    reference_score, _ = _pycocoevalcap_scores(["a cat on a mat"], [["a cat on a mat", "a cat"]])
    assert reference_score == 0.0


def test_cider_d_by_hand():
    # Two images with one reference each: "a cat" and "a dog"; IDF = log 2 - log df.
    # "a" is in both reference sets → IDF 0; "cat", "a cat" are in one → IDF log 2.
    # Prediction 1 "a cat" vs "a cat": 1-grams: cosine of (0, log2) with itself = 1; 2-grams: 1;
    # 3-, 4-grams: none → 0. Equal lengths → no penalty. 10 · mean(1, 1, 0, 0) = 5.
    # Prediction 2 "a cat" vs "a dog": the only weighted shared n-gram would be "a" (weight 0) → 0.
    predictions = ["a cat", "a cat"]
    references = [["a cat"], ["a dog"]]
    assert cider_d_per_example(predictions, references) == pytest.approx([5.0, 0.0], abs=1e-12)
    assert cider_d(predictions, references) == pytest.approx(2.5, abs=1e-12)


def test_cider_d_length_penalty_by_hand():
    # Image 1 refs "red bus" → prediction "red bus red bus" clips to the reference weights.
    # Unigrams (IDF log 2 for "red", "bus"): hypothesis (2w, 2w), reference (w, w):
    #   sum min(2w, w)·w = 2w², norms 2√2·w and √2·w → 2w² / 4w² = 1/2.
    # Bigrams: hypothesis {"red bus": 2w, "bus red": 1·w'}, where "bus red" never occurs in a
    #   reference → IDF log 2 - log 1 = log 2 = w too: sum min(2w, w)·w = w²; norms √5·w and w
    #   → 1/√5. Trigrams and 4-grams: the reference has none → 0.
    # Length = bigram count: 3 vs 1 → delta 2, penalty exp(-4 / 72).
    expected = 10 * (0.5 + 1 / math.sqrt(5)) / 4 * math.exp(-4 / 72)
    scores = cider_d_per_example(["red bus red bus", "x"], [["red bus"], ["a cat"]])
    assert scores == pytest.approx([expected, 0.0], abs=1e-12)


def test_cider_d_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="2 predictions but 1 reference"):
        cider_d(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match=r"references\[0\]"):
        cider_d(["a"], ["a cat"])
    with pytest.raises(ValueError, match=r"references\[0\]"):
        cider_d(["a"], [[]])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Two", "2"),  # manualMap: number words → digits, after lowercasing
        ("none", "0"),
        ("the red circle.", "red circle"),  # periodStrip, then articles dropped
        ("A Dog", "dog"),
        ("isnt", "isn't"),  # contractions table
        ("dont know", "don't know"),
        ("Im", "im"),  # the table's capitalised keys never match after lowercasing
        ("1,000", "1000"),  # commaStrip found → every punctuation mark deleted, not spaced
        ("yes, 1,000 dogs!", "yes 1000 dogs"),
        ("yes,no", "yes no"),  # no comma between digits, no adjacent space → becomes a space
        ("red / blue", "red blue"),  # "/ " in the text → deleted
        ("red/blue", "red blue"),
        ("3.5", "3.5"),  # a period followed by a digit stays
        ("5.", "5"),  # the lookahead typo: a period after a digit is still stripped
        ("yes" + "." * 40, "yes" + "." * 8),  # the official sub() passes re.UNICODE (32) as count
        ("it's", "it's"),  # apostrophes are not in the punctuation list
        ("  the\tcat\n", "cat"),  # tabs and newlines → spaces, stripped
        ("ten: yes", "ten: yes"),  # ':' is not punctuation here, so "ten:" is no number word
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_first_line():
    assert first_line("  yes \nbecause the sky is blue") == "yes"
    assert first_line("two") == "two"
    assert first_line("") == ""


@pytest.mark.parametrize(
    "num_matching, expected",
    [
        # Leaving out a matching answer leaves k - 1 matches, any other leaves k; each subset scores
        # min(matches / 3, 1); the accuracy is the mean over the 10 subsets.
        (0, 0.0),
        (1, (1 * 0 / 3 + 9 * 1 / 3) / 10),  # = 0.3
        (2, (2 * 1 / 3 + 8 * 2 / 3) / 10),  # = 0.6
        (3, (3 * 2 / 3 + 7 * 1) / 10),  # = 0.9
        (4, (4 * 1 + 6 * 1) / 10),  # = 1.0
        (10, 1.0),
    ],
)
def test_vqa_accuracy_leave_one_out(num_matching, expected):
    answers = ["two"] * num_matching + ["blue"] * (10 - num_matching)
    assert vqa_accuracy("2", answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_hand_values():
    assert vqa_accuracy("2", ["2"] * 10) == 1.0
    assert vqa_accuracy("Two.", ["2"] * 10) == 1.0  # always normalised (see vqa.py docstring)
    assert vqa_accuracy("the red circle.", ["red circle"] * 2 + ["circle"] * 8) == pytest.approx(
        0.6
    )
    assert vqa_accuracy("no", ["yes"] * 10) == 0.0


def test_mean_vqa_accuracy():
    predictions = ["yes", "Two", first_line("isnt\nsecond line")]
    answers_list = [["yes"] * 10, ["2"] * 2 + ["3"] * 8, ["isn't"] + ["is"] * 9]
    # 1.0, 0.6, 0.3 → mean 0.6333… on 0–100.
    assert mean_vqa_accuracy(predictions, answers_list) == pytest.approx(100 * 1.9 / 3)
    with pytest.raises(ValueError, match="3 predictions but 2 answer lists"):
        mean_vqa_accuracy(predictions, answers_list[:2])
    with pytest.raises(ValueError, match="answers must be a non-empty list"):
        vqa_accuracy("yes", "yes")
