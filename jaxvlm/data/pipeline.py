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
               "question? answer" pairs, instruction turns) of the given split(s), one per row or
               `texts_per_row` concatenated (unrelated texts, or one record's: `text_packing`).

Evaluation sources have `__len__` / `__getitem__` and hold exactly the split's readable records;
`batches(source, batch_size)` pads the last batch and marks padding in "valid".
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence

import grain
import numpy as np

from jaxvlm.data import conversations, sources, transforms
from jaxvlm.data.preprocessing import ImagePreprocessing
from jaxvlm.data.tokenizer import Tokenizer

TASKS: tuple[str, ...] = ("captions", "text", "llava_captions", "instructions")
CAPTION_KEYS = ("image", "text_tokens", "text_mask")
TEXT_KEYS = ("tokens", "mask", "loss_mask")
TEXT_PACKINGS = ("stream", "record")
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
    conversation: conversations.ConversationFormat | None = None,
    texts_per_row: int = 1,
    text_packing: str = "stream",
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
      texts_per_row: "text" only: k texts (each with bos and eos) are concatenated into one row,
        cut at T (GPT-style packing, attention across texts).
      text_packing: "text" only: where a row's texts come from — "stream": k consecutive texts
        of the shuffled stream (unrelated); "record": up to k texts of one record in random order
        (a document about one scene).
      conversation: how scenes become conversations ("llava_captions", "instructions"; see
        `conversations.py`); its max_len replaces `max_text_len`.
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
    elif task == "text":
        if text_packing not in TEXT_PACKINGS:
            raise ValueError(
                f"config.data.text_packing={text_packing!r} is unknown; known: {TEXT_PACKINGS}"
            )
        steps = _text_transforms(tokenizer, max_text_len)
        if text_packing == "record":
            # A row is a document about one scene: later texts follow from earlier ones, so the
            # LM learns to read its context (which an image's tokens later become).
            source = sources.document_source(world, split)
            dataset = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
            dataset = dataset.random_map(
                transforms.TokenizeDocument(tokenizer, texts_per_row), seed=seed
            )
            steps = steps[1:]
        else:
            source = sources.text_source(world, split)
            dataset = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
            if texts_per_row > 1:
                # Consecutive texts share a row, so the LM learns every position up to T.
                dataset = dataset.map(transforms.TokenizeText(tokenizer))
                dataset = dataset.batch(texts_per_row, batch_fn=_concatenate_ids)
                steps = steps[1:]
    else:
        if conversation is None or preprocessing is None:
            raise ValueError(
                f"the {task} task needs a ConversationFormat and an ImagePreprocessing"
            )
        source = sources.RecordSource(
            world.as_data_source(split),
            conversations.scene_parser(world.config.image_size),
            name=f"scenes/{split}",
        )
        dataset = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
        if task == "llava_captions":
            pick = conversations.CaptionAsInstruction(conversation.caption_prompts)
        else:
            pick = conversations.PickInstruction(conversation)
        dataset = dataset.random_map(pick, seed=seed)
        encode = conversations.EncodeConversation(conversation, preprocessing)
        dataset = dataset.map_with_index(encode)
        steps = []
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


def _concatenate_ids(examples: list[dict]) -> dict:
    return {"ids": [token for example in examples for token in example["ids"]]}


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
    """The texts of `split` (e.g. "validation") for perplexity, one per row: example i is
    {"tokens", "mask", "loss_mask"}, each int32[T], as in the "text" training task, with T the
    longest text (bos and eos included) rounded up to 8, at most `max_text_len`."""
    source = sources.text_source(world, split)
    longest = (
        max(
            len(ids)
            for ids in tokenizer.encode_batch([source[i]["text"] for i in range(len(source))])
        )
        + 2
    )
    dataset = grain.MapDataset.source(source)
    for step in _text_transforms(tokenizer, min(max_text_len, -(-longest // 8) * 8)):
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


def _eval_scenes(world, split: str) -> sources.RecordSource:
    parse = conversations.scene_parser(world.config.image_size)
    return sources.RecordSource(world.as_data_source(split), parse, name=f"scenes/{split}")


def _subset(size: int, num_examples: int, seed: int = 0) -> np.ndarray:
    """The first `num_examples` of a fixed permutation of range(size) (all when 0)."""
    order = np.random.default_rng(seed).permutation(size)
    return order if num_examples <= 0 else np.sort(order[:num_examples])


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """Generation prompts with references. prompts: example i is {"tokens", "mask" int32[T]
    (left-padded), "images" float32[1, S, S, 3], "image_mask" bool[1]}; references[i]: the
    reference texts of example i (10 VQA answers, or the captions)."""

    prompts: grain.MapDataset
    references: list[list[str]]


def vqa_prompts(
    world,
    split: str,
    fmt: conversations.ConversationFormat,
    preprocessing: ImagePreprocessing,
    *,
    prompt: str,
    num_examples: int = 0,
    blind: bool = False,
) -> PromptSet:
    """The split's VQAv2-style questions (a fixed subset of `num_examples`, 0 = all), each asked
    with `prompt` ("{question}" slot) about its image."""
    scenes = _eval_scenes(world, split)
    pairs = [
        (scene, number)
        for scene in range(len(scenes))
        for number in range(len(scenes[scene]["questions"]))
    ]
    pairs = [pairs[i] for i in _subset(len(pairs), num_examples)]

    def make(pair):
        scene, number = pair
        record = scenes[scene]
        text = prompt.format(question=record["questions"][number]["question"])
        return conversations.prompt_example(fmt, text, record["image"], preprocessing, blind=blind)

    references = [scenes[scene]["questions"][number]["answers"] for scene, number in pairs]
    return PromptSet(grain.MapDataset.source(pairs).map(make), references)


def caption_prompts(
    world,
    split: str,
    fmt: conversations.ConversationFormat,
    preprocessing: ImagePreprocessing,
    *,
    prompt: str,
    num_examples: int = 0,
    blind: bool = False,
) -> PromptSet:
    """The split's images (a fixed subset of `num_examples`, 0 = all), each with `prompt`; the
    references are all of the image's captions."""
    scenes = _eval_scenes(world, split)
    indices = _subset(len(scenes), num_examples).tolist()

    def make(scene):
        record = scenes[scene]
        return conversations.prompt_example(
            fmt, prompt, record["image"], preprocessing, blind=blind
        )

    references = [scenes[scene]["captions"] for scene in indices]
    return PromptSet(grain.MapDataset.source(indices).map(make), references)
