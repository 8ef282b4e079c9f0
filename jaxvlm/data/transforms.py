"""Per-example grain transforms: small classes, each doing one thing to a dict example."""

from __future__ import annotations

import math
import re

import grain
import numpy as np
from PIL import Image

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


class RandomResizedCropKeepingObjects(grain.transforms.RandomMap):
    """A random resized crop (BLIP-2 stage 1) that never cuts an object of the scene.

    The crop is drawn as torchvision's RandomResizedCrop draws it: area fraction uniform in
    [min_scale, 1], aspect ratio log-uniform in [3/4, 4/3], up to `max_tries` tries. A try is
    kept when its (rounded) window still covers min_scale of the image and some position of it
    holds every object box (example["boxes"], see `sources.object_boxes`); the position is
    uniform among those. After `max_tries` rejected tries the whole image is kept (torchvision
    falls back to a center crop of the clamped ratio, which for a square image is the whole
    image too). The window is resized back to image_size x image_size (bilinear, as
    torchvision). Consumes "boxes": they no longer describe the resampled image.

    Attributes:
      num_crops, num_fallbacks: examples seen and kept whole by this instance (per process;
        under grain workers each worker counts its own).
    """

    def __init__(
        self,
        image_size: int,
        min_scale: float = 0.9,
        *,
        max_tries: int = 10,
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        key: str = "image",
        boxes_key: str = "boxes",
    ):
        if not 0 < min_scale <= 1:
            raise ValueError(f"min_scale={min_scale} must be in (0, 1]")
        self.image_size = image_size
        self.min_scale = min_scale
        self.max_tries = max_tries
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.key = key
        self.boxes_key = boxes_key
        self.num_crops = 0
        self.num_fallbacks = 0

    def crop_window(
        self, height: int, width: int, boxes: np.ndarray, rng: np.random.Generator
    ) -> tuple[int, int, int, int] | None:
        """(top, left, crop_height, crop_width) holding every box, or None after max_tries."""
        boxes = np.asarray(boxes).reshape(-1, 4)
        # A window holds every box iff it holds their union; no boxes: any window does.
        x0, y0 = boxes[:, :2].min(axis=0) if len(boxes) else (width, height)
        x1, y1 = boxes[:, 2:].max(axis=0) if len(boxes) else (0, 0)
        for _ in range(self.max_tries):
            area = height * width * rng.uniform(self.min_scale, 1.0)
            ratio = math.exp(rng.uniform(*self.log_ratio))
            crop_width = round(math.sqrt(area * ratio))
            crop_height = round(math.sqrt(area / ratio))
            if not (0 < crop_width <= width and 0 < crop_height <= height):
                continue
            if crop_width * crop_height < self.min_scale * height * width:
                continue
            top_range = (max(0, y1 - crop_height), min(height - crop_height, y0))
            left_range = (max(0, x1 - crop_width), min(width - crop_width, x0))
            if top_range[0] > top_range[1] or left_range[0] > left_range[1]:
                continue
            top = int(rng.integers(top_range[0], top_range[1] + 1))
            left = int(rng.integers(left_range[0], left_range[1] + 1))
            return top, left, crop_height, crop_width
        return None

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        image = element[self.key]
        window = self.crop_window(image.shape[0], image.shape[1], element[self.boxes_key], rng)
        self.num_crops += 1
        if window is None:
            self.num_fallbacks += 1
            window = (0, 0, image.shape[0], image.shape[1])
        top, left, crop_height, crop_width = window
        crop = image[top : top + crop_height, left : left + crop_width]
        if crop.shape[:2] != (self.image_size, self.image_size):
            crop = resize_bilinear(crop, self.image_size)
        # A new dict: the boxes leave it, and the source's own element stays as it was.
        cropped = {key: value for key, value in element.items() if key != self.boxes_key}
        cropped[self.key] = crop
        return cropped


def resize_bilinear(image: np.ndarray, size: int) -> np.ndarray:
    """[H, W, C] uint8 or float -> [size, size, C] of the same dtype, bilinear (PIL)."""
    if image.dtype == np.uint8 and image.shape[-1] == 3:
        resized = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(resized)
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(image[..., c], np.float32)).resize(
                (size, size), Image.Resampling.BILINEAR
            )
        )
        for c in range(image.shape[-1])
    ]
    return np.stack(channels, axis=-1).astype(image.dtype)


# Every left/right-dependent word the world's texts use (`grammar.grammar_words()`).
MIRRORED_WORDS: dict[str, str] = {"left": "right", "right": "left"}
_MIRRORED_PATTERN = re.compile(r"\b(" + "|".join(MIRRORED_WORDS) + r")\b", re.IGNORECASE)


def _mirror_word(match: re.Match) -> str:
    word = match.group(0)
    mirrored = MIRRORED_WORDS[word.lower()]
    if word.isupper():
        return mirrored.upper()
    return mirrored.capitalize() if word[0].isupper() else mirrored


def swap_left_right(text: str) -> str:
    """ "Left of the right star" -> "Right of the left star": whole words, case kept."""
    return _MIRRORED_PATTERN.sub(_mirror_word, text)


def _mirror_texts(value):
    if isinstance(value, str):
        return swap_left_right(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_mirror_texts(item) for item in value)
    if isinstance(value, dict):
        return {key: _mirror_texts(item) for key, item in value.items()}
    return value


class FlipSwappingLeftRight(grain.transforms.RandomMap):
    """With probability p, mirrors example[key] left-right and swaps "left" / "right" in every
    text of the example (str values, also inside lists and dicts: captions, questions, answers),
    so that position and relation texts stay true. Mirrors "boxes" too when present."""

    def __init__(self, p: float = 0.5, *, key: str = "image", boxes_key: str = "boxes"):
        if not 0 <= p <= 1:
            raise ValueError(f"flip probability p={p} must be in [0, 1]")
        self.p = p
        self.key = key
        self.boxes_key = boxes_key

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        if rng.random() >= self.p:
            return element
        flipped = {}
        for name, value in element.items():
            if name == self.key:
                flipped[name] = np.ascontiguousarray(value[:, ::-1])
            elif name == self.boxes_key:
                width = element[self.key].shape[1]
                boxes = np.array(value)
                boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
                flipped[name] = boxes
            else:
                flipped[name] = _mirror_texts(value)
        return flipped


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


PREFIX_SPLITS: tuple[str, ...] = ("none", "random", "half")
ENCODER_DECODER_KEYS = ("tokens", "mask", "decoder_tokens", "decoder_mask", "loss_mask", "unsplit")


class SplitForEncoderDecoder(grain.transforms.RandomMap):
    """A decoder-only example → an encoder-decoder one (T5; BLIP-2 §3.3's prefix LM).

    Input: "tokens", "mask", "loss_mask" int32[T], right-padded, loss_mask 1 on target tokens.
    Everything before the first target token (image slots, template, prompt) is the encoder's; the
    target region (from the first target token to the last real one) is split: with n its tokens
    not counting a final `eos_id`, the first s go to the encoder too and the rest to the decoder,
      "none":   s = 0 (the whole target is the decoder's);
      "random": s ~ U[1, n // 2] (BLIP-2 §3.3: LAVIS never shipped it; issue 6 fixes the range);
      "half":   s = n // 2 (deterministic, for perplexity);
    a target with n < 2 under "random"/"half" cannot be split and goes wholly to the decoder,
    flagged by "unsplit" = 1 (the objective logs the fraction), so no decoder target is empty.

    Output: "tokens", "mask" int32[T] (the encoder's, right-padded), "decoder_tokens",
    "decoder_mask", "loss_mask" int32[Td] — `decoder_start_id` then the decoder's part, cut at Td
    as `PadTokens` cuts; loss_mask keeps the input's flags (a later user turn of a multi-turn
    sample stays context), 0 on the start token — and "unsplit" int32[]; other keys pass through.
    The draw depends only on (seed, example index), as every RandomMap here.
    """

    def __init__(
        self,
        mode: str,
        *,
        decoder_max_len: int,
        decoder_start_id: int,
        eos_id: int | None,
        pad_id: int,
    ):
        if mode not in PREFIX_SPLITS:
            raise ValueError(
                f"config.data.prefix_split={mode!r} is unknown; known: {', '.join(PREFIX_SPLITS)}"
            )
        if decoder_max_len < 2:
            raise ValueError(
                f"config.data.decoder_max_len={decoder_max_len} must hold the decoder start "
                "token and one target (>= 2)"
            )
        self.mode = mode
        self.decoder_max_len = decoder_max_len
        self.decoder_start_id = decoder_start_id
        self.eos_id = eos_id
        self.pad_id = pad_id

    def split_point(self, num_targets: int, rng: np.random.Generator) -> int:
        """s, the target tokens moved to the encoder (0 when `num_targets` < 2 or mode "none")."""
        if self.mode == "none" or num_targets < 2:
            return 0
        if self.mode == "half":
            return num_targets // 2
        return int(rng.integers(1, num_targets // 2 + 1))

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        tokens, mask, loss_mask = (
            np.asarray(element[key]) for key in ("tokens", "mask", "loss_mask")
        )
        length = int(mask.sum())
        targets = np.flatnonzero(loss_mask[:length])
        first = int(targets[0]) if len(targets) else length
        region = length - first
        ends_with_eos = region > 0 and self.eos_id is not None and tokens[length - 1] == self.eos_id
        num_targets = region - int(ends_with_eos)
        split = first + self.split_point(num_targets, rng)
        encoder_tokens = np.full_like(tokens, self.pad_id)
        encoder_tokens[:split] = tokens[:split]
        encoder_mask = np.zeros_like(mask)
        encoder_mask[:split] = 1
        kept = min(length - split, self.decoder_max_len - 1)
        decoder_tokens = np.full(self.decoder_max_len, self.pad_id, np.int32)
        decoder_tokens[0] = self.decoder_start_id
        decoder_tokens[1 : 1 + kept] = tokens[split : split + kept]
        decoder_mask = np.zeros(self.decoder_max_len, np.int32)
        decoder_mask[: 1 + kept] = 1
        decoder_loss_mask = np.zeros(self.decoder_max_len, np.int32)
        decoder_loss_mask[1 : 1 + kept] = loss_mask[split : split + kept]
        unsplit = self.mode != "none" and region > 0 and num_targets < 2
        return {
            **element,
            "tokens": encoder_tokens.astype(np.int32),
            "mask": encoder_mask.astype(np.int32),
            "decoder_tokens": decoder_tokens,
            "decoder_mask": decoder_mask,
            "loss_mask": decoder_loss_mask,
            "unsplit": np.int32(unsplit),
        }
