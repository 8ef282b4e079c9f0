"""LLaVA conversation batches ("llava_captions", "instructions") on the tiny world."""

import hashlib

import numpy as np
import pytest

from jaxvlm import data, vlm
from jaxvlm.data import chat, conversations, eval_sets, instructions, pipeline

BATCH = 8
VICUNA = (
    "{{ bos_token }}{{ system_message }}{{ separator }}{% for m in messages %}"
    "{{ roles[m['role']] }}: {{ m['content'] }}{{ separator }}{% endfor %}"
    "{% if add_generation_prompt %}{{ roles['assistant'] }}:{% endif %}"
)
SCENE_SPLIT = "train"
VQA_ONLY = {
    "data.instruction_mix.conversation": 0.0,
    "data.instruction_mix.detail": 0.0,
    "data.instruction_mix.complex_reasoning": 0.0,
    "data.instruction_mix.vqa": 1.0,
    "data.instruction_mix.caption": 0.0,
    "data.vqa_turns": 1,  # one question per sample (several: test_vqa_turns_...)
}


@pytest.fixture(scope="module")
def setup(tiny_config, cache_dir):
    """(world, tokenizer, preprocessing, the scenes of SCENE_SPLIT by image hash)."""
    config = tiny_config("llava", stage=1)
    world = data.open_world(config.data.world, cache_dir)
    preprocessing = data.ImagePreprocessing.from_config(config.preprocessing)
    records = world.as_data_source(SCENE_SPLIT)
    parse = conversations.scene_parser(world.config.image_size)
    scenes = {}
    for index in range(len(records)):
        scene = parse(records[index])
        scenes[_image_key(preprocessing(scene["image"]))] = scene
    assert len(scenes) == len(records)  # every image identifies its scene
    return world, data.world_tokenizer(), preprocessing, scenes


def _image_key(image) -> str:
    return hashlib.sha1(np.ascontiguousarray(image, np.float32).tobytes()).hexdigest()


def _iterator(setup, config, seed=0):
    world, tokenizer, preprocessing, _ = setup
    return pipeline.make_train_iterator(
        config.data.task,
        world,
        tokenizer,
        preprocessing,
        split=SCENE_SPLIT,
        global_batch_size=BATCH,
        max_text_len=config.data.max_text_len,
        seed=seed,
        conversation=vlm.conversation_format(config, tokenizer),
    )


def _take(iterator, count):
    batches = [next(iterator) for _ in range(count)]
    iterator.close()
    return batches


def _contains(ids, part) -> bool:
    ids, part = list(ids), list(part)
    return any(ids[i : i + len(part)] == part for i in range(len(ids) - len(part) + 1))


def _check_batch(batch, config, tokens_per_image):
    """The documented keys, shapes and dtypes, and the placeholder and mask invariants."""
    size, length = config.preprocessing.image_size, config.data.max_text_len
    assert sorted(batch) == sorted(conversations.CONVERSATION_KEYS)
    for key in ("tokens", "mask", "loss_mask"):
        assert batch[key].shape == (BATCH, length) and batch[key].dtype == np.int32, key
    assert batch["images"].shape == (BATCH, 1, size, size, 3)
    assert batch["images"].dtype == np.float32
    assert batch["image_mask"].shape == (BATCH, 1) and batch["image_mask"].dtype == bool
    assert batch["image_mask"].all()
    vlm.check_placeholders(
        batch["tokens"],
        batch["image_mask"],
        tokens_per_image,
        image_token_id=config.data.image_token_id,
    )
    is_image = batch["tokens"] == config.data.image_token_id
    assert not (batch["loss_mask"] & ~batch["mask"].astype(bool)).any()  # loss ⊆ mask
    assert not batch["loss_mask"][is_image].any()
    for row in batch["mask"]:  # real tokens first, then padding
        assert row.tolist() == sorted(row.tolist(), reverse=True)
    assert (batch["tokens"][batch["mask"] == 0] == 0).all()


def _answer_ids(batch, row):
    return batch["tokens"][row][batch["loss_mask"][row] == 1].tolist()


def test_llava_caption_batches(setup, tiny_config):
    _, tokenizer, _, scenes = setup
    config = tiny_config("llava", stage=1)
    assert config.data.task == "llava_captions"
    batches = _take(_iterator(setup, config), 2)
    stop = tokenizer.encode("###")
    tokens_per_image = vlm.tokens_per_image(config)
    prompts = [tokenizer.encode(prompt) for prompt in instructions.BRIEF_PROMPTS]
    image_first = []
    for batch in batches:
        _check_batch(batch, config, tokens_per_image)
        for row in range(BATCH):
            scene = scenes[_image_key(batch["images"][row, 0])]
            tokens = batch["tokens"][row][batch["mask"][row] == 1].tolist()
            assert batch["mask"][row].sum() < config.data.max_text_len  # nothing was cut
            # The answer is one of this scene's captions and its "###", and only that.
            answers = [tokenizer.encode(caption) + stop for caption in scene["captions"]]
            assert _answer_ids(batch, row) in answers
            assert tokens[-len(stop) :] == stop
            # The question is one of LLaVA's brief prompts; the image before or after it.
            assert sum(_contains(tokens, prompt) for prompt in prompts) == 1
            first = tokens.index(config.data.image_token_id)
            before = tokens[first - 2 : first] == tokenizer.encode("Human:")
            after = tokens[first + tokens_per_image :][:5] == tokenizer.encode("###Assistant:")
            assert before != after
            image_first.append(before)
    assert 0 < sum(image_first) < len(image_first)  # both placements occur


def _candidate_conversations(scene, fmt):
    """Every conversation the "instructions" task may make of a scene."""
    found = [chat.from_llava_turns(sample["conversations"]) for sample in scene["instructions"]]
    for question in scene["questions"]:
        text = fmt.vqa_prompt.format(question=question["question"])
        for user in (f"<image>\n{text}", f"{text}\n<image>"):
            answer = question["multiple_choice_answer"]
            found.append(
                [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
            )
    for caption in scene["captions"]:
        for prompt in fmt.caption_prompts:
            for user in (f"<image>\n{prompt}", f"{prompt}\n<image>"):
                answer = caption[0].upper() + caption[1:]
                found.append(
                    [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
                )
    return found


def test_instruction_rows_are_their_scenes_conversations(setup, tiny_config):
    """Each row is one of its scene's samples, encoded and cut at T; the loss is its answers."""
    _, tokenizer, _, scenes = setup
    # One question per "vqa" sample, so that every candidate can be listed (several turns: below).
    config = tiny_config("llava", {"data.vqa_turns": 1}, stage=2)
    assert config.data.task == "instructions"
    fmt = vlm.conversation_format(config, tokenizer)
    length = config.data.max_text_len
    (batch,) = _take(_iterator(setup, config), 1)
    _check_batch(batch, config, fmt.tokens_per_image)
    turns = []
    for row in range(BATCH):
        scene = scenes[_image_key(batch["images"][row, 0])]
        matches = []
        for messages in _candidate_conversations(scene, fmt):
            encoded = chat.encode_conversation(
                tokenizer,
                fmt.template,
                messages,
                image_token_id=fmt.image_token_id,
                tokens_per_image=fmt.tokens_per_image,
            )
            kept = min(length, len(encoded.ids))
            if np.array_equal(batch["tokens"][row, :kept], encoded.ids[:kept]):
                np.testing.assert_array_equal(
                    batch["loss_mask"][row, :kept], encoded.loss_mask[:kept]
                )
                assert batch["mask"][row].sum() == kept
                matches.append(messages)
        assert matches, f"row {row} is none of its scene's conversations"
        turns.append(len(matches[0]))
    assert max(turns) > 2  # multi-turn conversations are in the mix


def test_vqa_answers_are_the_questions_answer(setup, tiny_config):
    _, tokenizer, _, scenes = setup
    config = tiny_config("llava", VQA_ONLY, stage=2)
    batches = _take(_iterator(setup, config), 2)
    stop = tokenizer.encode("###")
    tokens_per_image = vlm.tokens_per_image(config)
    for batch in batches:
        _check_batch(batch, config, tokens_per_image)
        for row in range(BATCH):
            scene = scenes[_image_key(batch["images"][row, 0])]
            tokens = batch["tokens"][row].tolist()
            asked = [
                q for q in scene["questions"] if _contains(tokens, tokenizer.encode(q["question"]))
            ]
            assert asked
            answer = _answer_ids(batch, row)
            assert answer in [tokenizer.encode(q["multiple_choice_answer"]) + stop for q in asked]
            assert len(answer) <= 2 + len(stop)  # a word or phrase
            assert _contains(
                tokens, tokenizer.encode("Answer the question using a word or phrase.")
            )


def test_seeded_and_resumable(setup, tiny_config):
    config = tiny_config("llava", stage=2)
    expected = _take(_iterator(setup, config), 3)
    iterator = _iterator(setup, config)
    next(iterator)
    state = iterator.get_state()
    continued = _take(iterator, 2)
    resumed = _iterator(setup, config)
    resumed.set_state(state)
    for got in (continued, _take(resumed, 2)):
        for a, b in zip(got, expected[1:], strict=True):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    (other,) = _take(_iterator(setup, config, seed=1), 1)
    assert not np.array_equal(other["tokens"], expected[0]["tokens"])


def test_max_text_len_that_cuts_the_image_slots_raises(setup, tiny_config):
    # 16 image slots after "###Human:" (the world recipes drop the system message) do not fit in 12.
    config = tiny_config("llava", {"data.max_text_len": 12}, stage=1)
    iterator = _iterator(setup, config)
    with pytest.raises(ValueError, match=r"sample 0 .* max_text_len=12 would cut \d+ image tokens"):
        next(iterator)
    iterator.close()


def test_pad_left_right_aligns_prompts():
    tokens, mask = conversations.pad_left([7, 8, 9], 5, 0)
    assert tokens.tolist() == [0, 0, 7, 8, 9] and mask.tolist() == [0, 0, 1, 1, 1]
    assert tokens.dtype == mask.dtype == np.int32
    with pytest.raises(ValueError, match="the prompt is 6 tokens, longer than the context of 5"):
        conversations.pad_left([1] * 6, 5, 0)


def test_pad_right_cuts_text_but_never_image_slots():
    tokens, mask = conversations.pad_right([5, 4, 4, 6, 7], 4, 0, 4, 0)
    assert tokens.tolist() == [5, 4, 4, 6] and mask.tolist() == [1, 1, 1, 1]
    tokens, mask = conversations.pad_right([5, 6], 4, 0, 4, 0)
    assert tokens.tolist() == [5, 6, 0, 0] and mask.tolist() == [1, 1, 0, 0]
    with pytest.raises(ValueError, match="sample 9 is 4 tokens; .* max_text_len=2 would cut 1"):
        conversations.pad_right([5, 4, 4, 6], 2, 0, 4, 9)


def test_tokenization_mismatch_names_the_stream_index(setup):
    _, tokenizer, preprocessing, scenes = setup
    template = chat.ChatTemplate(VICUNA, separator="##x")
    fmt = conversations.ConversationFormat(tokenizer, template, 4, 2, 64)
    scene = next(iter(scenes.values()))
    conversation = next(s for s in scene["instructions"] if s["type"] == "conversation")
    element = {
        "image": scene["image"],
        "messages": chat.from_llava_turns(conversation["conversations"]),
    }
    with pytest.raises(data.TokenizationMismatch, match="sample 5:"):
        conversations.EncodeConversation(fmt, preprocessing)(5, element)


@pytest.mark.parametrize(
    "fields, error",
    [
        ({"mix": {"dialogue": 1.0}}, r"unknown types \['dialogue'\]"),
        ({"mix": {"vqa": 0.0}}, "has no positive weight"),
        ({"vqa_prompt": "Answer briefly."}, "has no {question} slot"),
        ({"image_position": "last"}, "image_position='last'; allowed: random, first"),
    ],
)
def test_bad_conversation_formats(setup, fields, error):
    _, tokenizer, _, _ = setup
    with pytest.raises(ValueError, match=error):
        conversations.ConversationFormat(tokenizer, chat.ChatTemplate(""), 4, 2, 64, **fields)


@pytest.mark.parametrize("question", ["Describe the image.", "<image>\n<image>\nDescribe it."])
def test_training_conversation_gets_one_image_or_refuses(setup, question):
    _, tokenizer, preprocessing, scenes = setup
    scene = next(iter(scenes.values()))
    fmt = conversations.ConversationFormat(tokenizer, chat.ChatTemplate(VICUNA), 4, 3, 96)
    messages = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": "A red circle."},
    ]
    encode = conversations.EncodeConversation(fmt, preprocessing)
    try:
        example = encode(0, {"image": scene["image"], "messages": messages})
    except ValueError as error:  # refusing a wrong placeholder count is fine too
        assert "placeholders for 1 images" in str(error)
        return
    vlm.check_placeholders(
        example["tokens"][None], example["image_mask"][None], 3, image_token_id=4
    )


def test_vqa_turns_ask_several_questions_about_one_image(setup, tiny_config):
    _, tokenizer, _, scenes = setup
    config = tiny_config(
        "llava", {**VQA_ONLY, "data.vqa_turns": 3, "data.max_text_len": 160}, stage=2
    )
    stop = tokenizer.encode("###")
    batch = _take(_iterator(setup, config), 1)[0]
    _check_batch(batch, config, vlm.tokens_per_image(config))
    for row in range(BATCH):
        scene = scenes[_image_key(batch["images"][row, 0])]
        tokens = batch["tokens"][row].tolist()
        asked = [
            q for q in scene["questions"] if _contains(tokens, tokenizer.encode(q["question"]))
        ]
        assert len(asked) == min(3, len(scene["questions"]))
        assert (batch["tokens"][row] == 4).sum() == vlm.tokens_per_image(config)  # one image
        answers = [tokenizer.encode(q["multiple_choice_answer"]) + stop for q in asked]
        assert sorted(_answer_ids(batch, row)) == sorted(
            sum(answers, [])
        )  # every answer, only them


def test_blip2_vqa_rows_feed_the_question_to_the_bridge(setup, tiny_config):
    """`configs/blip2.py:stage=vqa`: the image's query slots first, "Question: q Answer:" and the
    answer for the LLM, and the question alone (bos q eos) for the Q-Former, in training and in
    the evaluation prompts."""
    world, tokenizer, preprocessing, scenes = setup
    config = tiny_config("blip2", stage="vqa")
    assert config.bridge.read_prompt and config.data.image_position == "first"
    batches = _take(_iterator(setup, config), 2)
    image = config.data.image_token_id
    length = config.data.bridge_max_text_len
    for batch in batches:
        assert sorted(batch) == sorted(
            conversations.CONVERSATION_KEYS + conversations.BRIDGE_TEXT_KEYS
        )
        assert batch["bridge_ids"].shape == batch["bridge_mask"].shape == (BATCH, length)
        for row in range(BATCH):
            scene = scenes[_image_key(batch["images"][row, 0])]
            tokens = batch["tokens"][row].tolist()
            assert tokens[1] == image and tokens[0] == tokenizer.bos_id  # the soft prompt first
            bridge = batch["bridge_ids"][row][batch["bridge_mask"][row] == 1].tolist()
            questions = [
                tokenizer.encode(q["question"], add_bos=True, add_eos=True)
                for q in scene["questions"]
            ]
            assert bridge in questions
            asked = tokenizer.encode(f"Question: {tokenizer.decode(bridge)} Answer:")
            assert _contains(tokens, asked)
    fmt = vlm.conversation_format(config, tokenizer)
    prompts = data.vqa_prompts(
        world, "test", fmt, preprocessing, prompt=config.evals.vqa.prompt, num_examples=3
    )
    scenes_test = eval_sets.eval_scenes(world, "test")
    for example, (scene, number) in zip(
        prompts.prompts, eval_sets.vqa_question_pairs(scenes_test, 3), strict=True
    ):
        question = scenes_test[scene]["questions"][number]["question"]
        bridge = example["bridge_ids"][example["bridge_mask"] == 1].tolist()
        assert bridge == tokenizer.encode(question, add_bos=True, add_eos=True)


def test_bridge_text_is_cut_to_its_length_keeping_eos(setup):
    _, tokenizer, _, _ = setup
    fmt = conversations.ConversationFormat(
        tokenizer, chat.ChatTemplate(VICUNA), 4, 3, 96, bridge_tokenizer=tokenizer, bridge_max_len=4
    )
    text = fmt.bridge_text("what color is the big circle")
    ids = tokenizer.encode("what color is the big circle", add_bos=True, add_eos=True)
    assert text["bridge_ids"].tolist() == [*ids[:3], tokenizer.eos_id]
    assert text["bridge_mask"].tolist() == [1, 1, 1, 1]
    short = fmt.bridge_text("red")
    assert short["bridge_mask"].tolist() == [1, 1, 1, 0]
    assert (
        conversations.ConversationFormat(
            tokenizer, chat.ChatTemplate(VICUNA), 4, 3, 96
        ).bridge_text("red")
        == {}
    )
