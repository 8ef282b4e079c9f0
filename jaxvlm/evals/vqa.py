"""VQAv2 accuracy with the official answer normalisation.

Antol et al., "VQA: Visual Question Answering" (ICCV 2015), and the evaluation code of the VQA API,
`PythonEvaluationTools/vqaEvaluation/vqaEval.py` (GT-Vision-Lab/VQA). The tables and regular
expressions below are copied from `VQAEval.__init__`; `normalize_answer` is its `processPunctuation`
followed by `processDigitArticle`, quirks included:

- punctuation: each mark of `PUNCTUATION` is deleted if it touches a space in the input, or if the
  input anywhere has a comma between digits ("1,000" → "1000"); otherwise it becomes a space
  ("red/blue" → "red blue");
- periods: the pattern `(?!<=\\d)(\\.)(?!\\d)` deletes a period unless a digit follows ("3.5" stays);
  its `(?!<=\\d)` is a lookahead typo, not a lookbehind, so "5." loses its period too. The official
  call passes `re.UNICODE` as the positional *count*, so at most 32 periods are deleted;
- lowercase, split on whitespace, number words "none"/"zero".."ten" → digits, drop the articles
  "a", "an", "the", then restore the apostrophe of a contraction ("isnt" → "isn't"). The table's
  capitalised keys ("Im", "Ive", "Id've") never match after lowercasing, as in the original.

Accuracy of one question: for each of the (10) human answers, leave it out and score
min(#remaining humans whose answer equals the prediction / 3, 1); average these.

One deliberate difference: the official code normalises only when the human answers disagree
(`len(set(gtAnswers)) > 1`), relying on the released annotations being normalised already. Here the
prediction and every human answer are always normalised, so "Two" scores against ten "2"s.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",  # sic, reversed in the official table
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")  # fmt: skip

_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic, see module docstring
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(\,)(\d)")
_MAX_PERIODS_STRIPPED = re.UNICODE  # the official `sub("", text, re.UNICODE)` passes 32 as count
MATCHES_FOR_FULL_CREDIT = 3


def first_line(text: str) -> str:
    """The first line of a generated answer, stripped: generation is cut at the first newline."""
    return text.split("\n", 1)[0].strip()


def _process_punctuation(text: str) -> str:
    output = text
    has_comma_between_digits = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in PUNCTUATION:
        # The official test looks at the *input* text, not the partly processed output.
        if mark + " " in text or " " + mark in text or has_comma_between_digits:
            output = output.replace(mark, "")
        else:
            output = output.replace(mark, " ")
    return _PERIOD_STRIP.sub("", output, count=_MAX_PERIODS_STRIPPED)


def _process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(text: str) -> str:
    """The official VQAv2 answer normalisation (module docstring): "The two dogs." → "2 dogs"."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Accuracy (0–1) of one prediction against the human answers, leave-one-out averaged."""
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError(
            f"vqa_accuracy: answers must be a non-empty list of strings, got {answers!r}"
        )
    normalized_prediction = normalize_answer(prediction)
    matches = [normalize_answer(answer) == normalized_prediction for answer in answers]
    total_matches = sum(matches)
    # Leaving out answer i leaves `total_matches - matches[i]` matching humans among the rest.
    accuracies = [
        min(1.0, (total_matches - matched) / MATCHES_FOR_FULL_CREDIT) for matched in matches
    ]
    return sum(accuracies) / len(accuracies)


def mean_vqa_accuracy(predictions: Sequence[str], answers_list: Sequence[Sequence[str]]) -> float:
    """Mean VQA accuracy over questions on 0–100 (unrounded; the official code rounds to 2 places)."""
    if len(predictions) != len(answers_list):
        raise ValueError(
            f"mean_vqa_accuracy: {len(predictions)} predictions but {len(answers_list)} answer lists"
        )
    if len(predictions) == 0:
        raise ValueError("mean_vqa_accuracy: no predictions")
    accuracies = [
        vqa_accuracy(prediction, answers)
        for prediction, answers in zip(predictions, answers_list, strict=True)
    ]
    return 100.0 * sum(accuracies) / len(accuracies)
