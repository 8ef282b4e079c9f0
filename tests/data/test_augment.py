"""BLIP-2 image augmentation on the world: crops that keep objects whole, flips that keep texts true."""

import grain
import numpy as np
import pytest

from jaxvlm.data import pipeline, render, transforms, vocabulary
from jaxvlm.data.builder import decode_record
from jaxvlm.data.grammar import grammar_words
from jaxvlm.data.preprocessing import ImagePreprocessing

PREPROCESSING = ImagePreprocessing(image_size=64)


def _flip(element, p=1.0, seed=0):
    return transforms.FlipSwappingLeftRight(p).random_map(element, np.random.default_rng(seed))


def test_flip_mirrors_the_image_and_swaps_position_words():
    image = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    element = {
        "image": image,
        "text": "a red circle left of a blue star",
        "caption": "a white heart on the right",
        "captions": ["Left of the right star", "LEFT", "two objects: a red circle and a star"],
        "questions": [{"question": "is the star to the right of the cross?", "answers": ["left"]}],
    }
    flipped = _flip(dict(element))
    np.testing.assert_array_equal(flipped["image"], image[:, ::-1])
    assert flipped["text"] == "a red circle right of a blue star"
    assert flipped["caption"] == "a white heart on the left"
    assert flipped["captions"] == [
        "Right of the left star",
        "RIGHT",
        "two objects: a red circle and a star",
    ]
    assert flipped["questions"] == [
        {"question": "is the star to the left of the cross?", "answers": ["right"]}
    ]
    assert _flip(dict(element), p=0.0) == element


def test_flip_swaps_whole_words_only():
    # "bright" is a grammar word holding "right"; "leftover" and "rightmost" are constructed.
    text = "a bright leftover rightmost left_x star, left-hand: right."
    assert (
        transforms.swap_left_right(text)
        == "a bright leftover rightmost left_x star, right-hand: left."
    )


def test_mirrored_words_are_every_left_right_word_of_the_grammar():
    found = {word for word in grammar_words() if "left" in word or "right" in word}
    assert found - set(transforms.MIRRORED_WORDS) == {"bright"}


def test_flip_mirrors_boxes_and_happens_half_the_time():
    element = {"image": np.zeros((4, 8, 3), np.uint8), "boxes": np.array([[2, 1, 5, 4]], np.int32)}
    np.testing.assert_array_equal(_flip(dict(element))["boxes"], [[3, 1, 6, 4]])
    flips = [_flip(dict(element, text="left"), p=0.5, seed=seed)["text"] for seed in range(400)]
    assert 0.4 < flips.count("right") / len(flips) < 0.6


@pytest.mark.parametrize("shape", vocabulary.SHAPES)
def test_pixel_boxes_are_the_painted_pixels(shape):
    image_size = 48
    rng = np.random.default_rng(1)
    for size in vocabulary.SIZES:
        radius = vocabulary.SIZE_RADII[size] * image_size
        for _ in range(8):
            centre = np.round(rng.uniform(radius + 1, image_size - radius - 1, 2) * 4) / 4
            item = {"colour": "white", "shape": shape, "size": size, "centre": centre.tolist()}
            image = render.render_scenes([{"background": "black", "objects": [item]}], [0], 48)
            rows, columns = np.nonzero(image[0].any(axis=-1))
            # The faintest coverage (1/64 of white) still rounds to a non-zero value.
            painted = [columns.min(), rows.min(), columns.max() + 1, rows.max() + 1]
            assert render.pixel_box(shape, size, centre, image_size) == painted


@pytest.fixture(scope="module")
def scenes_with_boxes(small_world):
    source = pipeline.caption_source(small_world, "train", with_boxes=True)
    return [source[index] for index in range(40)]


def test_record_boxes_hold_every_object_pixel(scenes_with_boxes, small_world):
    records = small_world.as_data_source("train")
    decoded = [decode_record(records[index]) for index in range(40)]
    for example, record in zip(scenes_with_boxes, decoded, strict=True):
        assert example["boxes"].shape == (len(record["scene"]["objects"]), 4)
        background = vocabulary.BACKGROUND_COLOURS.get(record["scene"]["background"])
        if background is None:  # noise
            continue
        inside = np.zeros(example["image"].shape[:2], bool)
        for x0, y0, x1, y1 in example["boxes"]:
            inside[y0:y1, x0:x1] = True
        assert not np.any((example["image"] != background).any(axis=-1) & ~inside)


def test_crop_keeps_every_object_inside(scenes_with_boxes):
    crop = transforms.RandomResizedCropKeepingObjects(64, min_scale=0.9)
    windows = 0
    for example in scenes_with_boxes:
        height, width = example["image"].shape[:2]
        for seed in range(25):
            window = crop.crop_window(height, width, example["boxes"], np.random.default_rng(seed))
            if window is None:
                continue
            windows += 1
            top, left, crop_height, crop_width = window
            assert 0 <= top and top + crop_height <= height and 0 <= left
            assert left + crop_width <= width
            assert crop_height * crop_width >= 0.9 * height * width
            assert np.all(example["boxes"][:, :2] >= (left, top))
            assert np.all(example["boxes"][:, 2:] <= (left + crop_width, top + crop_height))
    assert windows > 0.5 * 25 * len(scenes_with_boxes)


def test_crop_resizes_the_window_back(scenes_with_boxes):
    crop = transforms.RandomResizedCropKeepingObjects(64, min_scale=0.9)
    for seed, example in enumerate(scenes_with_boxes[:10]):
        window = crop.crop_window(64, 64, example["boxes"], np.random.default_rng(seed))
        cropped = crop.random_map(dict(example), np.random.default_rng(seed))
        assert "boxes" not in cropped
        assert cropped["image"].shape == example["image"].shape
        assert cropped["image"].dtype == np.uint8
        top, left, height, width = window or (0, 0, 64, 64)
        expected = transforms.resize_bilinear(
            example["image"][top : top + height, left : left + width], 64
        )
        np.testing.assert_array_equal(cropped["image"], expected)


def test_crop_falls_back_to_the_whole_image():
    crop = transforms.RandomResizedCropKeepingObjects(64)
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    # Objects touching all four sides fit no smaller window.
    boxes = np.array([[0, 3, 20, 64], [40, 0, 64, 30]], np.int32)
    assert crop.crop_window(64, 64, boxes, np.random.default_rng(0)) is None
    cropped = crop.random_map({"image": image, "boxes": boxes}, np.random.default_rng(0))
    np.testing.assert_array_equal(cropped["image"], image)
    assert (crop.num_crops, crop.num_fallbacks) == (1, 1)


def test_crop_of_a_float_image_keeps_its_dtype():
    image = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    out = transforms.resize_bilinear(image[1:15, 2:16], 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.float32
    assert image.min() <= out.min() and out.max() <= image.max()


def test_augmentations_depend_only_on_seed_and_element(scenes_with_boxes):
    dataset = grain.MapDataset.source(scenes_with_boxes[:8])
    dataset = dataset.random_map(transforms.RandomResizedCropKeepingObjects(64), seed=5)
    dataset = dataset.random_map(transforms.FlipSwappingLeftRight(), seed=6)
    first = [dataset[index] for index in range(8)]
    again = [dataset[index] for index in reversed(range(8))][::-1]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        assert a["captions"] == b["captions"]
    assert any(
        not np.array_equal(a["image"], example["image"])
        for a, example in zip(first, scenes_with_boxes[:8], strict=True)
    )


def _batch(world, tokenizer, augment, **overrides):
    arguments = dict(split="train", global_batch_size=64, max_text_len=24, seed=0)
    arguments.update(overrides)
    with pipeline.make_train_iterator(
        "captions", world, tokenizer, PREPROCESSING, augment=augment, **arguments
    ) as iterator:
        return next(iterator)


def test_blip2_captions_are_deterministic_and_flip_texts(small_world, tokenizer):
    augmented = _batch(small_world, tokenizer, "blip2")
    again = _batch(small_world, tokenizer, "blip2")
    for key in augmented:
        np.testing.assert_array_equal(augmented[key], again[key])
    halves = [
        _batch(small_world, tokenizer, "blip2", process_index=index, process_count=2)
        for index in range(2)
    ]
    for key in augmented:
        np.testing.assert_array_equal(
            np.concatenate([halves[0][key], halves[1][key]]), augmented[key]
        )
    plain = _batch(small_world, tokenizer, "none")
    assert sorted(augmented) == sorted(plain)
    assert augmented["image"].shape == plain["image"].shape
    assert not np.array_equal(augmented["image"], plain["image"])
    differ = [
        not np.array_equal(a, b) for a, b in zip(augmented["image"], plain["image"], strict=True)
    ]
    assert 0 < sum(differ) < len(differ)  # some examples are neither cropped nor flipped
    swapped = 0
    # The same seed picks the same caption; the flip may only have swapped left and right.
    for a, b in zip(augmented["text_tokens"], plain["text_tokens"], strict=True):
        if not np.array_equal(a, b):
            assert tokenizer.decode(a) == transforms.swap_left_right(tokenizer.decode(b))
            swapped += 1
    assert swapped > 0


def test_unknown_augment_is_named(small_world, tokenizer):
    with pytest.raises(ValueError, match=r"augment='blip3'.*allowed: none, blip2"):
        _batch(small_world, tokenizer, "blip3")
    with pytest.raises(ValueError, match=r"captions task only"):
        pipeline.make_train_iterator(
            "text",
            small_world,
            tokenizer,
            None,
            split="train",
            global_batch_size=8,
            max_text_len=24,
            seed=0,
            augment="blip2",
        )
