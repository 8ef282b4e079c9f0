"""Texts derived from scene graphs: reference captions, VQAv2-style questions and clip texts.

Every function takes a scene (or clip) graph from `scenes.py` and the scene's own numpy generator,
so texts are deterministic per (world seed, split, scene id). Format strings live in module-level
template tuples, which `grammar.grammar_words()` reads for the tokenizer's vocabulary.

A question is the VQAv2 record
    {"question_id": int, "question": str, "question_type": one of vocabulary.QUESTION_TYPES
     (clips: vocabulary.CLIP_QUESTION_TYPES), "answer_type": "yes/no" | "number" | "other",
     "answers": [10 strings], "multiple_choice_answer": str (the majority answer),
     "answer_sentence": str (a full-sentence answer, for instruction data)}.
"""

from __future__ import annotations

import numpy as np

from jaxvlm.data import scenes, vocabulary

NUM_ANSWERS = 10
# Annotators who give a synonym of the majority answer ("two" for "2", "upper left" for "top left").
_NUM_SYNONYM_ANSWERS = 2

COLOUR_QUESTIONS = (
    "what colour is the {name}?",
    "what color is the {name}?",
    "what is the colour of the {name}?",
    "what is the color of the {name}?",
)
SHAPE_QUESTIONS = (
    "what shape is the {colour} object?",
    "what is the shape of the {colour} object?",
    "which shape is {colour}?",
)
COUNT_QUESTIONS = ("how many objects are there?", "how many shapes are in the image?")
COUNT_COLOUR_QUESTIONS = ("how many {colour} objects are there?",)
COUNT_SHAPE_QUESTIONS = ("how many {shapes} are there?", "how many {shapes} are in the picture?")
POSITION_QUESTIONS = (
    "where is the {name}?",
    "in which part of the image is the {name}?",
    "where in the picture is the {name}?",
)
EXISTENCE_QUESTIONS = (
    "is there a {name}?",
    "is there a {name} in the image?",
    "are there any {colour} {shapes}?",
)
RELATION_QUESTIONS = ("is the {first} {relation} the {second}?",)

# Full-sentence answers, for instruction conversations.
ANSWER_SENTENCES = {
    "colour": "the {name} is {answer}.",
    "shape": "the {colour} object is a {answer}.",
    "position": "the {name} is {place}.",
    "existence_yes": "yes, there is a {name}.",
    "existence_no": "no, there is no {name}.",
    "relation_yes": "yes, the {first} is {relation} the {second}.",
    "relation_no": "no, the {first} is {relation} the {second}.",
    "direction": "the {name} moves {direction}.",
    "moving_colour": "the object moving {direction} is {answer}.",
}
# Count sentences for zero, one and more things: "there are no red objects."
COUNT_SENTENCES = (
    "there are no {plural}.",
    "there is one {singular}.",
    "there are {count} {plural}.",
)
MOVING_COUNT_SENTENCES = ("", "one object is moving.", "{count} objects are moving.")
# "left of" reads better as "to the left of" in some questions.
RELATION_LONG = {"left of": "to the left of", "right of": "to the right of"}

# The five captions of a scene, in order; the first names sizes and background (retrieval text).
CAPTION_TEMPLATES = (
    "{sized} on {background}",
    "{count} {noun}: {objects}",
    "{placed}",
    "{background} with {sized}",
    "{opening} {objects}",
)
PLACED_TEMPLATES = (
    "{first} {position}",  # one object
    "{first} {relation} {second}",  # two objects
    "{first} {relation} {second} among {count} objects",  # more
)
OPENINGS = ("a photo of", "an image of", "a picture of")
BACKGROUND_NAMES = {"noise": "a noisy background"}  # others: "a black background"

CLIP_CAPTION_TEMPLATES = (
    "{moving} on {background}",
    "{moves}",
    "{count} moving {noun}: {going}",
    "a video of {moving_phrase}",
    "{slides}",
)
# How each caption names one moving object; "slides" parts are joined by "while".
CLIP_OBJECT_TEMPLATES = {
    "moving": "{name} moving {direction}",
    "moves": "{name} moves {phrase}",
    "going": "{name} going {direction}",
    "moving_phrase": "{name} moving {phrase}",
    "slides": "{the_name} slides {direction}",
}
DIRECTION_QUESTIONS = (
    "which way does the {name} move?",
    "in which direction is the {name} moving?",
    "where is the {name} going?",
)
CLIP_COLOUR_QUESTIONS = ("what colour is the object moving {direction}?",)
CLIP_COUNT_QUESTIONS = ("how many objects are moving?", "how many objects move in the video?")


def number_word(count: int) -> str:
    return vocabulary.NUMBER_WORDS[count]


def with_article(phrase: str) -> str:
    """ "a red circle", "an orange star"."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def join_words(items: list[str]) -> str:
    """ "a", "a and b", "a, b and c"."""
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def object_name(item: dict, *, size: bool = False) -> str:
    """ "red circle", or with size "large red circle"."""
    name = f"{item['colour']} {item['shape']}"
    return f"{item['size']} {name}" if size else name


def background_phrase(background: str) -> str:
    return BACKGROUND_NAMES.get(background, f"a {background} background")


def objects_phrase(objects: list[dict], *, size: bool = False) -> str:
    return join_words([with_article(object_name(item, size=size)) for item in objects])


def _choice(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _noun(count: int, singular: str = "object") -> str:
    return singular if count == 1 else singular + "s"


def captions(scene: dict, rng: np.random.Generator) -> list[str]:
    """Five reference captions in different templates; the first names sizes and background."""
    objects = [scene["objects"][i] for i in rng.permutation(len(scene["objects"]))]
    count = len(objects)
    names = [with_article(object_name(item)) for item in objects]
    placed = PLACED_TEMPLATES[min(count, 3) - 1].format(
        first=names[0],
        position=vocabulary.POSITION_PHRASES[objects[0]["position"]],
        relation=scenes.relation(objects[0], objects[-1]) if count > 1 else "",
        second=names[-1],
        count=number_word(count),
    )
    fields = {
        "sized": objects_phrase(objects, size=True),
        "objects": join_words(names),
        "background": background_phrase(scene["background"]),
        "count": number_word(count),
        "noun": _noun(count),
        "placed": placed,
        "opening": _choice(rng, OPENINGS),
    }
    return [template.format(**fields) for template in CAPTION_TEMPLATES]


def _answers(majority: str, synonym: str | None, rng: np.random.Generator) -> list[str]:
    answers = [majority] * NUM_ANSWERS
    if synonym is not None:
        for slot in rng.choice(NUM_ANSWERS, size=_NUM_SYNONYM_ANSWERS, replace=False):
            answers[slot] = synonym
    return answers


def _question(
    text: str, question_type: str, answer: str, synonym: str | None, rng, sentence: str
) -> dict:
    answer_type = {"existence": "yes/no", "relation": "yes/no", "count": "number"}.get(
        question_type, "other"
    )
    return {
        "question": text,
        "question_type": question_type,
        "answer_type": answer_type,
        "answers": _answers(answer, synonym, rng),
        "multiple_choice_answer": answer,
        "answer_sentence": sentence[0].upper() + sentence[1:],
    }


def _count_answer(count: int, rng, text: str, singular: str, plural: str) -> dict:
    sentence = COUNT_SENTENCES[min(count, 2)].format(
        singular=singular, plural=plural, count=number_word(count)
    )
    return _question(text, "count", str(count), number_word(count), rng, sentence)


def _unique_name(objects: list[dict], item: dict, key: str) -> str | None:
    """A name that picks out `item` alone by `key` ("shape", "colour" or "direction"), else None.

    A shape shared with another object is named with its size ("large circle") when that helps.
    """
    if sum(other[key] == item[key] for other in objects) == 1:
        return item[key]
    same = [other for other in objects if other["size"] == item["size"] and other[key] == item[key]]
    return f"{item['size']} {item[key]}" if len(same) == 1 and key == "shape" else None


def questions(
    scene: dict, rng: np.random.Generator, absent: list[tuple[str, str]], question_id: int
) -> list[dict]:
    """One question per applicable type (relation needs two objects), VQAv2 format.

    Args:
      scene: the scene graph.
      rng: the scene's generator.
      absent: compositions an existence question may ask about when the answer is "no"; held-out
        ones are excluded for training splits.
      question_id: id of the first question; the others follow.
    """
    objects = scene["objects"]
    asked = []
    candidates = [(item, _unique_name(objects, item, "shape")) for item in objects]
    candidates = [(item, name) for item, name in candidates if name is not None]
    if candidates:
        item, name = _choice(rng, candidates)
        text = _choice(rng, COLOUR_QUESTIONS).format(name=name)
        sentence = ANSWER_SENTENCES["colour"].format(name=name, answer=item["colour"])
        asked.append(_question(text, "colour", item["colour"], None, rng, sentence))
    by_colour = [item for item in objects if _unique_name(objects, item, "colour") is not None]
    if by_colour:
        item = _choice(rng, by_colour)
        text = _choice(rng, SHAPE_QUESTIONS).format(colour=item["colour"])
        sentence = ANSWER_SENTENCES["shape"].format(colour=item["colour"], answer=item["shape"])
        asked.append(_question(text, "shape", item["shape"], None, rng, sentence))
    asked.append(_count_question(objects, rng))
    item = _choice(rng, objects)
    text = _choice(rng, POSITION_QUESTIONS).format(name=object_name(item))
    synonym = vocabulary.POSITION_SYNONYMS[item["position"]]
    sentence = ANSWER_SENTENCES["position"].format(
        name=object_name(item), place=vocabulary.POSITION_PHRASES[item["position"]]
    )
    asked.append(_question(text, "position", item["position"], synonym, rng, sentence))
    asked.append(_existence_question(objects, rng, absent))
    if len(objects) >= 2:
        asked.append(_relation_question(objects, rng))
    for offset, question in enumerate(asked):
        question["question_id"] = question_id + offset
    return asked


def _count_question(objects: list[dict], rng) -> dict:
    kind = rng.integers(4)
    if kind <= 1:
        text = _choice(rng, COUNT_QUESTIONS)
        return _count_answer(len(objects), rng, text, "object", "objects")
    if kind == 2:
        colour = _choice(rng, list(vocabulary.COLOURS))
        text = _choice(rng, COUNT_COLOUR_QUESTIONS).format(colour=colour)
        count = sum(item["colour"] == colour for item in objects)
        return _count_answer(count, rng, text, f"{colour} object", f"{colour} objects")
    shape = _choice(rng, vocabulary.SHAPES)
    plural = vocabulary.SHAPE_PLURALS[shape]
    text = _choice(rng, COUNT_SHAPE_QUESTIONS).format(shapes=plural)
    return _count_answer(sum(item["shape"] == shape for item in objects), rng, text, shape, plural)


def _existence_question(objects: list[dict], rng, absent: list[tuple[str, str]]) -> dict:
    present = {(item["colour"], item["shape"]) for item in objects}
    choices = [composition for composition in absent if composition not in present]
    if rng.random() < 0.5 or not choices:
        colour, shape = _choice(rng, sorted(present))
        answer = "yes"
    else:
        colour, shape = _choice(rng, choices)
        answer = "no"
    template = _choice(rng, EXISTENCE_QUESTIONS)
    name = f"{colour} {shape}"
    text = template.format(name=name, colour=colour, shapes=vocabulary.SHAPE_PLURALS[shape])
    sentence = ANSWER_SENTENCES[f"existence_{answer}"].format(name=name)
    return _question(text, "existence", answer, None, rng, sentence)


def _relation_question(objects: list[dict], rng) -> dict:
    first, second = (objects[i] for i in rng.choice(len(objects), size=2, replace=False))
    true_relation = scenes.relation(first, second)
    # A false question asks the opposite relation, so the answer never hinges on a near tie.
    answer = "yes" if rng.random() < 0.5 else "no"
    asked = true_relation if answer == "yes" else vocabulary.RELATION_INVERSES[true_relation]
    if rng.random() < 0.5:
        asked = RELATION_LONG.get(asked, asked)
    names = {"first": object_name(first), "second": object_name(second)}
    text = _choice(rng, RELATION_QUESTIONS).format(relation=asked, **names)
    sentence = ANSWER_SENTENCES[f"relation_{answer}"].format(relation=true_relation, **names)
    return _question(text, "relation", answer, None, rng, sentence)


def clip_captions(clip: dict, rng: np.random.Generator) -> list[str]:
    """Five captions of a clip, each naming every object and its direction."""
    objects = [clip["objects"][i] for i in rng.permutation(len(clip["objects"]))]
    fields = {}
    for key, template in CLIP_OBJECT_TEMPLATES.items():
        parts = [
            template.format(
                name=with_article(object_name(item)),
                the_name=f"the {object_name(item)}",
                direction=item["direction"],
                phrase=vocabulary.DIRECTION_PHRASES[item["direction"]],
            )
            for item in objects
        ]
        fields[key] = " while ".join(parts) if key == "slides" else join_words(parts)
    fields.update(
        background=background_phrase(clip["background"]),
        count=number_word(len(objects)),
        noun=_noun(len(objects)),
    )
    return [template.format(**fields) for template in CLIP_CAPTION_TEMPLATES]


def clip_questions(clip: dict, rng: np.random.Generator, question_id: int) -> list[dict]:
    """A direction question per object, a colour question when a direction is unique, a count."""
    objects = clip["objects"]
    asked = []
    for item in objects:
        name = object_name(item)
        text = _choice(rng, DIRECTION_QUESTIONS).format(name=name)
        phrase = vocabulary.DIRECTION_PHRASES[item["direction"]]
        sentence = ANSWER_SENTENCES["direction"].format(name=name, direction=phrase)
        asked.append(_question(text, "direction", item["direction"], None, rng, sentence))
    unique = [item for item in objects if _unique_name(objects, item, "direction") is not None]
    if unique:
        item = _choice(rng, unique)
        phrase = vocabulary.DIRECTION_PHRASES[item["direction"]]
        text = _choice(rng, CLIP_COLOUR_QUESTIONS).format(direction=phrase)
        sentence = ANSWER_SENTENCES["moving_colour"].format(direction=phrase, answer=item["colour"])
        asked.append(_question(text, "colour", item["colour"], None, rng, sentence))
    count = len(objects)
    text = _choice(rng, CLIP_COUNT_QUESTIONS)
    sentence = MOVING_COUNT_SENTENCES[min(count, 2)].format(count=number_word(count))
    asked.append(_question(text, "count", str(count), number_word(count), rng, sentence))
    for offset, question in enumerate(asked):
        question["question_id"] = question_id + offset
    return asked


def episode(
    scene_id: int,
    split_captions: list[list[str]],
    split_questions: list[list[dict]],
    rng: np.random.Generator,
    num_shots: int,
) -> dict:
    """A few-shot episode: `num_shots` other scenes of the same split as support, then the query.

    Returns {"query": scene_id, "support": [{"scene_id", "caption", "question", "answer"}, ...]};
    the lead's few-shot evaluators fetch support images by scene id (= record index).
    """
    num_others = len(split_captions) - 1
    others = rng.choice(num_others, size=min(num_shots, num_others), replace=False)
    support = []
    for other in (int(i) + int(i >= scene_id) for i in others):
        question = split_questions[other][int(rng.integers(len(split_questions[other])))]
        support.append(
            {
                "scene_id": other,
                "caption": split_captions[other][0],
                "question": question["question"],
                "answer": question["multiple_choice_answer"],
            }
        )
    return {"query": scene_id, "support": support}
