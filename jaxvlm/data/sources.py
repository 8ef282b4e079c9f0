"""Random-access sources over a world's records, with corrupt records counted and skipped.

A `RecordSource` reads every record of a split once when it is made, keeps the indices of those
that parse, and logs how many did not; evaluators and training then see only whole records, and
the count is known in the main process even when grain workers do the reading later.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from jaxvlm.data import render
from jaxvlm.data.builder import decode_record

Parser = Callable[[dict], dict]


def _check_image(image, image_size: int) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.shape != (image_size, image_size, 3):
        raise ValueError(
            f"image is {image.dtype}{list(image.shape)}, expected uint8[{image_size}, "
            f"{image_size}, 3]"
        )
    return image


def _check_texts(texts, field: str) -> list[str]:
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{field} is not a non-empty list of strings")
    return texts


def object_boxes(scene, image_size: int) -> np.ndarray:
    """int32[N, 4]: per object of a scene graph, [x0, y0, x1, y1) (end exclusive), the pixels
    the renderer may paint for it (`render.pixel_box`, from its shape, size and centre)."""
    if not isinstance(scene, dict) or not isinstance(scene.get("objects"), list):
        raise ValueError("record field 'scene' is not a scene graph with an 'objects' list")
    boxes = [
        render.pixel_box(item["shape"], item["size"], item["centre"], image_size)
        for item in scene["objects"]
    ]
    return np.asarray(boxes, np.int32).reshape(-1, 4)


def caption_parser(image_size: int, *, with_boxes: bool = False) -> Parser:
    """Parses a scene record into {"image": uint8[S, S, 3], "captions": [str], "caption": str},
    plus "boxes" (`object_boxes`) when `with_boxes`, for augmentations that must not cut an
    object."""

    def parse(record: dict) -> dict:
        decoded = decode_record(record)
        parsed = {
            "image": _check_image(decoded["image"], image_size),
            "captions": _check_texts(decoded["captions"], "captions"),
            "caption": _check_texts([decoded["caption"]], "caption")[0],
        }
        if with_boxes:
            parsed["boxes"] = object_boxes(decoded.get("scene"), image_size)
        return parsed

    return parse


def _strip_image(text: str) -> str:
    return text.replace("<image>", " ").strip()


def record_texts(record: dict) -> list[str]:
    """A record's text-only LM examples: captions, "question? answer" pairs, instruction turns.

    Each conversation turn pair becomes one text ("What color is the circle? The circle is red."),
    with the "<image>" placeholder removed; a detailed description is its prompt and paragraph.
    """
    decoded = decode_record(record)
    found = list(_check_texts(decoded["captions"], "captions"))
    for question in decoded["questions"]:
        found.append(f"{question['question']} {question['multiple_choice_answer']}")
    for sample in decoded.get("instructions", []):
        turns = sample["conversations"]
        for human, gpt in zip(turns[::2], turns[1::2], strict=True):
            found.append(f"{_strip_image(human['value'])} {gpt['value']}")
    if not all(isinstance(text, str) and text.strip() for text in found):
        raise ValueError("record holds an empty or non-string text")
    return found


class RecordSource:
    """The parseable records of a data source, parsed on access.

    Attributes:
      num_records: records in the underlying source.
      num_skipped: records that failed to parse and are never returned.
      skipped_indices: their indices in the underlying source.
    """

    def __init__(self, data_source: Sequence, parse: Parser, *, name: str):
        self._data_source = data_source
        self._parse = parse
        self.name = name
        valid, skipped, first_error = [], [], None
        for index in range(len(data_source)):
            try:
                parse(data_source[index])
            except Exception as error:  # any decode failure marks the record corrupt
                skipped.append(index)
                first_error = first_error or f"{type(error).__name__}: {error}"
                continue
            valid.append(index)
        self._valid = np.asarray(valid, np.int64)
        self.num_records = len(data_source)
        self.num_skipped = len(skipped)
        self.skipped_indices = skipped
        if skipped:
            logging.warning(
                "%s: skipped %d of %d corrupt records (first: %s)",
                name,
                len(skipped),
                self.num_records,
                first_error,
            )
        if not valid:
            raise ValueError(f"{name}: none of {self.num_records} records could be read")

    def __len__(self) -> int:
        return len(self._valid)

    def __getitem__(self, index: int) -> dict:
        return self._parse(self._data_source[int(self._valid[index])])

    def __repr__(self) -> str:
        return f"RecordSource({self.name}, {len(self)} records, {self.num_skipped} skipped)"


class TextSource:
    """An in-memory list of texts (or of documents: lists of texts) as a source of {key: item}.

    Attributes:
      key: "text" (one str per item) or "texts" (one record's list of str per item).
      num_skipped: records whose texts could not be read while building the list.
    """

    def __init__(self, texts: list, *, name: str, num_skipped: int = 0, key: str = "text"):
        if not texts:
            raise ValueError(f"{name}: no texts")
        self._texts = texts
        self.name = name
        self.num_skipped = num_skipped
        self.key = key

    def __len__(self) -> int:
        return len(self._texts)

    def __getitem__(self, index: int) -> dict:
        return {self.key: self._texts[int(index)]}

    def __repr__(self) -> str:
        return f"TextSource({self.name}, {len(self)} items, {self.num_skipped} records skipped)"


def _texts_by_record(world, splits: str | Sequence[str]) -> tuple[list[list[str]], int, str]:
    """(each readable record's texts, records skipped, a name) for one split name or several."""
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    documents: list[list[str]] = []
    skipped = 0
    for split in splits:
        data_source = world.as_data_source(split)
        first_error = None
        for index in range(len(data_source)):
            try:
                documents.append(record_texts(data_source[index]))
            except Exception as error:  # any decode failure marks the record corrupt
                skipped += 1
                first_error = first_error or f"{type(error).__name__}: {error}"
        if first_error:
            logging.warning("texts/%s: skipped corrupt records (first: %s)", split, first_error)
    return documents, skipped, "+".join(splits)


def text_source(world, splits: str | Sequence[str]) -> TextSource:
    """Every text of `splits` (one split name or several), in record order; never images.

    Use the training splits ("train", "clips_train") for LM pretraining: they hold no held-out
    composition.
    """
    documents, skipped, name = _texts_by_record(world, splits)
    texts = [text for document in documents for text in document]
    return TextSource(texts, name=f"texts/{name}", num_skipped=skipped)


def document_source(world, splits: str | Sequence[str]) -> TextSource:
    """One item {"texts": [str]} per readable record of `splits`: all the texts about one scene
    (or clip), a coherent document in which later texts follow from earlier ones."""
    documents, skipped, name = _texts_by_record(world, splits)
    return TextSource(documents, name=f"documents/{name}", num_skipped=skipped, key="texts")
