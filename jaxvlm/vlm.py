"""The VLM: image encoder → bridge → LLM (STYLE.md §4); the only module that knows injection modes.

`VLM.__call__` encodes the images (flattened to [B·M] through the encoder), stops the gradient at
the encoder features when the encoder is frozen (MaxText `layers/encoders.py`), runs the bridge,
and for a `PREFIX` bridge scatters image m's N tokens into the positions of the m-th run of N
`<image>` placeholder ids in the text (the caller's tokenisation expands each `<image>` to N
placeholder ids; prepending is the case of placeholders at position 0).

The scatter is jit-friendly: `cumsum(tokens == image_token_id) - 1` gives each placeholder its flat
index m·N + n into the bridge tokens reshaped [B, M·N, D], and `jnp.where` keeps the text
embedding elsewhere. It assumes that row b holds exactly `image_mask[b].sum()·N` placeholders and
that the real images come first; `check_placeholders` checks the count on the host.

With an encoder-decoder LLM (T5) the scattered sequence is the encoder's input and the decoder
gets its own tokens (`decoder_tokens`), as BLIP-2 feeds FlanT5.

Only `PREFIX` bridges are composed here; `CROSS_ATTENTION` bridges need the decoder hook
(`Llama.cross_attention`) wired by this module, which is the Flamingo issue.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxvlm.bridges import BridgeText, Injection, build_bridge
from jaxvlm.encoders import build_encoder
from jaxvlm.llms import ENCODER_DECODER_LLMS, build_llm
from jaxvlm.llms.t5 import T5
from jaxvlm.param_paths import path_string

__all__ = [
    "VLM",
    "build_vlm",
    "check_placeholders",
    "decoder_example_inputs",
    "vlm_example_inputs",
]


def _cross_attention_error(name: str) -> ValueError:
    return ValueError(
        f"config.bridge.name={name!r} is a cross-attention bridge; cross-attention bridges need "
        "the decoder hook (Llama.cross_attention) wired by jaxvlm/vlm.py, which is not done yet "
        "(the Flamingo issue); only PREFIX bridges are supported"
    )


def check_placeholders(tokens, image_mask, tokens_per_image: int, *, image_token_id: int) -> None:
    """Host-side check: row b holds exactly `image_mask[b].sum() * tokens_per_image` placeholders.

    Args:
      tokens: int[B, T] token ids.
      image_mask: bool[B, M].
      tokens_per_image: N, the bridge tokens per image.
      image_token_id: the `<image>` placeholder id.

    Raises:
      ValueError naming the first offending row and both counts.
    """
    placeholders = (np.asarray(tokens) == image_token_id).sum(axis=-1)
    expected = np.asarray(image_mask).astype(bool).sum(axis=-1) * tokens_per_image
    for row, (got, want) in enumerate(zip(placeholders.tolist(), expected.tolist(), strict=True)):
        if got != want:
            raise ValueError(
                f"row {row}: {got} image placeholder tokens but image_mask has "
                f"{want // tokens_per_image} images × {tokens_per_image} tokens = {want}"
            )


class VLM(nn.Module):
    """Encoder → bridge → LLM, with the bridge's tokens placed at the `<image>` placeholders.

    Parameters live under `encoder/`, `bridge/` and `llm/`, so a pretrained ViT and LM drop in.

    Attributes:
      encoder: images float[B, H, W, 3] → `EncoderOutput(features float[B, P, Dv])`.
      bridge: a `PREFIX` bridge (bridges/base.py).
      llm: a decoder with `embed(tokens)` and `__call__(embeddings=..., kv_mask=..., positions=...)`,
        or None for a bridge-only stage (`config.llm.name="none"`: BLIP-2 stage 1, whose
        objective calls the bridge's `pretrain_loss` on `image_features`).
      image_token_id: the `<image>` placeholder id in the text.
      freeze_encoder: stop the gradient at the encoder features.
    """

    encoder: nn.Module
    bridge: nn.Module
    llm: nn.Module | None
    image_token_id: int
    freeze_encoder: bool = True

    def __post_init__(self):
        if getattr(self.bridge, "injection", None) is Injection.CROSS_ATTENTION:
            raise _cross_attention_error(type(self.bridge).__module__.rsplit(".", 1)[-1])
        super().__post_init__()

    def setup(self):
        """`encoder`, `bridge` and `llm` are fields, bound under those names (setup style, so the
        module exposes `embed_images`, `embed_inputs` and `__call__`)."""

    def image_features(self, images: jax.Array) -> jax.Array:
        """`images float[B, M, H, W, 3]` → the bridge's input float[B, M, 1, P, Dv] (one frame
        per still image), behind `stop_gradient` when the encoder is frozen."""
        if images.ndim != 5:
            raise ValueError(f"images must be float[B, M, H, W, 3]; got shape {images.shape}")
        batch, num_images = images.shape[:2]
        features = self.encoder(images.reshape(batch * num_images, *images.shape[2:])).features
        if self.freeze_encoder:
            features = jax.lax.stop_gradient(features)
        return features.reshape(batch, num_images, 1, *features.shape[1:])

    def retrieval_image_embeddings(self, images: jax.Array) -> jax.Array:
        """`images float[B, H, W, 3]` → the bridge's contrastive image embeddings (BLIP-2 ITC:
        float32[B, Q, E], one per query), for bridges with `embed_image` / `embed_text`."""
        return self.bridge.embed_image(self.retrieval_image_features(images))

    def retrieval_text_embeddings(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        """`tokens, mask int[B, T]` → the bridge's contrastive text embeddings float32[B, E]."""
        return self.bridge.embed_text(tokens, mask)

    def retrieval_image_features(self, images: jax.Array) -> jax.Array:
        """`images float[B, H, W, 3]` → the bridge's input float[B, P, Dv] (ITM re-ranking
        computes them once per image)."""
        features = self.image_features(images[:, None])
        return features[:, 0].reshape(images.shape[0], -1, features.shape[-1])

    def retrieval_match_score(
        self, image_features: jax.Array, tokens: jax.Array, mask: jax.Array
    ) -> jax.Array:
        """`image_features float[B, P, Dv]` (from `retrieval_image_features`), `tokens, mask
        int[B, T]` → the ITM matched logit float32[B] of each pair (BLIP-2 re-ranking)."""
        return self.bridge.itm_logits(image_features, tokens, mask)[:, 1]

    def embed_images(
        self,
        images: jax.Array,
        image_mask: jax.Array,
        bridge_ids: jax.Array | None = None,
        bridge_mask: jax.Array | None = None,
    ) -> jax.Array:
        """`images float[B, M, H, W, 3]`, `image_mask bool[B, M]` → tokens float[B, M, N, D].

        `bridge_ids`, `bridge_mask int[B, Tq]`: the prompt in the bridge's vocabulary, for a bridge
        that reads it (BLIP-2's VQA fine-tune); others ignore it.
        """
        features = self.image_features(images)
        text = None if bridge_ids is None else BridgeText(ids=bridge_ids, mask=bridge_mask)
        return self.bridge(features, image_mask=image_mask, text=text, train=False).tokens

    def embed_inputs(
        self,
        tokens: jax.Array,
        images: jax.Array,
        image_mask: jax.Array,
        bridge_ids: jax.Array | None = None,
        bridge_mask: jax.Array | None = None,
    ) -> jax.Array:
        """`tokens int[B, T]` → float[B, T, D]: text embeddings with the image tokens scattered in.

        Placeholder k of row b (counting from 0) takes token k of the bridge tokens of row b
        reshaped [M·N, D], i.e. token n = k mod N of image m = k // N.
        """
        image_tokens = self.embed_images(images, image_mask, bridge_ids, bridge_mask)
        batch, num_images, per_image, dim = image_tokens.shape
        flat = image_tokens.reshape(batch, num_images * per_image, dim)
        text = self.llm.embed(tokens)
        is_image = tokens == self.image_token_id
        index = jnp.cumsum(is_image, axis=-1) - 1
        index = jnp.clip(index, 0, num_images * per_image - 1)
        gathered = jnp.take_along_axis(flat, index[..., None], axis=1)
        embeddings = jnp.where(is_image[..., None], gathered.astype(text.dtype), text)
        return nn.with_logical_constraint(embeddings, ("batch", "length", "embed"))

    def __call__(
        self,
        tokens: jax.Array,
        images: jax.Array,
        image_mask: jax.Array,
        *,
        mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        bridge_ids: jax.Array | None = None,
        bridge_mask: jax.Array | None = None,
        decoder_tokens: jax.Array | None = None,
        decoder_mask: jax.Array | None = None,
    ):
        """Returns the LLM's `DecoderOutput` (logits float32[B, T, V]); without an LLM, the
        bridge tokens float[B, M, N, D] (what initialisation traces). `bridge_ids`,
        `bridge_mask`: as `embed_images`.

        With an encoder-decoder LLM (T5) `tokens`/`mask` are the encoder's input (the image
        tokens enter the encoder, STYLE.md §4) and `decoder_tokens`, `decoder_mask` int[B, Td]
        (start token first) the decoder's; the logits are the decoder's, float32[B, Td, V]."""
        if self.llm is None:
            return self.embed_images(images, image_mask, bridge_ids, bridge_mask)
        embeddings = self.embed_inputs(tokens, images, image_mask, bridge_ids, bridge_mask)
        if self.encoder_decoder:
            if decoder_tokens is None:
                raise ValueError("an encoder-decoder LLM needs decoder_tokens")
            return self.llm(
                None, decoder_tokens, embeddings=embeddings, mask=mask, decoder_mask=decoder_mask
            )
        return self.llm(embeddings=embeddings, kv_mask=mask, positions=positions)

    @property
    def encoder_decoder(self) -> bool:
        """Whether the LLM is an encoder-decoder (T5): the prompt is the encoder's input."""
        return isinstance(self.llm, T5)


def build_vlm(config: ml_collections.ConfigDict) -> nn.Module:
    """Encoder, bridge and LLM from `config`; `config.llm.name="none"` gives no LLM (and a bridge
    with `llm_dim=0`). The encoder is behind `stop_gradient` unless `config.trainable` names
    one of its parameters."""
    has_llm = config.llm.name != "none"
    llm_dim = config.llm.dim if has_llm else 0
    bridge = build_bridge(config.bridge, vision_dim=config.encoder.width, llm_dim=llm_dim)
    if getattr(bridge, "injection", None) is Injection.CROSS_ATTENTION:
        raise _cross_attention_error(config.bridge.name)
    encoder = build_encoder(config.encoder)
    return VLM(
        encoder=encoder,
        bridge=bridge,
        llm=build_llm(config.llm) if has_llm else None,
        image_token_id=config.data.image_token_id,
        freeze_encoder=not encoder_trains(config, encoder),
    )


def encoder_trains(config: ml_collections.ConfigDict, encoder: nn.Module) -> bool:
    """Whether a `config.trainable` pattern matches an encoder parameter (`encoder/...`), so
    the gradient must flow into the encoder (BLIP-2's fine-tunes); else it stops at its
    features. The parameter paths come from an abstract init (nothing is allocated)."""
    size = config.preprocessing.image_size
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    shapes = jax.eval_shape(lambda rng, x: encoder.init(rng, x), jax.random.key(0), images)
    paths = [
        "encoder/" + path_string(path)
        for path, _ in jax.tree_util.tree_leaves_with_path(nn.unbox(shapes["params"]))
    ]
    patterns = [re.compile(pattern) for pattern in config.trainable]
    return any(pattern.fullmatch(path) for pattern in patterns for path in paths)


def decoder_example_inputs(config: ml_collections.ConfigDict) -> dict:
    """The decoder's example inputs of an encoder-decoder `config.llm` ({} for a decoder-only)."""
    if config.llm.name not in ENCODER_DECODER_LLMS:
        return {}
    decoder_tokens = jnp.zeros((1, config.data.decoder_max_len), jnp.int32)
    return {"decoder_tokens": decoder_tokens, "decoder_mask": jnp.ones_like(decoder_tokens)}


def vlm_example_inputs(config: ml_collections.ConfigDict) -> tuple[tuple, dict]:
    size = config.preprocessing.image_size
    images = jnp.zeros((1, 1, size, size, 3), jnp.float32)
    tokens = jnp.zeros((1, config.data.max_text_len), jnp.int32)
    kwargs = {"mask": jnp.ones_like(tokens), **decoder_example_inputs(config)}
    return (tokens, images, jnp.ones((1, 1), bool)), kwargs


def tokens_per_image(config: ml_collections.ConfigDict) -> int:
    """N, the bridge tokens one image becomes (computed abstractly; nothing is allocated)."""
    model = build_vlm(config)
    (_, images, image_mask), _ = vlm_example_inputs(config)

    def embed(rng):
        return model.init_with_output(rng, images, image_mask, method=VLM.embed_images)[0]

    return int(jax.eval_shape(embed, jax.random.key(0)).shape[2])


def conversation_format(
    config: ml_collections.ConfigDict, tokenizer, *, max_len: int | None = None
):
    """How this VLM's conversations are tokenised: `config.template`, the `<image>` id expanded to
    `tokens_per_image(config)` slots, `config.data` mix and prompts; `max_len` defaults to
    `config.data.max_text_len`. A bridge with `read_prompt` also gets the prompt (the question),
    tokenised by its own tokenizer to `config.data.bridge_max_text_len`."""
    from jaxvlm import initialization
    from jaxvlm.data import chat, conversations, instructions

    reads_prompt = bool(config.bridge.get("read_prompt", False))
    return conversations.ConversationFormat(
        tokenizer=tokenizer,
        template=chat.ChatTemplate.from_config(config.template),
        image_token_id=config.data.image_token_id,
        tokens_per_image=tokens_per_image(config),
        max_len=config.data.max_text_len if max_len is None else max_len,
        mix=dict(config.data.instruction_mix),
        vqa_prompt=config.data.vqa_prompt,
        vqa_turns=config.data.vqa_turns,
        caption_prompts=tuple(config.data.caption_prompts) or instructions.BRIEF_PROMPTS,
        bridge_tokenizer=initialization.bridge_tokenizer(config) if reads_prompt else None,
        bridge_max_len=config.data.bridge_max_text_len,
        image_position=config.data.image_position,
    )
