"""The bridge contract (STYLE.md §4): what every module in `jaxvlm/bridges/` exports.

A bridge turns image-encoder features into something the LLM consumes. Each bridge module exports
`Bridge`, an `nn.Module` with

- `injection: ClassVar[Injection]`: `PREFIX` (tokens placed into the text sequence at the image
  placeholders) or `CROSS_ATTENTION` (media the decoder attends to through `cross_attend`);
- `__call__(image_features, *, image_mask, text, train) -> BridgeOutput`, where

  - `image_features: float[B, M, F, P, Dv]`: M images (or clips) per sample, F frames each (1 for
    a still image), P patches (the encoder's tokens, class token included when it has one);
  - `image_mask: bool[B, M]`: False marks an empty image slot;
  - `text: BridgeText | None`: the prompt, for bridges that read it (BLIP-2's Q-Former);
  - `train: bool`: dropout and the like;

  and it returns `BridgeOutput` with `tokens: float[B, M, N, Dllm]` for `PREFIX` or
  `media: float[B, M, L, Dllm]` for `CROSS_ATTENTION`, plus `aux` (named intermediates).
- for `CROSS_ATTENTION` only: `cross_attend(group_params, hidden, media, media_mask) -> hidden` and
  fields `every_n_layers`, `placement`;
- optionally `pretrain_loss(model, params, batch, rngs) -> (loss, metrics)` for a bridge-specific
  training stage (`rngs`: "dropout" and "sampling" keys);
- optionally `TINY_FIELDS`, a dict of fields for a small instance (the contract test builds each
  bridge with it; bridges whose defaults are already small need none).

Every bridge also has `dtype` and `param_dtype` fields and boxes each parameter with logical names
from `sharding.LOGICAL_AXES`.
"""

from __future__ import annotations

import enum
from typing import Any

import flax.struct
import jax

__all__ = ["BridgeOutput", "BridgeText", "Injection"]


class Injection(enum.Enum):
    """How a bridge's output enters the LLM."""

    PREFIX = "prefix"
    CROSS_ATTENTION = "cross_attention"


@flax.struct.dataclass
class BridgeText:
    """The prompt, for bridges that read it.

    Attributes:
      ids: int[B, T] token ids.
      mask: int[B, T], 1 for real tokens and 0 for padding.
    """

    ids: jax.Array
    mask: jax.Array


@flax.struct.dataclass
class BridgeOutput:
    """What a bridge returns; exactly one of `tokens` and `media` is set, per `injection`.

    Attributes:
      tokens: float[B, M, N, Dllm] for `PREFIX` bridges: N tokens per image, else None.
      media: float[B, M, L, Dllm] for `CROSS_ATTENTION` bridges: L latents per image, else None.
      aux: named intermediates (e.g. the Q-Former query outputs for ITC); empty if none.
    """

    tokens: jax.Array | None = None
    media: jax.Array | None = None
    aux: dict[str, Any] = flax.struct.field(default_factory=dict)
