"""Per-example grain transforms: small classes, each doing one thing to a dict example."""

from __future__ import annotations

import grain
import numpy as np

from jaxvlm.data.preprocessing import ImagePreprocessing
from jaxvlm.data.tokenizer import Tokenizer


class NormalizeImage(grain.transforms.Map):
    """example[key]: uint8 image of any size -> float32[S, S, 3] through `preprocessing`."""

    def __init__(self, preprocessing: ImagePreprocessing, key: str = "image"):
        self.preprocessing = preprocessing
        self.key = key

    def map(self, element: dict) -> dict:
        element[self.key] = self.preprocessing(element[self.key])
        return element


class PickCaption(grain.transforms.RandomMap):
    """Replaces example["captions"] (a list) by example["text"], one caption drawn by grain's
    per-example generator, so the choice depends only on (seed, example index)."""

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        captions = element.pop("captions")
        element["text"] = captions[int(rng.integers(len(captions)))]
        return element


class TokenizeText(grain.transforms.Map):
    """example[text_key]: str -> example[ids_key]: list of token ids."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        add_bos: bool = True,
        add_eos: bool = True,
        text_key: str = "text",
        ids_key: str = "ids",
    ):
        self.tokenizer = tokenizer
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.text_key = text_key
        self.ids_key = ids_key

    def map(self, element: dict) -> dict:
        text = element.pop(self.text_key)
        element[self.ids_key] = self.tokenizer.encode(
            text, add_bos=self.add_bos, add_eos=self.add_eos
        )
        return element


class TokenizeDocument(grain.transforms.RandomMap):
    """example["texts"] (one record's texts) -> example["ids"]: up to `max_texts` of them, drawn
    without replacement in a random order, each with bos and eos, concatenated (one packed row of
    a coherent document; the order depends only on (seed, example index))."""

    def __init__(self, tokenizer: Tokenizer, max_texts: int):
        if max_texts < 1:
            raise ValueError(f"max_texts={max_texts} must be ≥ 1")
        self.tokenizer = tokenizer
        self.max_texts = max_texts

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        texts = element.pop("texts")
        order = rng.permutation(len(texts))[: self.max_texts]
        element["ids"] = [
            token
            for index in order
            for token in self.tokenizer.encode(texts[int(index)], add_bos=True, add_eos=True)
        ]
        return element


class PadTokens(grain.transforms.Map):
    """example[ids_key] -> int32[T] tokens and int32[T] mask (1 = real token).

    Longer sequences are truncated to T (the end, eos included, is cut).
    """

    def __init__(
        self,
        max_len: int,
        pad_id: int,
        *,
        ids_key: str = "ids",
        tokens_key: str = "tokens",
        mask_key: str = "mask",
    ):
        self.max_len = max_len
        self.pad_id = pad_id
        self.ids_key = ids_key
        self.tokens_key = tokens_key
        self.mask_key = mask_key

    def map(self, element: dict) -> dict:
        ids = element.pop(self.ids_key)[: self.max_len]
        tokens = np.full(self.max_len, self.pad_id, np.int32)
        tokens[: len(ids)] = ids
        mask = np.zeros(self.max_len, np.int32)
        mask[: len(ids)] = 1
        element[self.tokens_key] = tokens
        element[self.mask_key] = mask
        return element


class AddLossMask(grain.transforms.Map):
    """example["loss_mask"]: int32[T], 1 where token t is a next-token target (real and t >= 1)."""

    def __init__(self, mask_key: str = "mask", loss_mask_key: str = "loss_mask"):
        self.mask_key = mask_key
        self.loss_mask_key = loss_mask_key

    def map(self, element: dict) -> dict:
        loss_mask = element[self.mask_key].copy()
        loss_mask[:1] = 0
        element[self.loss_mask_key] = loss_mask
        return element


class SelectKeys(grain.transforms.Map):
    """Keeps only `keys` of an example (batches hold arrays only)."""

    def __init__(self, keys: tuple[str, ...]):
        self.keys = keys

    def map(self, element: dict) -> dict:
        return {key: element[key] for key in self.keys}
