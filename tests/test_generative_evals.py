"""Generative evaluators: prompt sets, exactly N examples, stop strings, VQA accuracy and CIDEr."""

import collections
import hashlib

import numpy as np
import pytest

from jaxvlm import data, vlm
from jaxvlm.data import conversations, eval_sets
from jaxvlm.evals import EVALUATORS, EvalContext, GenerativeEvaluator, cider_d
from jaxvlm.evals.generative import score_vqa

SPLIT = "test"
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def setup(tiny_config, cache_dir):
    """(config, world, tokenizer, preprocessing, format, scenes of SPLIT by image hash)."""
    config = tiny_config(
        "llava",
        {
            "evals.vqa.num_examples": 7,
            "evals.caption.num_examples": 7,
            "evals.caption.max_new_tokens": 40,
        },
        stage=2,
    )
    world = data.open_world(config.data.world, cache_dir)
    tokenizer = data.world_tokenizer()
    preprocessing = data.ImagePreprocessing.from_config(config.preprocessing)
    fmt = vlm.conversation_format(config, tokenizer)
    records = world.as_data_source(SPLIT)
    parse = conversations.scene_parser(world.config.image_size)
    scenes = {}
    for index in range(len(records)):
        scene = parse(records[index])
        scenes[_image_key(preprocessing(scene["image"]))] = scene
    assert len(scenes) == len(records)
    return config, world, tokenizer, preprocessing, fmt, scenes


def _image_key(image) -> str:
    return hashlib.sha1(np.ascontiguousarray(image, np.float32).tobytes()).hexdigest()


def _contains(ids, part) -> bool:
    ids, part = list(ids), list(part)
    return any(ids[i : i + len(part)] == part for i in range(len(ids) - len(part) + 1))


def _prompts(setup, kind, num_examples, blind=False):
    config, world, _, preprocessing, fmt, _ = setup
    load = eval_sets.vqa_prompts if kind == "vqa" else eval_sets.caption_prompts
    prompt = config.evals.vqa.prompt if kind == "vqa" else config.evals.caption.prompt
    return load(
        world, SPLIT, fmt, preprocessing, prompt=prompt, num_examples=num_examples, blind=blind
    )


def _real_ids(example):
    """The prompt's ids, checked to be right-aligned after left padding."""
    mask = example["mask"]
    length = int(mask.sum())
    assert mask.tolist() == [0] * (len(mask) - length) + [1] * length
    assert (example["tokens"][: len(mask) - length] == 0).all()
    return example["tokens"][len(mask) - length :].tolist()


def _check_prompt(setup, example, blind):
    config, _, tokenizer, _, fmt, _ = setup
    size, length = config.preprocessing.image_size, config.data.max_text_len
    assert sorted(example) == ["image_mask", "images", "mask", "tokens"]
    assert example["tokens"].shape == example["mask"].shape == (length,)
    assert example["tokens"].dtype == example["mask"].dtype == np.int32
    assert example["images"].shape == (1, size, size, 3)
    assert example["image_mask"].dtype == bool
    ids = _real_ids(example)
    assert ids[0] == tokenizer.bos_id
    assert ids[-5:] == tokenizer.encode("###Assistant:")  # ends where the answer starts
    placeholders = ids.count(fmt.image_token_id)
    if blind:
        assert placeholders == 0 and example["image_mask"].tolist() == [False]
        assert not example["images"].any()
    else:
        assert placeholders == fmt.tokens_per_image and example["image_mask"].tolist() == [True]
        first = ids.index(fmt.image_token_id)  # at the start of the user turn, as in training
        assert ids[first - 2 : first] == tokenizer.encode("Human:")
    return ids


def test_vqa_prompts_are_a_fixed_subset_with_their_answers(setup):
    _, _, tokenizer, _, _, scenes = setup
    prompts = _prompts(setup, "vqa", 7)
    assert len(prompts.prompts) == len(prompts.references) == 7
    again = _prompts(setup, "vqa", 7)
    assert again.references == prompts.references
    asked = set()
    for index in range(7):
        example = prompts.prompts[index]
        np.testing.assert_array_equal(example["tokens"], again.prompts[index]["tokens"])
        ids = _check_prompt(setup, example, blind=False)
        key = _image_key(example["images"][0])
        scene = scenes[key]
        questions = [
            q for q in scene["questions"] if _contains(ids, tokenizer.encode(q["question"]))
        ]
        assert prompts.references[index] in [q["answers"] for q in questions]
        assert _contains(ids, tokenizer.encode("Answer the question using a word or phrase."))
        assert len(prompts.references[index]) == 10
        asked.add((key, questions[0]["question"]))
    assert len(asked) == 7
    everything = _prompts(setup, "vqa", 0)
    assert len(everything.references) == sum(len(s["questions"]) for s in scenes.values())


def test_caption_prompts_are_a_fixed_subset_with_every_caption(setup):
    config, _, tokenizer, _, _, scenes = setup
    prompts = _prompts(setup, "captioning", 5)
    assert len(prompts.prompts) == len(prompts.references) == 5
    assert _prompts(setup, "captioning", 5).references == prompts.references
    seen = set()
    for index in range(5):
        example = prompts.prompts[index]
        ids = _check_prompt(setup, example, blind=False)
        assert _contains(ids, tokenizer.encode(config.evals.caption.prompt))
        key = _image_key(example["images"][0])
        assert prompts.references[index] == scenes[key]["captions"]
        seen.add(key)
    assert len(seen) == 5


@pytest.mark.parametrize("kind", ["vqa", "captioning"])
def test_blind_prompts_are_the_prompts_without_the_image(setup, kind):
    fmt = setup[4]
    seeing, blind = _prompts(setup, kind, 4), _prompts(setup, kind, 4, blind=True)
    assert blind.references == seeing.references
    for index in range(4):
        ids = _check_prompt(setup, blind.prompts[index], blind=True)
        with_image = _real_ids(seeing.prompts[index])
        assert ids == [i for i in with_image if i != fmt.image_token_id]


class FakeGenerate:
    """A `generate` predict fn that answers example i with `answers(i)` (ids; i ≥ num_examples for
    the padding rows), i found by counting rows in call order, a pass over the examples taking
    ceil(num_examples / batch_size) calls; it checks the arguments the evaluator passes."""

    def __init__(
        self,
        answers,
        *,
        num_examples,
        batch_size,
        max_new_tokens,
        tokenizer,
        check_batch=None,
        decoding=None,
    ):
        from jaxvlm.decoding import Decoding

        self.decoding = decoding or Decoding()
        self.answers, self.batch_size = answers, batch_size
        self.calls_per_pass = -(-num_examples // batch_size)
        self.max_new_tokens, self.tokenizer = max_new_tokens, tokenizer
        self.check_batch = check_batch
        self.calls = 0

    def __call__(self, params, batch, *, max_new_tokens, eos_id, pad_id, stop_ids, decoding):
        assert decoding == self.decoding  # the config's num_beams / length_penalty
        assert sorted(batch) == ["image_mask", "images", "mask", "tokens"]
        assert batch["tokens"].shape[0] == self.batch_size
        assert max_new_tokens == self.max_new_tokens
        assert (eos_id, pad_id) == (self.tokenizer.eos_id, 0)
        assert stop_ids == tuple(self.tokenizer.encode("###"))
        if self.check_batch:
            self.check_batch(batch)
        rows = []
        for row in range(self.batch_size):
            first = self.calls % self.calls_per_pass * self.batch_size
            ids = list(self.answers(first + row))[:max_new_tokens]
            rows.append(ids + [pad_id] * (max_new_tokens - len(ids)))
        self.calls += 1
        return np.asarray(rows, np.int32)


def test_evaluator_scores_each_prompt_once_with_vqa_accuracy_by_hand():
    tokenizer = data.world_tokenizer()
    encode = tokenizer.encode
    stop, eos = encode("###"), tokenizer.eos_id
    # (generated ids, the 10 human answers, VQA accuracy by hand: min(matches among 9 / 3, 1)
    # averaged over the 10 ways to leave one human out).
    cases = [
        (encode("red") + stop + encode("blue"), ["red"] * 4 + ["blue"] * 6, 100.0),
        (encode("red") + [eos] + encode("blue"), ["red"] * 3 + ["blue"] * 7, 90.0),
        (encode("red") + stop + stop, ["red"] * 2 + ["blue"] * 8, 60.0),
        (encode("red") + [eos] + stop, ["red"] + ["blue"] * 9, 30.0),
        (encode("blue green") + stop + encode("red"), ["blue"] * 10, 0.0),
        (encode("two") + stop, ["2"] * 10, 100.0),  # answers are normalised
        (encode("red"), ["red"] * 10, 100.0),  # no stop: the budget runs out, pads follow
    ]
    prompts = [
        {
            "tokens": np.full(4, index + 1, np.int32),
            "mask": np.ones(4, np.int32),
            "images": np.zeros((1, 2, 2, 3), np.float32),
            "image_mask": np.ones(1, bool),
        }
        for index in range(len(cases))
    ]

    def answers(index):  # the padding rows of the last batch answer "green"
        return cases[index][0] if index < len(cases) else encode("green")

    generate = FakeGenerate(
        answers, num_examples=7, batch_size=3, max_new_tokens=MAX_NEW_TOKENS, tokenizer=tokenizer
    )
    evaluator = GenerativeEvaluator(
        {"generate": generate},
        data=data.PromptSet(prompts, [case[1] for case in cases]),
        batch_size=3,
        tokenizer=tokenizer,
        stop="###",
        max_new_tokens=MAX_NEW_TOKENS,
        score=score_vqa,
    )
    assert evaluator.predictions(None) == ["red", "red", "red", "red", "blue green", "two", "red"]
    assert generate.calls == 3  # 7 prompts in batches of 3
    metrics = evaluator.run(None)
    assert metrics == {"vqa_accuracy": pytest.approx(sum(case[2] for case in cases) / 7)}


def test_captioning_evaluator_gives_cider_times_100(setup):
    config, world, tokenizer, preprocessing, _, _ = setup
    fields = config.evals.caption
    context = EvalContext(world, tokenizer, preprocessing, config)
    references = _prompts(setup, "captioning", fields.num_examples).references
    other = "a red circle on a black background"
    expected = [refs[0] if index % 2 else other for index, refs in enumerate(references)]

    def answers(index):
        text = expected[index] if index < len(expected) else "a blue square"
        return tokenizer.encode(text) + tokenizer.encode("### a green star")

    generate = FakeGenerate(
        answers,
        num_examples=len(expected),
        batch_size=3,
        max_new_tokens=fields.max_new_tokens,
        tokenizer=tokenizer,
    )
    evaluator = EVALUATORS["captioning"].build({"generate": generate}, context, fields, 3, False)
    assert evaluator.data.references == references
    assert evaluator.predictions(None) == expected
    assert evaluator.run(None) == {"cider": pytest.approx(100 * cider_d(expected, references))}
    assert generate.calls == 2 * 3  # 7 prompts in batches of 3, twice


def test_blind_vqa_evaluator_sends_no_image(setup):
    """... and decodes as its config says (BLIP-2's zero-shot VQA: beam 5, length penalty -1)."""
    from jaxvlm.decoding import Decoding

    config, world, tokenizer, preprocessing, fmt, _ = setup
    fields = config.evals.vqa.copy_and_resolve_references()
    fields.unlock()
    fields.num_beams, fields.length_penalty = 5, -1.0
    context = EvalContext(world, tokenizer, preprocessing, config)
    references = _prompts(setup, "vqa", fields.num_examples).references
    # The most common human answer; by hand, ≥ 4 matching humans score 1 whichever is left out.
    majority = [collections.Counter(refs).most_common(1)[0] for refs in references]
    assert all(count >= 4 for _, count in majority)

    def no_image(batch):
        assert not (batch["tokens"] == fmt.image_token_id).any()
        assert not batch["image_mask"].any()

    def answers(index):
        text = majority[index][0] if index < len(majority) else "purple"
        return tokenizer.encode(text) + tokenizer.encode("###")

    generate = FakeGenerate(
        answers,
        num_examples=len(majority),
        batch_size=4,
        max_new_tokens=fields.max_new_tokens,
        tokenizer=tokenizer,
        check_batch=no_image,
        decoding=Decoding(num_beams=5, length_penalty=-1.0),
    )
    evaluator = EVALUATORS["vqa"].build({"generate": generate}, context, fields, 4, True)
    assert evaluator.data.references == references
    assert evaluator.run(None) == {"vqa_accuracy": pytest.approx(100.0)}
    assert generate.calls == 2
