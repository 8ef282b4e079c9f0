"""Image preprocessing: layouts, resizing, normalisation, preprocessing.json, image files."""

import numpy as np
import pytest
from PIL import Image

from jaxvlm.data.preprocessing import CLIP_MEAN, CLIP_STD, ImagePreprocessing, load_image


def test_same_size_is_pure_normalisation():
    preprocessing = ImagePreprocessing(image_size=8, mean=CLIP_MEAN, std=CLIP_STD)
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    expected = (image / 255.0 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    result = preprocessing(image)
    assert result.dtype == np.float32 and result.shape == (8, 8, 3)
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(preprocessing.normalize(image[None])[0], result)


@pytest.mark.parametrize(
    "shape", [(40, 60), (40, 60, 1), (40, 60, 3), (40, 60, 4), (100, 30, 3), (16, 16, 3)]
)
@pytest.mark.parametrize("resize", ["shortest_edge", "squash"])
def test_any_layout_and_size(shape, resize):
    preprocessing = ImagePreprocessing(image_size=32, resize=resize)
    image = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    result = preprocessing(image)
    assert result.shape == (32, 32, 3) and result.dtype == np.float32
    assert -1.0 <= result.min() and result.max() <= 1.0


def test_shortest_edge_crops_the_centre():
    image = np.zeros((32, 96, 3), np.uint8)
    image[:, 32:64] = 255  # a white middle third
    result = ImagePreprocessing(image_size=32, resample="nearest")(image)
    np.testing.assert_array_equal(result, np.ones((32, 32, 3), np.float32))


def test_json_round_trip(tmp_path):
    preprocessing = ImagePreprocessing(image_size=224, mean=CLIP_MEAN, std=CLIP_STD)
    path = str(tmp_path / "preprocessing.json")
    preprocessing.save(path)
    assert ImagePreprocessing.load(path) == preprocessing
    assert ImagePreprocessing.from_json(preprocessing.to_json()) == preprocessing
    assert ImagePreprocessing.from_config({"image_size": 64, "mean": [0.5] * 3}).mean == (0.5,) * 3
    with pytest.raises(ValueError, match="unknown preprocessing fields"):
        ImagePreprocessing.from_config({"size": 3})
    with pytest.raises(ValueError, match="resize 'stretch'"):
        ImagePreprocessing(resize="stretch")


def test_load_image(tmp_path):
    path = tmp_path / "image.png"
    Image.fromarray(np.full((5, 7, 4), 200, np.uint8)).save(path)
    image = load_image(str(path))
    assert image.shape == (5, 7, 3) and image.dtype == np.uint8
    with pytest.raises(ValueError, match="missing.png does not exist"):
        load_image(str(tmp_path / "missing.png"))
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.jpg could not be decoded") as error:
        load_image(str(tmp_path / "bad.jpg"))
    assert "\n" not in str(error.value)
