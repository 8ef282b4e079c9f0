"""grain pipelines: batches, process slicing, resumption, corrupt records, workers, eval sources."""

import hashlib
import json
import logging

import numpy as np
import pytest
from absl import flags

from jaxvlm.data import eval_sets, pipeline, sources
from jaxvlm.data.preprocessing import ImagePreprocessing
from jaxvlm.data.world_config import TRAINING_SPLITS

PREPROCESSING = ImagePreprocessing(image_size=64)
MAX_TEXT_LEN = 24


def _iterator(world, tokenizer, task="captions", **overrides):
    arguments = dict(
        split="train" if task == "captions" else TRAINING_SPLITS,
        global_batch_size=8,
        max_text_len=MAX_TEXT_LEN,
        seed=0,
    )
    arguments.update(overrides)
    return pipeline.make_train_iterator(task, world, tokenizer, PREPROCESSING, **arguments)


def _take(iterator, count):
    batches = [next(iterator) for _ in range(count)]
    iterator.close()
    return batches


def _assert_batches_equal(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_caption_batches(small_world, tokenizer):
    (batch,) = _take(_iterator(small_world, tokenizer), 1)
    assert sorted(batch) == ["image", "text_mask", "text_tokens"]
    assert batch["image"].shape == (8, 64, 64, 3) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["text_tokens"].shape == batch["text_mask"].shape == (8, MAX_TEXT_LEN)
    assert batch["text_tokens"].dtype == batch["text_mask"].dtype == np.int32
    assert np.all(batch["text_tokens"][:, 0] == tokenizer.bos_id)
    assert np.all((batch["text_tokens"] == tokenizer.pad_id) == (batch["text_mask"] == 0))


def test_text_batches(small_world, tokenizer):
    (batch,) = _take(_iterator(small_world, tokenizer, "text"), 1)
    assert sorted(batch) == ["loss_mask", "mask", "tokens"]
    for value in batch.values():
        assert value.shape == (8, MAX_TEXT_LEN) and value.dtype == np.int32
    assert np.all(batch["tokens"][:, 0] == tokenizer.bos_id)
    expected = batch["mask"].copy()
    expected[:, 0] = 0
    np.testing.assert_array_equal(batch["loss_mask"], expected)


def test_text_corpus_is_training_text_only(small_world):
    corpus = sources.text_source(small_world, TRAINING_SPLITS)
    texts = [corpus[i]["text"].lower() for i in range(len(corpus))]
    assert len(texts) > 10 * small_world.splits["train"]
    assert not any("<image>" in text for text in texts)
    for phrase in small_world.held_out:
        assert not any(phrase in text for text in texts)
    assert any("moves" in text for text in texts)  # clip captions are in


def _row_texts(row_ids, bos_id):
    """A packed row's texts, split where each begins (bos), as id tuples."""
    starts = [i for i, token in enumerate(row_ids) if token == bos_id]
    return [tuple(row_ids[a:b]) for a, b in zip(starts, [*starts[1:], len(row_ids)], strict=True)]


@pytest.mark.parametrize("packing", ["stream", "record"])
def test_packed_text_rows_hold_whole_texts(small_world, tokenizer, packing):
    """texts_per_row texts per row, each with bos/eos, the last cut at T; with "record" packing
    they are distinct texts of one record (a document), with "stream" texts of the corpus."""
    length, per_row = 160, 4
    iterator = _iterator(
        small_world,
        tokenizer,
        "text",
        max_text_len=length,
        texts_per_row=per_row,
        text_packing=packing,
    )
    (batch,) = _take(iterator, 1)
    encode = lambda text: tuple(tokenizer.encode(text, add_bos=True, add_eos=True))
    by_record = sources.document_source(small_world, TRAINING_SPLITS)
    documents = [{encode(text) for text in by_record[i]["texts"]} for i in range(len(by_record))]
    corpus = set().union(*documents)
    records_seen, packed_rows = set(), 0
    for row in range(batch["tokens"].shape[0]):
        real = int(batch["mask"][row].sum())
        texts = _row_texts(batch["tokens"][row, :real].tolist(), tokenizer.bos_id)
        assert 1 <= len(texts) <= per_row
        packed_rows += len(texts) > 1
        whole, last = texts[:-1], texts[-1]
        assert all(text in corpus for text in whole)
        assert last in corpus or any(text[: len(last)] == last for text in corpus)
        if real < length:  # the row was not cut: the last text is whole
            assert last in corpus
        if packing == "record":
            owners = [i for i, document in enumerate(documents) if set(whole) <= document]
            assert owners and len(set(whole)) == len(whole)
            records_seen.add(owners[0])
        expected = batch["mask"][row].copy()
        expected[0] = 0
        np.testing.assert_array_equal(batch["loss_mask"][row], expected)
    assert packed_rows >= batch["tokens"].shape[0] // 2
    if packing == "record":
        assert len(records_seen) > 1


def test_unknown_text_packing_is_named(small_world, tokenizer):
    with pytest.raises(ValueError, match=r"text_packing='scene'.*stream"):
        _iterator(small_world, tokenizer, "text", text_packing="scene")


@pytest.mark.parametrize("task", ["captions", "text"])
def test_process_slices_make_the_global_batch(small_world, tokenizer, task):
    # 64 of 200 scenes per step: the 5 steps cross an epoch boundary.
    whole = _take(_iterator(small_world, tokenizer, task, global_batch_size=64), 5)
    slices = [
        _take(
            _iterator(
                small_world,
                tokenizer,
                task,
                global_batch_size=64,
                process_index=index,
                process_count=2,
            ),
            5,
        )
        for index in range(2)
    ]
    for step in range(5):
        assert slices[0][step]["text_mask" if task == "captions" else "mask"].shape[0] == 32
        joined = {
            key: np.concatenate([slices[0][step][key], slices[1][step][key]]) for key in whole[step]
        }
        _assert_batches_equal([joined], [whole[step]])


def test_resume_continues_exactly(small_world, tokenizer):
    iterator = _iterator(small_world, tokenizer)
    for _ in range(5):
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))  # as stored in a checkpoint
    expected = _take(iterator, 3)
    resumed = _iterator(small_world, tokenizer)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 3), expected)


def _image_hashes(batches):
    return [hashlib.sha1(image.tobytes()).hexdigest() for b in batches for image in b["image"]]


def test_seeded_and_reshuffled_every_epoch(small_world, tokenizer):
    # 200 scenes in steps of 40: two epochs in ten steps.
    first = _take(_iterator(small_world, tokenizer, global_batch_size=40), 10)
    _assert_batches_equal(first, _take(_iterator(small_world, tokenizer, global_batch_size=40), 10))
    other_seed = _take(_iterator(small_world, tokenizer, global_batch_size=40, seed=1), 1)
    assert _image_hashes(other_seed) != _image_hashes(first[:1])
    epoch_one, epoch_two = _image_hashes(first[:5]), _image_hashes(first[5:])
    assert sorted(epoch_one) == sorted(epoch_two) and epoch_one != epoch_two
    assert len(set(epoch_one)) == 200


class _CorruptedWorld:
    """A world whose train records 3 (image of the wrong shape) and 7 (bad JSON) are broken."""

    def __init__(self, world):
        self.world = world
        self.config = world.config

    def as_data_source(self, split):
        return _CorruptedSource(self.world.as_data_source(split))


class _CorruptedSource:
    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        record = dict(self.source[index])
        if index == 3:
            record["image"] = record["image"][:10]
        if index == 7:
            record["captions"] = record["captions"][:-5]  # truncated JSON
            record["questions"] = b"\xff\xfe"  # not UTF-8
        return record


def test_corrupt_records_are_counted_and_skipped(small_world, tokenizer, caplog):
    corrupted = _CorruptedWorld(small_world)
    with caplog.at_level(logging.WARNING):
        iterator = _iterator(corrupted, tokenizer, global_batch_size=50)
    assert iterator.num_skipped == 2 and iterator.num_examples == small_world.splits["train"] - 2
    assert iterator.source.skipped_indices == [3, 7]
    assert "skipped 2 of 200 corrupt records" in caplog.text
    batches = _take(iterator, 4)  # one epoch
    assert all(b["image"].shape == (50, 64, 64, 3) for b in batches)
    text = sources.text_source(corrupted, "train")
    assert text.num_skipped == 1  # record 3's texts are fine; 7's are not
    pairs = eval_sets.retrieval_pairs(
        corrupted, "train", tokenizer, PREPROCESSING, max_text_len=MAX_TEXT_LEN
    )
    assert len(pairs) == small_world.splits["train"] - 2


def test_worker_processes_give_the_same_batches(small_world, tokenizer):
    flags.FLAGS.mark_as_parsed()  # grain workers read absl flags (RECIPES.md)
    expected = _take(_iterator(small_world, tokenizer), 3)
    iterator = _iterator(small_world, tokenizer, worker_count=2)
    try:
        _assert_batches_equal([next(iterator) for _ in range(3)], expected)
        json.dumps(iterator.get_state())
    finally:
        iterator.close()


def test_eval_sources_pad_the_last_batch(small_world, tokenizer):
    pairs = eval_sets.retrieval_pairs(
        small_world, "test", tokenizer, PREPROCESSING, max_text_len=MAX_TEXT_LEN
    )
    assert len(pairs) == small_world.splits["test"] == 40
    batches = list(eval_sets.batches(pairs, 16))
    assert [b["image"].shape[0] for b in batches] == [16, 16, 16]
    assert sum(int(b["valid"].sum()) for b in batches) == 40
    last = batches[-1]
    assert last["valid"].tolist() == [True] * 8 + [False] * 8
    assert last["index"].tolist() == list(range(32, 40)) + [-1] * 8
    assert np.all(last["text_mask"][8:] == 0)
    first_caption = tokenizer.decode(batches[0]["text_tokens"][0])
    record = small_world.as_data_source("test")[0]
    assert first_caption == record["caption"].decode()
    texts = eval_sets.eval_texts(small_world, "validation", tokenizer, max_text_len=MAX_TEXT_LEN)
    assert sorted(texts[0]) == ["loss_mask", "mask", "tokens"]
    assert len(texts) == len(sources.text_source(small_world, "validation"))


def test_bad_arguments(small_world, tokenizer):
    with pytest.raises(ValueError, match="unknown data task 'pictures'"):
        pipeline.make_train_iterator(
            "pictures",
            small_world,
            tokenizer,
            PREPROCESSING,
            split="train",
            global_batch_size=8,
            max_text_len=8,
            seed=0,
        )
    with pytest.raises(ValueError, match="not divisible by process_count 3"):
        _iterator(small_world, tokenizer, process_count=3)
