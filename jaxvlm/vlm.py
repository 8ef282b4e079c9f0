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

Only `PREFIX` bridges are composed here; `CROSS_ATTENTION` bridges need the decoder hook
(`Llama.cross_attention`) wired by this module, which is the Flamingo issue.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxvlm.bridges import Injection, build_bridge
from jaxvlm.encoders import build_encoder
from jaxvlm.llms import build_llm

__all__ = ["VLM", "build_vlm", "check_placeholders", "vlm_example_inputs"]


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
      llm: a decoder with `embed(tokens)` and `__call__(embeddings=..., kv_mask=..., positions=...)`.
      image_token_id: the `<image>` placeholder id in the text.
      freeze_encoder: stop the gradient at the encoder features.
    """

    encoder: nn.Module
    bridge: nn.Module
    llm: nn.Module
    image_token_id: int
    freeze_encoder: bool = True

    def __post_init__(self):
        if getattr(self.bridge, "injection", None) is Injection.CROSS_ATTENTION:
            raise _cross_attention_error(type(self.bridge).__module__.rsplit(".", 1)[-1])
        super().__post_init__()

    def setup(self):
        """`encoder`, `bridge` and `llm` are fields, bound under those names (setup style, so the
        module exposes `embed_images`, `embed_inputs` and `__call__`)."""

    def embed_images(self, images: jax.Array, image_mask: jax.Array) -> jax.Array:
        """`images float[B, M, H, W, 3]`, `image_mask bool[B, M]` → tokens float[B, M, N, D]."""
        if images.ndim != 5:
            raise ValueError(f"images must be float[B, M, H, W, 3]; got shape {images.shape}")
        batch, num_images = images.shape[:2]
        features = self.encoder(images.reshape(batch * num_images, *images.shape[2:])).features
        if self.freeze_encoder:
            features = jax.lax.stop_gradient(features)
        # Still images: one frame each, F = 1.
        features = features.reshape(batch, num_images, 1, *features.shape[1:])
        return self.bridge(features, image_mask=image_mask, text=None, train=False).tokens

    def embed_inputs(
        self, tokens: jax.Array, images: jax.Array, image_mask: jax.Array
    ) -> jax.Array:
        """`tokens int[B, T]` → float[B, T, D]: text embeddings with the image tokens scattered in.

        Placeholder k of row b (counting from 0) takes token k of the bridge tokens of row b
        reshaped [M·N, D], i.e. token n = k mod N of image m = k // N.
        """
        image_tokens = self.embed_images(images, image_mask)
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
    ):
        """Returns the LLM's `DecoderOutput` (logits float32[B, T, V])."""
        embeddings = self.embed_inputs(tokens, images, image_mask)
        return self.llm(embeddings=embeddings, kv_mask=mask, positions=positions)


def build_vlm(config: ml_collections.ConfigDict) -> nn.Module:
    bridge = build_bridge(config.bridge, vision_dim=config.encoder.width, llm_dim=config.llm.dim)
    if getattr(bridge, "injection", None) is Injection.CROSS_ATTENTION:
        raise _cross_attention_error(config.bridge.name)
    return VLM(
        encoder=build_encoder(config.encoder),
        bridge=bridge,
        llm=build_llm(config.llm),
        image_token_id=config.data.image_token_id,
    )


def vlm_example_inputs(config: ml_collections.ConfigDict) -> tuple[tuple, dict]:
    size = config.preprocessing.image_size
    images = jnp.zeros((1, 1, size, size, 3), jnp.float32)
    tokens = jnp.zeros((1, config.data.max_text_len), jnp.int32)
    return (tokens, images, jnp.ones((1, 1), bool)), {"mask": jnp.ones_like(tokens)}


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
    `config.data.max_text_len`."""
    from jaxvlm.data import chat, conversations

    return conversations.ConversationFormat(
        tokenizer=tokenizer,
        template=chat.ChatTemplate.from_config(config.template),
        image_token_id=config.data.image_token_id,
        tokens_per_image=tokens_per_image(config),
        max_len=config.data.max_text_len if max_len is None else max_len,
        mix=dict(config.data.instruction_mix),
        vqa_prompt=config.data.vqa_prompt,
        vqa_turns=config.data.vqa_turns,
    )
