"""Chat templates: LLaVA's Vicuna v0 string, assistant-only loss masks, image slots, stop strings."""

import numpy as np
import pytest
import tokenizers
from tokenizers import models, normalizers, pre_tokenizers

from jaxvlm.data import chat
from jaxvlm.data.chat import ChatTemplate, TokenizationMismatch
from jaxvlm.data.tokenizer import Tokenizer

IMAGE = 4  # the world tokenizer's <image>
N = 3  # image tokens per image in these tests
# LLaVA's conv_vicuna_v0 system prompt (llava/conversation.py).
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions."
)
TWO_TURNS = [
    {"role": "user", "content": "<image>\nWhat color is the circle?"},
    {"role": "assistant", "content": "The circle is red."},
    {"role": "user", "content": "Is it large?"},
    {"role": "assistant", "content": "Yes."},
]
# A Hugging Face ChatML template, as tokenizer_config.json ships it.
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def vicuna(tiny_config):
    """The template the recipes ship (configs/common.py), read from the LLaVA config with the
    Vicuna system message that `size=paper` keeps (the world sizes drop it)."""
    return ChatTemplate.from_config(
        tiny_config("llava", {"template.system_message": SYSTEM}).template
    )


def _runs(mask):
    """[(start, stop)] of the runs of 1s in a 0/1 vector."""
    edges = np.diff(np.concatenate([[0], np.asarray(mask), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


def _encode(tokenizer, template, messages, sample_index=-1):
    return chat.encode_conversation(
        tokenizer,
        template,
        messages,
        image_token_id=IMAGE,
        tokens_per_image=N,
        sample_index=sample_index,
    )


def test_vicuna_v0_renders_llavas_string(vicuna):
    assert vicuna.render(TWO_TURNS, add_generation_prompt=False) == (
        SYSTEM + "###Human: <image>\nWhat color is the circle?###Assistant: The circle is red."
        "###Human: Is it large?###Assistant: Yes.###"
    )
    # The generation prompt ends where LLaVA's `get_prompt` leaves the last message None.
    assert vicuna.render(TWO_TURNS[:3], add_generation_prompt=True, bos_token="<s>") == (
        "<s>" + SYSTEM + "###Human: <image>\nWhat color is the circle?###Assistant: "
        "The circle is red.###Human: Is it large?###Assistant:"
    )
    assert vicuna.stop == "###"


def test_loss_covers_exactly_the_answers_and_their_stop_strings(vicuna, tokenizer):
    encoded = _encode(tokenizer, vicuna, TWO_TURNS)
    assert encoded.ids.dtype == encoded.loss_mask.dtype == np.int32
    assert encoded.ids[0] == tokenizer.bos_id
    runs = _runs(encoded.loss_mask)
    assert len(runs) == 2  # one per assistant turn
    texts = [tokenizer.decode(encoded.ids[start:stop]) for start, stop in runs]
    assert texts == ["the circle is red. # # #", "yes. # # #"]
    expected = [tokenizer.encode(" The circle is red.###"), tokenizer.encode(" Yes.###")]
    assert [encoded.ids[start:stop].tolist() for start, stop in runs] == expected
    assert int(encoded.loss_mask.sum()) == 8 + 5
    # "Assistant:" itself, the system prompt and the human turns are never targets.
    role = tokenizer.encode("Assistant:")
    for start, _ in runs:
        assert encoded.ids[start - len(role) : start].tolist() == role


def test_image_placeholder_becomes_n_slots_without_loss(vicuna, tokenizer):
    encoded = _encode(tokenizer, vicuna, TWO_TURNS)
    text = vicuna.render(TWO_TURNS, add_generation_prompt=False, bos_token="<bos>")
    assert len(encoded.ids) == len(tokenizer.encode(text)) + N - 1
    slots = np.flatnonzero(encoded.ids == IMAGE)
    human = tokenizer.encode("###Human:")
    # A run of N slots right after the first "###Human:".
    assert encoded.ids[slots[0] - len(human) : slots[0]].tolist() == human
    np.testing.assert_array_equal(slots, slots[0] + np.arange(N))
    assert not encoded.loss_mask[slots].any()


def test_expand_image_tokens_never_targets_a_slot():
    ids, loss_mask = chat.expand_image_tokens([5, IMAGE, 6, IMAGE], [1, 1, 1, 0], IMAGE, 3)
    np.testing.assert_array_equal(ids, [5, IMAGE, IMAGE, IMAGE, 6, IMAGE, IMAGE, IMAGE])
    np.testing.assert_array_equal(loss_mask, [1, 0, 0, 0, 1, 0, 0, 0])


def test_three_turns_give_three_answer_spans(vicuna, tokenizer):
    messages = [
        *TWO_TURNS,
        {"role": "user", "content": "Which shape is blue?"},
        {"role": "assistant", "content": "The square."},
    ]
    encoded = _encode(tokenizer, vicuna, messages)
    texts = [tokenizer.decode(encoded.ids[a:b]) for a, b in _runs(encoded.loss_mask)]
    assert texts == ["the circle is red. # # #", "yes. # # #", "the square. # # #"]


def test_place_images_at_the_start_of_the_first_user_turn():
    messages = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yes."}]
    placed = chat.place_images(messages, 1)
    assert placed == [
        {"role": "user", "content": "<image>\nHi?"},
        {"role": "assistant", "content": "Yes."},
    ]
    assert messages[0]["content"] == "Hi?"  # the input is not changed
    assert chat.place_images(messages, 2)[0]["content"] == "<image>\n<image>\nHi?"
    assert chat.place_images(placed, 1) == placed  # already there: left alone
    assert chat.place_images(messages, 0) == messages


@pytest.mark.parametrize(
    "content, num_images, error",
    [
        ("<image>\n<image>\nHi?", 1, "holds 2 <image> placeholders for 1 images"),
        ("<image>\nHi?", 0, "holds 1 <image> placeholders for 0 images"),
    ],
)
def test_place_images_refuses_a_wrong_count(content, num_images, error):
    with pytest.raises(ValueError, match=error):
        chat.place_images([{"role": "user", "content": content}], num_images)


def test_place_images_needs_a_user_turn():
    with pytest.raises(ValueError, match="no user turn"):
        chat.place_images([{"role": "assistant", "content": "Yes."}], 1)


def test_generation_prompt_is_the_training_prefix(vicuna, tokenizer):
    """encode_prompt places the image as training does and stops where the answer's loss starts."""
    question = [{"role": "user", "content": "What color is the circle?"}]
    prompt = chat.encode_prompt(
        tokenizer, vicuna, question, num_images=1, image_token_id=IMAGE, tokens_per_image=N
    )
    trained = _encode(tokenizer, vicuna, [*chat.place_images(question, 1), TWO_TURNS[1]])
    np.testing.assert_array_equal(prompt, trained.ids[: len(prompt)])
    assert _runs(trained.loss_mask)[0][0] == len(prompt)
    assert int((prompt == IMAGE).sum()) == N
    assert prompt[-2:].tolist() == tokenizer.encode("Assistant:")


def test_prompt_without_template_needs_one_placeholder_per_image(tokenizer):
    ids = chat.encode_prompt(
        tokenizer,
        None,
        [{"role": "user", "content": "<image> what is it?"}],
        num_images=1,
        image_token_id=IMAGE,
        tokens_per_image=N,
    )
    assert ids.tolist() == [IMAGE] * N + tokenizer.encode("what is it?")
    with pytest.raises(ValueError, match="0 image placeholders for 1 images"):
        chat.encode_prompt(
            tokenizer,
            None,
            [{"role": "user", "content": "what is it?"}],
            num_images=1,
            image_token_id=IMAGE,
            tokens_per_image=N,
        )


def test_separator_off_token_boundaries_names_the_sample(vicuna, tokenizer):
    # "##x" glues to the next role name: "xHuman" is one word, "x" + "Human" are two.
    glued = ChatTemplate(template=vicuna.template, system_message="Hi.", separator="##x")
    with pytest.raises(TokenizationMismatch, match="sample 7"):
        _encode(tokenizer, glued, TWO_TURNS, sample_index=7)
    # One turn has no boundary after the answer, so it encodes.
    assert _encode(tokenizer, glued, TWO_TURNS[:2]).loss_mask.sum() > 0


def test_template_that_renders_prefixes_differently_is_refused(tokenizer):
    # The generation prompt says "ASSISTANT:" but a rendered answer says "Assistant:".
    template = ChatTemplate(
        template="{% for m in messages %}{{ roles[m['role']] }}: {{ m['content'] }}###{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    with pytest.raises(ValueError, match="sample 3: .* turn 1 as a prefix") as error:
        _encode(tokenizer, template, TWO_TURNS, sample_index=3)
    assert not isinstance(error.value, TokenizationMismatch)


def _chatml_tokenizer() -> Tokenizer:
    words = "system user assistant you are helpful . what color is the circle ? it red yes".split()
    vocabulary = {word: index for index, word in enumerate(["<unk>", *words])}
    model = tokenizers.Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    model.normalizer = normalizers.Lowercase()
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    model.add_special_tokens(["<|im_start|>", "<|im_end|>", "<image>"])
    return Tokenizer(model, eos_token="<|im_end|>")


def test_hf_chatml_template_masks_only_the_assistant():
    tokenizer = _chatml_tokenizer()
    template = ChatTemplate(template=CHATML, separator="", stop="<|im_end|>")
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "<image>\nWhat color is the circle?"},
        {"role": "assistant", "content": "It is red."},
        {"role": "user", "content": "Is it red?"},
        {"role": "assistant", "content": "Yes."},
    ]
    image_id = tokenizer.token_to_id("<image>")
    encoded = chat.encode_conversation(
        tokenizer, template, messages, image_token_id=image_id, tokens_per_image=2
    )
    spans = [
        tokenizer.decode(encoded.ids[a:b], skip_special_tokens=False)
        for a, b in _runs(encoded.loss_mask)
    ]
    assert spans == ["it is red . <|im_end|>", "yes . <|im_end|>"]
    assert int(encoded.loss_mask.sum()) == 5 + 3
    assert int((encoded.ids == image_id).sum()) == 2
    prompt = template.render(messages[:4], add_generation_prompt=True)
    assert prompt.endswith("Is it red?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "ids, stop, eos, expected",
    [
        ([5, 6, 12, 12, 12, 7], (12, 12, 12), 3, [5, 6]),
        ([5, 12, 12, 7, 12, 12, 12], (12, 12, 12), 3, [5, 12, 12, 7]),  # a part is no stop
        ([12, 12, 12, 5], (12, 12, 12), 3, []),
        ([5, 3, 12, 12, 12], (12, 12, 12), 3, [5]),  # EOS first
        ([5, 12, 12, 12, 3], (12, 12, 12), 3, [5]),  # the stop string first
        ([5, 12, 3, 12, 12], (12, 12, 12), 3, [5, 12]),  # a run interrupted by EOS
        ([5, 6, 3, 7], (), 3, [5, 6]),
        ([5, 3, 6], (), None, [5, 3, 6]),
        (np.array([5, 6, 0, 0], np.int32), (12,), 3, [5, 6, 0, 0]),
    ],
)
def test_truncate_at_stop(ids, stop, eos, expected):
    assert chat.truncate_at_stop(ids, stop, eos) == expected


def test_decode_answer_cuts_on_the_stop_ids_the_text_would_miss(tokenizer):
    answer, stop_ids = tokenizer.encode("a red circle"), tokenizer.encode("###")
    assert chat.encode_stop(tokenizer, "###") == tuple(stop_ids)
    assert chat.encode_stop(tokenizer, "") == ()
    assert "###" not in tokenizer.decode(answer + stop_ids)  # the world tokenizer: "# # #"
    eos, pad = tokenizer.eos_id, tokenizer.pad_id
    for ids in (answer + stop_ids + answer, answer + [eos] + stop_ids, answer + [eos, pad, pad]):
        assert chat.decode_answer(tokenizer, np.asarray(ids), "###") == "a red circle"
    assert chat.decode_answer(tokenizer, answer + stop_ids + [eos], "") == "a red circle # # #"


def test_bad_messages_and_template_fields_are_refused(vicuna):
    with pytest.raises(ValueError, match="message 1 must be"):
        vicuna.render(
            [TWO_TURNS[0], {"role": "bot", "content": "Hi."}], add_generation_prompt=False
        )
    with pytest.raises(ValueError, match=r"unknown fields \['stop_string'\]"):
        ChatTemplate.from_config({"template": "", "stop_string": "###"})


def test_llava_turns_become_messages():
    turns = [{"from": "human", "value": "<image>\nHi?"}, {"from": "gpt", "value": "Yes."}]
    assert chat.from_llava_turns(turns) == [
        {"role": "user", "content": "<image>\nHi?"},
        {"role": "assistant", "content": "Yes."},
    ]


def test_a_system_message_is_the_system_prompt_or_refused(vicuna):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    try:
        text = vicuna.render(messages, add_generation_prompt=True)
    except ValueError:
        return
    assert text == "Be brief.###Human: Hi?###Assistant:"
