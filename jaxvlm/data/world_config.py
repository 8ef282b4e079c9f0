"""`WorldConfig`: every knob of a synthetic world, and the hash that names its cache directory."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from jaxvlm.data import vocabulary

# Bump when generation changes, so cached worlds built by older code are not reused.
WORLD_FORMAT_VERSION = 1

SCENE_SPLITS: tuple[str, ...] = ("train", "validation", "test", "test_novel")
CLIP_SPLITS: tuple[str, ...] = ("clips_train", "clips_test")
# Splits whose scenes never hold a held-out composition (backbone pretraining may read them).
TRAINING_SPLITS: tuple[str, ...] = ("train", "clips_train")
# Seeds records per split: rng = np.random.default_rng((seed, SPLIT_CODES[split], index)).
SPLIT_CODES: dict[str, int] = {
    "train": 0,
    "validation": 1,
    "test": 2,
    "test_novel": 3,
    "clips_train": 4,
    "clips_test": 5,
}


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """A synthetic world. `WorldConfig(**config.data.world)` builds it from a config block.

    Attributes:
      seed: seeds every scene, text and clip.
      num_scenes: scenes in `train`.
      num_eval_scenes: scenes in each of `validation`, `test` and `test_novel`.
      image_size: side S of the square RGB images.
      max_objects: objects per scene are uniform in [1, max_objects].
      held_out: "colour shape" compositions absent from every split but `test_novel`, where each
        scene holds at least one. Empty: no `test_novel` split.
      num_clips: clips in `clips_train`.
      num_eval_clips: clips in `clips_test`; None: a tenth of num_clips (at least 1).
      clip_frames: frames F per clip.
      clip_max_objects: moving objects per clip are uniform in [1, clip_max_objects].
      num_shots: support scenes per few-shot episode.
    """

    seed: int = 0
    num_scenes: int = 20000
    num_eval_scenes: int = 1000
    image_size: int = 64
    max_objects: int = 4
    held_out: tuple[str, ...] = ("purple star", "orange heart")
    num_clips: int = 2000
    num_eval_clips: int | None = None
    clip_frames: int = 8
    clip_max_objects: int = 2
    num_shots: int = 4

    def __post_init__(self):
        if isinstance(self.held_out, str):
            raise ValueError(
                f"held_out must be a list of 'colour shape' strings, not {self.held_out!r}"
            )
        if self.num_eval_clips is None:
            object.__setattr__(self, "num_eval_clips", max(1, self.num_clips // 10))
        canonical = tuple(" ".join(vocabulary.parse_composition(text)) for text in self.held_out)
        object.__setattr__(self, "held_out", tuple(dict.fromkeys(canonical)))
        for name in ("num_scenes", "num_eval_scenes", "num_clips", "num_eval_clips"):
            if getattr(self, name) < 1:
                raise ValueError(f"world {name} must be at least 1, got {getattr(self, name)}")
        if self.image_size < 24:
            raise ValueError(f"world image_size must be at least 24, got {self.image_size}")
        if not 1 <= self.max_objects <= 4 or not 1 <= self.clip_max_objects <= 3:
            raise ValueError(
                f"world max_objects must be in [1, 4] and clip_max_objects in [1, 3], got "
                f"{self.max_objects} and {self.clip_max_objects}"
            )
        if self.clip_frames < 2:
            raise ValueError(f"world clip_frames must be at least 2, got {self.clip_frames}")
        if self.num_shots < 0:
            raise ValueError(f"world num_shots must be >= 0, got {self.num_shots}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (held_out as a list)."""
        fields = dataclasses.asdict(self)
        fields["held_out"] = list(self.held_out)
        return fields

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> WorldConfig:
        """Inverse of `to_dict`; an unknown key is an error naming it."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown world config keys {unknown}; known: {sorted(known)}")
        fields = dict(fields)
        if "held_out" in fields:
            fields["held_out"] = tuple(fields["held_out"])
        return cls(**fields)

    def fingerprint(self) -> str:
        """A short hash of the fields and the format version: the world's cache directory name."""
        payload = json.dumps({"format": WORLD_FORMAT_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @property
    def held_out_compositions(self) -> tuple[tuple[str, str], ...]:
        return tuple(vocabulary.parse_composition(text) for text in self.held_out)

    def split_sizes(self) -> dict[str, int]:
        """Records per split; `test_novel` only when something is held out."""
        sizes = {
            "train": self.num_scenes,
            "validation": self.num_eval_scenes,
            "test": self.num_eval_scenes,
            "test_novel": self.num_eval_scenes,
            "clips_train": self.num_clips,
            "clips_test": self.num_eval_clips,
        }
        if not self.held_out:
            del sizes["test_novel"]
        return sizes
