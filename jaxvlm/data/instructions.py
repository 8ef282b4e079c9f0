"""LLaVA-style instruction data from scene graphs (LLaVA §3: conversation, detail, reasoning).

Each scene gets one sample of each of the three LLaVA-Instruct types,

    {"type": "conversation" | "detail" | "complex_reasoning",
     "conversations": [{"from": "human", "value": "<image>\\nWhat color is the circle?"},
                       {"from": "gpt", "value": "The circle is red."}, ...]}

with "<image>" before or after the text of the first human turn (as in LLaVA-Instruct). Only
conversations are multi-turn. The prompts lists are LLaVA's own (stage 1 samples BRIEF_PROMPTS).
"""

from __future__ import annotations

import numpy as np

from jaxvlm.data import scenes, texts, vocabulary

IMAGE_TOKEN = "<image>"

# LLaVA's prompts for brief (stage 1) and detailed descriptions.
BRIEF_PROMPTS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)
DETAIL_PROMPTS = (
    "Describe the following image in detail.",
    "Provide a detailed description of the given image.",
    "Give an elaborate explanation of the image you see.",
    "Share a comprehensive rundown of the presented image.",
    "Offer a thorough analysis of the image.",
    "Explain the various aspects of the image before you.",
    "Clarify the contents of the displayed image with great detail.",
    "Characterize the image using a well-detailed description.",
    "Break down the elements of the image in a detailed manner.",
    "Walk through the important details of the image.",
    "Portray the image with a rich, descriptive narrative.",
    "Narrate the contents of the image with precision.",
    "Analyze the image in a comprehensive and detailed manner.",
    "Illustrate the image through a descriptive explanation.",
    "Examine the image closely and share its details.",
    "Write an exhaustive depiction of the given image.",
)

DETAIL_SENTENCES = (
    "the image shows {count} {noun} on {background}.",
    "{object} is {place}.",
    "the {first} is {relation} the {second}.",
)
REASONING_TEMPLATES = {
    "remove": (
        "if the {name} were removed, how many objects would remain?",
        "{count} {noun} would remain: {rest}.",
    ),
    "extreme": ("which object is furthest {side}?", "the {name} is furthest {side}."),
    "sizes": ("are all the objects the same size?", "{verdict}"),
    "colours": ("which colours appear in the image?", "{verdict}"),
    "complete": (
        "how many more objects would be needed to have four objects?",
        "{count} more {noun} would be needed to have four objects.",
    ),
}
SIZE_VERDICTS = ("yes, all {count} objects are {size}.", "no, {large} large, while {small} small.")
COLOUR_VERDICTS = ("the only object in the image is {colours}.", "the objects are {colours}.")
# Side -> (centre axis, sign): the furthest object maximises sign * centre[axis].
SIDES = {
    "to the left": (0, -1),
    "to the right": (0, 1),
    "to the top": (1, -1),
    "to the bottom": (1, 1),
}
_MIN_EXTREME_GAP = 2.0  # pixels between the furthest and the runner-up


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def _with_image(text: str, rng: np.random.Generator) -> str:
    return f"{IMAGE_TOKEN}\n{text}" if rng.random() < 0.5 else f"{text}\n{IMAGE_TOKEN}"


def _turns(pairs: list[tuple[str, str]], rng: np.random.Generator) -> list[dict]:
    turns = []
    for index, (question, answer) in enumerate(pairs):
        question = _sentence(question)
        turns.append(
            {"from": "human", "value": _with_image(question, rng) if index == 0 else question}
        )
        turns.append({"from": "gpt", "value": _sentence(answer)})
    return turns


def conversation(questions: list[dict], rng: np.random.Generator) -> list[dict]:
    """2-3 turns of the scene's VQA questions, answered in full sentences."""
    count = min(len(questions), int(rng.integers(2, 4)))
    picks = rng.choice(len(questions), size=count, replace=False)
    return _turns([(questions[i]["question"], questions[i]["answer_sentence"]) for i in picks], rng)


def detailed_description(scene: dict, rng: np.random.Generator) -> str:
    """A paragraph naming the ground, every object with size and place, and one relation."""
    objects = scene["objects"]
    sentences = [
        DETAIL_SENTENCES[0].format(
            count=texts.number_word(len(objects)),
            noun="object" if len(objects) == 1 else "objects",
            background=texts.background_phrase(scene["background"]),
        )
    ]
    for item in objects:
        sentences.append(
            DETAIL_SENTENCES[1].format(
                object=texts.with_article(texts.object_name(item, size=True)),
                place=vocabulary.POSITION_PHRASES[item["position"]],
            )
        )
    if len(objects) >= 2:
        first, second = (objects[i] for i in rng.choice(len(objects), size=2, replace=False))
        sentences.append(
            DETAIL_SENTENCES[2].format(
                first=texts.object_name(first),
                relation=scenes.relation(first, second),
                second=texts.object_name(second),
            )
        )
    return " ".join(_sentence(sentence) for sentence in sentences)


def _the_list(objects: list[dict]) -> str:
    return texts.join_words([f"the {texts.object_name(item)}" for item in objects])


def _reasoning_options(scene: dict) -> dict[str, tuple[str, str]]:
    """Every reasoning (question, answer) that this scene supports, by template name."""
    objects = scene["objects"]
    count = len(objects)
    options = {}
    colours = texts.join_words(sorted({item["colour"] for item in objects}))
    question, answer = REASONING_TEMPLATES["colours"]
    options["colours"] = (question, COLOUR_VERDICTS[min(count, 2) - 1].format(colours=colours))
    if count < 4:
        missing = 4 - count
        question, answer = REASONING_TEMPLATES["complete"]
        noun = "object" if missing == 1 else "objects"
        options["complete"] = (question, answer.format(count=texts.number_word(missing), noun=noun))
    if count < 2:
        return options
    removed, rest = objects[0], objects[1:]
    question, answer = REASONING_TEMPLATES["remove"]
    options["remove"] = (
        question.format(name=texts.object_name(removed)),
        answer.format(
            count=texts.number_word(len(rest)),
            noun="object" if len(rest) == 1 else "objects",
            rest=_the_list(rest),
        ),
    )
    options["sizes"] = (REASONING_TEMPLATES["sizes"][0], _size_verdict(objects))
    for side, (axis, sign) in SIDES.items():
        keys = sorted((sign * item["centre"][axis], index) for index, item in enumerate(objects))
        if keys[-1][0] - keys[-2][0] >= _MIN_EXTREME_GAP:
            name = texts.object_name(objects[keys[-1][1]])
            question, answer = REASONING_TEMPLATES["extreme"]
            options[f"extreme {side}"] = (
                question.format(side=side),
                answer.format(name=name, side=side),
            )
    return options


def _size_verdict(objects: list[dict]) -> str:
    large = [item for item in objects if item["size"] == "large"]
    small = [item for item in objects if item["size"] == "small"]
    if not large or not small:
        return SIZE_VERDICTS[0].format(
            count=texts.number_word(len(objects)), size=objects[0]["size"]
        )
    verb = lambda items: "is" if len(items) == 1 else "are"
    return SIZE_VERDICTS[1].format(
        large=f"{_the_list(large)} {verb(large)}", small=f"{_the_list(small)} {verb(small)}"
    )


def instructions(scene: dict, questions: list[dict], rng: np.random.Generator) -> list[dict]:
    """The scene's three LLaVA-Instruct samples: conversation, detail and complex reasoning."""
    detail = _turns([(_pick(rng, DETAIL_PROMPTS), detailed_description(scene, rng))], rng)
    options = _reasoning_options(scene)
    reasoning = _turns([options[_pick(rng, sorted(options))]], rng)
    return [
        {"type": "conversation", "conversations": conversation(questions, rng)},
        {"type": "detail", "conversations": detail},
        {"type": "complex_reasoning", "conversations": reasoning},
    ]


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]
