"""Image preprocessing that travels with a model (`preprocessing.json` in every workdir).

`ImagePreprocessing(image)` turns any uint8 image ([H, W], [H, W, 1], [H, W, 3] or [H, W, 4]) into
the float32[S, S, 3] the image encoder expects: resize ("shortest_edge" then a center crop, as CLIP
does, or "squash" to S x S), then (x / 255 - mean) / std. An image already S x S RGB is only
normalised, with no resampling, so the world's own images cost one multiply-add.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

RESIZE_MODES: tuple[str, ...] = ("shortest_edge", "squash")
CROP_MODES: tuple[str, ...] = ("center", "none")
RESAMPLE_FILTERS: dict[str, int] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
# Published normalisations, for importers of real checkpoints.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


def load_image(path: str) -> np.ndarray:
    """Reads an image file as uint8[H, W, 3] RGB.

    Raises:
      ValueError: one line naming the file when it is missing or not a decodable image.
    """
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise ValueError(f"image file {path} does not exist") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"image file {path} could not be decoded: {error}") from None


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """uint8[H, W, 3] from gray [H, W] / [H, W, 1], RGB, or RGBA (alpha dropped, as PIL does)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or 0 in image.shape[:2]:
        raise ValueError(
            f"image must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {image.shape}"
        )
    if image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    return image[..., :3]


@dataclasses.dataclass(frozen=True)
class ImagePreprocessing:
    """Resize, crop and normalisation of one image encoder.

    Attributes:
      image_size: side S of the square output.
      resize: "shortest_edge" (scale the short side to S, keeping the aspect) or "squash" (S x S).
      crop: "center" (crop S x S from the middle after a shortest-edge resize) or "none".
      mean: per-channel mean, on the [0, 1] scale.
      std: per-channel standard deviation, on the [0, 1] scale.
      resample: Pillow filter name: nearest, bilinear, bicubic, lanczos or box.
    """

    image_size: int = 64
    resize: str = "shortest_edge"
    crop: str = "center"
    mean: tuple[float, float, float] = SIGLIP_MEAN
    std: tuple[float, float, float] = SIGLIP_STD
    resample: str = "bicubic"

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        checks = (
            (self.resize in RESIZE_MODES, f"resize {self.resize!r} is not one of {RESIZE_MODES}"),
            (self.crop in CROP_MODES, f"crop {self.crop!r} is not one of {CROP_MODES}"),
            (
                self.resample in RESAMPLE_FILTERS,
                f"resample {self.resample!r} is not one of {tuple(RESAMPLE_FILTERS)}",
            ),
            (self.image_size > 0, f"image_size must be positive, got {self.image_size}"),
            (len(self.mean) == 3 and len(self.std) == 3, "mean and std need 3 channels each"),
            (all(s > 0 for s in self.std), f"std must be positive, got {self.std}"),
            (
                self.resize == "squash" or self.crop == "center",
                "a shortest_edge resize needs crop='center' to give a square image",
            ),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"ImagePreprocessing: {message}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ImagePreprocessing:
        return cls.from_config(json.loads(text))

    @classmethod
    def from_config(cls, fields: Mapping[str, Any]) -> ImagePreprocessing:
        """From a mapping of fields (e.g. `config.preprocessing`); unknown keys are errors."""
        fields = dict(fields)
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown preprocessing fields {unknown}; known: {sorted(known)}")
        return cls(**fields)

    def save(self, path: str) -> None:
        with open(path, "w") as file:
            file.write(self.to_json())

    @classmethod
    def load(cls, path: str) -> ImagePreprocessing:
        try:
            with open(path) as file:
                return cls.from_json(file.read())
        except FileNotFoundError:
            raise ValueError(f"preprocessing file {path} does not exist") from None

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8[..., S, S, 3] -> float32[..., S, S, 3], no resizing (batches too)."""
        scale = np.float32(1 / 255) / np.asarray(self.std, np.float32)
        offset = np.asarray(self.mean, np.float32) / np.asarray(self.std, np.float32)
        return np.asarray(images, np.float32) * scale - offset

    def resize_image(self, image: np.ndarray) -> np.ndarray:
        """uint8[H, W, C] (any of the accepted layouts) -> uint8[S, S, 3]."""
        image = _as_rgb(image)
        size = self.image_size
        height, width = image.shape[:2]
        if (height, width) == (size, size):
            return image
        pil = Image.fromarray(image)
        resample = RESAMPLE_FILTERS[self.resample]
        if self.resize == "squash":
            return np.asarray(pil.resize((size, size), resample))
        # As transformers' image processors: the short side becomes S, the long one
        # int(S * long / short) (floored, not rounded).
        if width <= height:
            new_width, new_height = size, int(size * height / width)
        else:
            new_width, new_height = int(size * width / height), size
        resized = pil.resize((new_width, new_height), resample)
        left, top = (new_width - size) // 2, (new_height - size) // 2
        return np.asarray(resized.crop((left, top, left + size, top + size)))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """uint8 image of any size -> float32[S, S, 3], normalised."""
        return self.normalize(self.resize_image(image))
