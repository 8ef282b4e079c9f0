"""Evaluation datasets: exactly the readable records of a split, in order, never shuffled.

`retrieval_pairs` / `retrieval_set` (image–text retrieval), `eval_texts` (perplexity), `vqa_prompts`
and `caption_prompts` (generation prompts with their references, `PromptSet`), and `batches`, which
pads the last batch and marks padding in "valid" so that evaluators score exactly N examples.
Training batches live in `pipeline.py`, whose transforms these share.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import grain
import numpy as np

from jaxvlm.data import conversations, sources, transforms
from jaxvlm.data.pipeline import caption_source, caption_transforms, pad_id_of, text_transforms
from jaxvlm.data.preprocessing import ImagePreprocessing
from jaxvlm.data.tokenizer import Tokenizer


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
    dataset = grain.MapDataset.source(caption_source(world, split))
    for step in caption_transforms(tokenizer, preprocessing, max_text_len, text_key="caption"):
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
    records = caption_source(world, split)
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
            max_text_len, pad_id_of(tokenizer), tokens_key="text_tokens", mask_key="text_mask"
        ),
        transforms.SelectKeys(("text_tokens", "text_mask")),
    ):
        text_dataset = text_dataset.map(step)
    return RetrievalSet(images, text_dataset, text_to_image)


def eval_texts(
    world, split: str | Sequence[str], tokenizer: Tokenizer, *, max_text_len: int
) -> grain.MapDataset:
    """The texts of `split` (e.g. "validation") for perplexity, one per row, shortest first (so
    that batches of similar lengths can be cut short): example i is {"tokens", "mask",
    "loss_mask"}, each int32[T] and right-padded, as in the "text" training task, with T the
    longest text (bos and eos included) rounded up to 8, at most `max_text_len`."""
    source = sources.text_source(world, split)
    texts = [source[i]["text"] for i in range(len(source))]
    lengths = [len(ids) + 2 for ids in tokenizer.encode_batch(texts)]
    order = np.argsort(lengths, kind="stable")
    # A fresh dict per read: the transforms below pop keys, so a shared one breaks a second read.
    dataset = grain.MapDataset.source([texts[i] for i in order]).map(lambda text: {"text": text})
    longest = lengths[order[-1]]
    for step in text_transforms(tokenizer, min(max_text_len, -(-longest // 8) * 8)):
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


def eval_scenes(world, split: str) -> sources.RecordSource:
    """The split's readable scene records, parsed (`conversations.scene_parser`)."""
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


def vqa_question_pairs(scenes, num_examples: int = 0) -> list[tuple[int, int]]:
    """(scene index, question index) of the questions `vqa_prompts` asks: a fixed subset of
    `num_examples` (0 = all), in scene order."""
    pairs = [
        (scene, number)
        for scene in range(len(scenes))
        for number in range(len(scenes[scene]["questions"]))
    ]
    return [pairs[i] for i in _subset(len(pairs), num_examples)]


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
    scenes = eval_scenes(world, split)
    pairs = vqa_question_pairs(scenes, num_examples)

    def make(pair):
        scene, number = pair
        record = scenes[scene]
        question = record["questions"][number]["question"]
        return conversations.prompt_example(
            fmt,
            prompt.format(question=question),
            record["image"],
            preprocessing,
            blind=blind,
            bridge_text=question,
        )

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
    scenes = eval_scenes(world, split)
    indices = _subset(len(scenes), num_examples).tolist()

    def make(scene):
        record = scenes[scene]
        return conversations.prompt_example(
            fmt, prompt, record["image"], preprocessing, blind=blind
        )

    references = [scenes[scene]["captions"] for scene in indices]
    return PromptSet(grain.MapDataset.source(indices).map(make), references)
