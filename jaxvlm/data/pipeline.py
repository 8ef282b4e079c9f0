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
               example, with bos and eos. `augment="blip2"` first crops and flips the image as
               BLIP-2 stage 1 does, keeping objects whole and texts true (`BLIP2_MIN_SCALE`).
  "text":     {"tokens": int32[B, T], "mask": int32[B, T], "loss_mask": int32[B, T] (1 where the
               token is a next-token target: real and not the first)}; texts only (captions,
               "question? answer" pairs, instruction turns) of the given split(s), one per row or
               `texts_per_row` concatenated (unrelated texts, or one record's: `text_packing`).
For an encoder-decoder LLM (`encoder_decoder`), "text" and the conversation tasks split each
example between encoder and decoder (`transforms.SplitForEncoderDecoder`): "tokens", "mask"
int32[B, T] are the encoder's, "decoder_tokens", "decoder_mask", "loss_mask" int32[B, Td] the
decoder's, "unsplit" int32[B].

Evaluation datasets (retrieval, perplexity texts, VQA and caption prompts) are in `eval_sets.py`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import grain
import numpy as np

from jaxvlm.data import conversations, sources, transforms
from jaxvlm.data.preprocessing import ImagePreprocessing
from jaxvlm.data.tokenizer import Tokenizer

TASKS: tuple[str, ...] = ("captions", "text", "llava_captions", "instructions")
CAPTION_KEYS = ("image", "text_tokens", "text_mask")
TEXT_KEYS = ("tokens", "mask", "loss_mask")
TEXT_PACKINGS = ("stream", "record")
AUGMENTATIONS: tuple[str, ...] = ("none", "blip2")
# BLIP-2 §3.4: images "augmented with random resized cropping and horizontal flipping". Ours
# keep >= 90% of the area (issue 6): the world's objects fill much of the frame.
BLIP2_MIN_SCALE = 0.9
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


def pad_id_of(tokenizer: Tokenizer) -> int:
    return 0 if tokenizer.pad_id is None else tokenizer.pad_id


def caption_source(world, split: str, *, with_boxes: bool = False) -> sources.RecordSource:
    parse = sources.caption_parser(world.config.image_size, with_boxes=with_boxes)
    return sources.RecordSource(world.as_data_source(split), parse, name=f"captions/{split}")


def caption_transforms(tokenizer, preprocessing, max_text_len, text_key: str) -> list:
    return [
        transforms.TokenizeText(tokenizer, text_key=text_key),
        transforms.PadTokens(
            max_text_len, pad_id_of(tokenizer), tokens_key="text_tokens", mask_key="text_mask"
        ),
        transforms.NormalizeImage(preprocessing),
        transforms.SelectKeys(CAPTION_KEYS),
    ]


def text_transforms(tokenizer, max_text_len) -> list:
    return [
        transforms.TokenizeText(tokenizer),
        transforms.PadTokens(max_text_len, pad_id_of(tokenizer)),
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
    augment: str = "none",
    encoder_decoder: transforms.SplitForEncoderDecoder | None = None,
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
      augment: "captions" only, one of AUGMENTATIONS: "none", or "blip2": a random resized crop
        (area >= BLIP2_MIN_SCALE, never cutting an object) then a horizontal flip (p = 0.5) that
        swaps "left" and "right" in the texts.
      encoder_decoder: for an encoder-decoder LLM ("text" and conversation tasks), the split of
        each example between encoder and decoder (its batches then hold ENCODER_DECODER_KEYS,
        "loss_mask" over the decoder's Td positions).
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
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment={augment!r} is unknown; allowed: {', '.join(AUGMENTATIONS)}")
    if augment != "none" and task != "captions":
        raise ValueError(f"augment={augment!r} applies to the captions task only, not {task!r}")
    if task == "captions":
        if preprocessing is None:
            raise ValueError("the captions task needs an ImagePreprocessing")
        source = caption_source(world, split, with_boxes=augment == "blip2")
        dataset = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
        dataset = dataset.random_map(transforms.PickCaption(), seed=seed)
        if augment == "blip2":
            dataset = _augment_blip2(dataset, world.config.image_size, seed)
        steps = caption_transforms(tokenizer, preprocessing, max_text_len, text_key="text")
    elif task == "text":
        if text_packing not in TEXT_PACKINGS:
            raise ValueError(
                f"config.data.text_packing={text_packing!r} is unknown; known: {TEXT_PACKINGS}"
            )
        steps = text_transforms(tokenizer, max_text_len)
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
            pick = conversations.CaptionAsInstruction(
                conversation.caption_prompts, conversation.image_position
            )
        else:
            pick = conversations.PickInstruction(conversation)
        dataset = dataset.random_map(pick, seed=seed)
        encode = conversations.EncodeConversation(conversation, preprocessing)
        dataset = dataset.map_with_index(encode)
        steps = []
    for step in steps:
        dataset = dataset.map(step)
    if encoder_decoder is not None:
        if task == "captions":
            raise ValueError("the captions task has no targets to split for an encoder-decoder")
        # Its own seed offset keeps the split independent of the other per-example draws.
        dataset = dataset.random_map(encoder_decoder, seed=seed + 3)
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


def _augment_blip2(dataset: grain.MapDataset, image_size: int, seed: int) -> grain.MapDataset:
    """Crop, then flip the image and the picked text, before NormalizeImage and tokenisation."""
    crop = transforms.RandomResizedCropKeepingObjects(image_size, BLIP2_MIN_SCALE)
    # grain draws element i's generator from (op seed, i): other seeds than PickCaption's keep
    # the three draws independent, each still a function of (seed, stream index) only.
    dataset = dataset.random_map(crop, seed=seed + 1)
    return dataset.random_map(transforms.FlipSwappingLeftRight(0.5), seed=seed + 2)


def _concatenate_ids(examples: list[dict]) -> dict:
    return {"ids": [token for example in examples for token in example["ids"]]}
