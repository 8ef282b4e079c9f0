"""The tokenizer wrapper and the world's word-level tokenizer."""

import json

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from jaxvlm.data import builder, grammar, sources
from jaxvlm.data.tokenizer import WORLD_SPECIAL_TOKENS, Tokenizer, world_tokenizer

PLAIN_QUESTIONS = [
    "What color is the circle?",
    "What colour is the big square?",
    "How many objects are there?",
    "How many red shapes can you see in this picture?",
    "Is there a red square?",
    "Are there any blue stars?",
    "Describe the image.",
    "Describe this image in detail, please.",
    "Where is the green heart?",
    "Which shape is on the left of the yellow triangle?",
    "Is the white cross above the orange star?",
    "What is the grey object next to the circle?",
    "Which way does the red circle move?",
    "Is the purple triangle bigger than the heart?",
    "What's in the top right corner?",
    "Question: what shape is red? Short answer:",
    "Answer in exactly one word: how many circles are there?",
    "A chat between a curious human and an artificial intelligence assistant.",
]


def test_special_ids_and_size(tokenizer):
    assert tokenizer.pad_id == 0
    assert [tokenizer.token_to_id(t) for t in WORLD_SPECIAL_TOKENS] == list(
        range(len(WORLD_SPECIAL_TOKENS))
    )
    assert (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (1, 2, 3)
    assert tokenizer.token_to_id("<image>") == 4
    assert len(WORLD_SPECIAL_TOKENS) < tokenizer.vocab_size < 1000
    words = set(grammar.grammar_words())
    for word in ["color", "colour", "gray", "grey", "circles", "crosses", "0", "9", "ten", "?"]:
        assert word in words


@pytest.mark.parametrize("text", PLAIN_QUESTIONS)
def test_plain_questions_have_no_unknown_word(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.unk_id not in ids, [tokenizer.id_to_token(i) for i in ids]


def test_every_world_text_is_known(small_world, tokenizer):
    texts = []
    for split in small_world.splits:
        source = small_world.as_data_source(split)
        for index in range(len(source)):
            texts += sources.record_texts(source[index])
            for shot in builder.decode_record(source[index]).get("episode", {"support": []})[
                "support"
            ]:
                texts += [shot["caption"], shot["question"], shot["answer"]]
    for ids, text in zip(tokenizer.encode_batch(texts), texts, strict=True):
        assert tokenizer.unk_id not in ids, text


def test_encode_decode_round_trip(tokenizer):
    text = "Two objects: a red circle, and a blue star (small) on the left-hand side. Why?"
    ids = tokenizer.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert tokenizer.decode(ids) == text.lower()
    assert tokenizer.decode([tokenizer.token_to_id("<image>"), *ids], skip_special_tokens=False)
    assert tokenizer.decode(tokenizer.encode("the human's questions")) == "the human's questions"
    assert tokenizer.encode("<image>\nWhat?")[:1] == [tokenizer.token_to_id("<image>")]


def test_save_load_is_identical(tmp_path, tokenizer):
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    loaded = Tokenizer.from_file(str(path))
    assert loaded.special_token_names == tokenizer.special_token_names
    for text in PLAIN_QUESTIONS:
        assert loaded.encode(text, add_bos=True) == tokenizer.encode(text, add_bos=True)
    loaded.save(str(tmp_path / "again.json"))
    assert (tmp_path / "again.json").read_text() == path.read_text()


def test_from_directory_reads_hf_token_names(tmp_path, tokenizer):
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": {"content": "<cls>"}, "eos_token": "<sep>"})
    )
    loaded = Tokenizer.from_directory(str(tmp_path))
    assert loaded.bos_id == tokenizer.token_to_id("<cls>")
    assert loaded.eos_id == tokenizer.token_to_id("<sep>")
    assert loaded.pad_id == 0


def test_added_special_tokens_stay_whole():
    extended = world_tokenizer(extra_special_tokens=("###", "<query>"))
    base_size = world_tokenizer().vocab_size
    assert extended.vocab_size == base_size + 2
    (new_id,) = extended.add_special_tokens(["<extra>"])
    assert new_id == base_size + 2
    ids = extended.encode("answer ### <extra>")
    assert ids[1:] == [extended.token_to_id("###"), new_id]
    assert extended.decode(ids) == "answer"


def test_missing_token_and_empty_encoding_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Tokenizer.from_file(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        Tokenizer(world_tokenizer().tokenizer, bos_token="<nope>")
    # A tokenizer that drops every word (like a mismatched AutoTokenizer) must not pass silently.
    broken = tokenizers.Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    broken.pre_tokenizer = pre_tokenizers.Split(" ", behavior="removed")
    broken.add_special_tokens(["[UNK]"])
    wrapped = Tokenizer(broken)
    broken.normalizer = tokenizers.normalizers.Replace(tokenizers.Regex(".*"), "")
    with pytest.raises(ValueError, match="to no ids"):
        wrapped.encode("hello")
    assert wrapped.encode("   ") == []
    with pytest.raises(ValueError, match="no bos token"):
        wrapped.encode("", add_bos=True)
