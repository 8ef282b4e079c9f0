"""grain input pipelines over a world: infinite training iterators and exact evaluation sources.

Training (`make_train_iterator`), per INTERFACES.md §5: the examples form one infinite stream,
shuffled afresh every epoch from `seed`; the global batch at step k is stream elements
[k B, (k + 1) B), and process i of P yields its contiguous slice
[k B + i B / P, k B + (i + 1) B / P).
Every per-example random choice depends only on (seed, stream index), so the global batch is the
same for any process count. Iterator state is a small JSON-ready dict; restoring it continues the
stream exactly.

Tasks and their batches (B = local batch, S = image size, T = max_text_len):
  "captions": {"image": float32[B, S, S, 3] (normalised), "text_tokens": int32[B, T],
               "text_mask": int32[B, T] (1 = real token)}; one of the scene's captions per
               example, with bos and eos.
  "text":     {"tokens": int32[B, T], "mask": int32[B, T], "loss_mask": int32[B, T] (1 where the
               token is a next-token target: real and not the first)}; texts only (captions,
               "question? answer" pairs, instruction turns) of the given split(s).

Evaluation sources have `__len__` / `__getitem__` and hold exactly the split's readable records;
`batches(source, batch_size)` pads the last batch and marks padding in "valid".
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence

import grain
import numpy as np

from jaxvlm.data import sources, transforms
from jaxvlm.data.preprocessing import ImagePreprocessing
from jaxvlm.data.tokenizer import Tokenizer

TASKS: tuple[str, ...] = ("captions", "text")
CAPTION_KEYS = ("image", "text_tokens", "text_mask")
TEXT_KEYS = ("tokens", "mask", "loss_mask")
# Each element read ahead is a whole local batch, so a short buffer is enough.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


class TrainIterator:
    """An infinite iterator of batches with JSON-ready `get_state` / `set_state`.

    Attributes:
      source: the example source (its `num_skipped` corrupt records are never yielded).
    """

    def __init__(self, iterator: grain.DatasetIterator, source):
        self._iterator = iterator
        self.source = source

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> dict:
        """The position in the stream, as plain JSON types (stored in checkpoints as JSON)."""
        return json.loads(json.dumps(self._iterator.get_state()))

    def set_state(self, state: dict) -> None:
        self._iterator.set_state(state)

    @property
    def num_skipped(self) -> int:
        """Corrupt records skipped (counted and logged when the source was read)."""
        return self.source.num_skipped

    @property
    def num_examples(self) -> int:
        """Examples in one epoch."""
        return len(self.source)

    def close(self) -> None:
        """Stops prefetch threads and worker processes."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> TrainIterator:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _pad_id(tokenizer: Tokenizer) -> int:
    return 0 if tokenizer.pad_id is None else tokenizer.pad_id


def _caption_source(world, split: str) -> sources.RecordSource:
    parse = sources.caption_parser(world.config.image_size)
    return sources.RecordSource(world.as_data_source(split), parse, name=f"captions/{split}")


def _caption_transforms(tokenizer, preprocessing, max_text_len, text_key: str) -> list:
    return [
        transforms.TokenizeText(tokenizer, text_key=text_key),
        transforms.PadTokens(
            max_text_len, _pad_id(tokenizer), tokens_key="text_tokens", mask_key="text_mask"
        ),
        transforms.NormalizeImage(preprocessing),
        transforms.SelectKeys(CAPTION_KEYS),
    ]


def _text_transforms(tokenizer, max_text_len) -> list:
    return [
        transforms.TokenizeText(tokenizer),
        transforms.PadTokens(max_text_len, _pad_id(tokenizer)),
        transforms.AddLossMask(),
        transforms.SelectKeys(TEXT_KEYS),
    ]


def make_train_iterator(
    task: str,
    world,
    tokenizer: Tokenizer,
    preprocessing: ImagePreprocessing | None,
    *,
    split: str | Sequence[str],
    global_batch_size: int,
    max_text_len: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int = 0,
) -> TrainIterator:
    """An infinite, resumable iterator of this process's slice of the global batches.

    Args:
      task: "captions" or "text" (see the module docstring for the batches).
      world: a `World` (from `load_world`).
      tokenizer: encodes texts (bos and eos added).
      preprocessing: image preprocessing ("captions"; unused by "text").
      split: a scene split for "captions"; for "text" a split or several, e.g.
        ("train", "clips_train").
      global_batch_size: B, divisible by process_count.
      max_text_len: T; longer texts are truncated.
      seed: seeds the per-epoch shuffles and per-example choices.
      process_index: this process, in [0, process_count).
      process_count: P.
      worker_count: grain worker processes (0: read in this process).
    """
    if task not in TASKS:
        raise ValueError(f"unknown data task {task!r}; tasks: {', '.join(TASKS)}")
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by process_count "
            f"{process_count}"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if task == "captions":
        if preprocessing is None:
            raise ValueError("the captions task needs an ImagePreprocessing")
        source = _caption_source(world, split)
        dataset = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
        dataset = dataset.random_map(transforms.PickCaption(), seed=seed)
        steps = _caption_transforms(tokenizer, preprocessing, max_text_len, text_key="text")
    else:
        source = sources.text_source(world, split)
        dataset = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
        steps = _text_transforms(tokenizer, max_text_len)
    for step in steps:
        dataset = dataset.map(step)
    local_batch_size = global_batch_size // process_count
    # Local batch m holds stream elements [m b, (m + 1) b); process i takes m = k P + i.
    dataset = dataset.batch(local_batch_size, drop_remainder=True)
    dataset = dataset[process_index::process_count]
    iter_dataset = dataset.to_iter_dataset(_READ_OPTIONS)
    if worker_count > 0:
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count)
        )
    return TrainIterator(iter(iter_dataset), source)


def retrieval_pairs(
    world,
    split: str,
    tokenizer: Tokenizer,
    preprocessing: ImagePreprocessing,
    *,
    max_text_len: int,
) -> grain.MapDataset:
    """Aligned image-caption pairs of `split`: example i is {"image": float32[S, S, 3],
    "text_tokens": int32[T], "text_mask": int32[T]}, the image and its retrieval caption."""
    dataset = grain.MapDataset.source(_caption_source(world, split))
    for step in _caption_transforms(tokenizer, preprocessing, max_text_len, text_key="caption"):
        dataset = dataset.map(step)
    return dataset


@dataclasses.dataclass(frozen=True)
class RetrievalSet:
    """A split for image–text retrieval with every reference caption (COCO protocol).

    images: example i is {"image": float32[S, S, 3]}; texts: example j is {"text_tokens": int32[T],
    "text_mask": int32[T]}; text_to_image: int[J], the image of text j.
    """

    images: grain.MapDataset
    texts: grain.MapDataset
    text_to_image: np.ndarray


def retrieval_set(
    world,
    split: str,
    tokenizer: Tokenizer,
    preprocessing: ImagePreprocessing,
    *,
    max_text_len: int,
) -> RetrievalSet:
    """Every image of `split` and all of its captions (≥ 5 each), for R@K in both directions."""
    records = _caption_source(world, split)
    captions = [records[i]["captions"] for i in range(len(records))]
    texts = [text for image_captions in captions for text in image_captions]
    text_to_image = np.repeat(np.arange(len(captions)), [len(c) for c in captions])
    images = (
        grain.MapDataset.source(records)
        .map(transforms.NormalizeImage(preprocessing))
        .map(transforms.SelectKeys(("image",)))
    )
    text_dataset = grain.MapDataset.source(texts).map(lambda text: {"caption": text})
    for step in (
        transforms.TokenizeText(tokenizer, text_key="caption"),
        transforms.PadTokens(
            max_text_len, _pad_id(tokenizer), tokens_key="text_tokens", mask_key="text_mask"
        ),
        transforms.SelectKeys(("text_tokens", "text_mask")),
    ):
        text_dataset = text_dataset.map(step)
    return RetrievalSet(images, text_dataset, text_to_image)


def eval_texts(
    world, split: str | Sequence[str], tokenizer: Tokenizer, *, max_text_len: int
) -> grain.MapDataset:
    """The texts of `split` (e.g. "validation") for perplexity: example i is {"tokens", "mask",
    "loss_mask"}, each int32[T], as in the "text" training task."""
    dataset = grain.MapDataset.source(sources.text_source(world, split))
    for step in _text_transforms(tokenizer, max_text_len):
        dataset = dataset.map(step)
    return dataset


def batches(source, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """All examples of `source` in order, stacked in batches of exactly `batch_size`.

    The last batch is padded with zeros; "valid" (bool[B]) marks real examples and "index"
    (int32[B]) their position in the source (-1 for padding).
    """
    size = len(source)
    for start in range(0, size, batch_size):
        examples = [source[i] for i in range(start, min(start + batch_size, size))]
        num_real = len(examples)
        padding = {key: np.zeros_like(value) for key, value in examples[0].items()}
        examples += [padding] * (batch_size - num_real)
        batch = {key: np.stack([example[key] for example in examples]) for key in padding}
        batch["valid"] = np.arange(batch_size) < num_real
        batch["index"] = np.where(batch["valid"], np.arange(start, start + batch_size), -1).astype(
            np.int32
        )
        yield batch
