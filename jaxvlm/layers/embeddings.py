"""Token embeddings (with a separately trainable `added_embedding`), learned positions, and RoPE.

- `Embed`: the main table `embedding [V, D]` plus `added_embedding [A, D]` for tokens added to a
  pretrained vocabulary (Flamingo §2.4 trains `<EOC>`/`<image>` while the LM stays frozen). Ids
  `V..V+A-1` read the added table; lookups and the tied output head behave as if the two were
  concatenated, so the trainable set stays a path regex (`.*/added_embedding`).
- `PositionEmbedding`: learned absolute positions (ViT, OPT).
- `apply_rope`: rotary embeddings (Su et al., 2021) in HF Llama's "rotate_half" layout, with the HF
  `rope_scaling` types `default`, `linear`, `dynamic` (NTK) and `llama3`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["Embed", "LMHead", "PositionEmbedding", "apply_rope", "rope_inverse_frequencies"]


class Embed(nn.Module):
    """Token ids → vectors, and the transposed table as a tied output head.

    Params: `embedding` float[V, D] (`vocab`, `embed`) and, if `num_added > 0`, `added_embedding`
    float[A, D].
    """

    num_embeddings: int
    features: int
    num_added: int = 0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    embedding_init: nn.initializers.Initializer = nn.initializers.normal(stddev=0.02)

    def setup(self):
        init = nn.with_logical_partitioning(self.embedding_init, ("vocab", "embed"))
        self.embedding = self.param(
            "embedding", init, (self.num_embeddings, self.features), self.param_dtype
        )
        if self.num_added:
            self.added_embedding = self.param(
                "added_embedding", init, (self.num_added, self.features), self.param_dtype
            )

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids: int[...] in [0, V + A). Returns float[..., D] in `dtype`."""
        x = jnp.take(self.embedding, jnp.clip(ids, 0, self.num_embeddings - 1), axis=0)
        if self.num_added:
            added_ids = jnp.clip(ids - self.num_embeddings, 0, self.num_added - 1)
            added = jnp.take(self.added_embedding, added_ids, axis=0)
            x = jnp.where((ids >= self.num_embeddings)[..., None], added, x)
        return x.astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """x: float[..., D]. Returns float[..., V + A] = x · [embedding; added_embedding]ᵀ."""
        x = x.astype(self.dtype)
        logits = jnp.einsum("...d,vd->...v", x, self.embedding.astype(self.dtype))
        if self.num_added:
            added = jnp.einsum("...d,vd->...v", x, self.added_embedding.astype(self.dtype))
            logits = jnp.concatenate([logits, added], axis=-1)
        return logits


class PositionEmbedding(nn.Module):
    """Learned absolute position embeddings: `embedding [N, D]`, gathered at `positions`.

    `position_axis` is the logical name of the N axis (`patches` for a ViT, `length` for text).
    Args of `__call__`: positions: int[..., T]. Returns float[..., T, D] in `dtype`.
    """

    num_positions: int
    features: int
    position_axis: str = "length"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, positions: jax.Array) -> jax.Array:
        embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(
                nn.initializers.normal(stddev=0.02), (self.position_axis, "embed")
            ),
            (self.num_positions, self.features),
            self.param_dtype,
        )
        return jnp.take(embedding, positions, axis=0).astype(self.dtype)


def rope_inverse_frequencies(
    head_dim: int,
    theta: float,
    scaling: Mapping | None = None,
    positions: jax.Array | None = None,
) -> jax.Array:
    """The rotary inverse frequencies float32[Dh/2] (HF `ROPE_INIT_FUNCTIONS`).

    `scaling` is an HF `rope_scaling` dict: its `rope_type` (or legacy `type`) is one of
    `default`, `linear` (`factor`), `dynamic` (`factor`, `original_max_position_embeddings`; the
    sequence length is read from `positions`, as HF does per call) or `llama3` (`factor`,
    `low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings`).
    """
    kind = "default" if not scaling else scaling.get("rope_type", scaling.get("type", "default"))
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    if kind == "dynamic":
        original = scaling["original_max_position_embeddings"]
        factor = scaling["factor"]
        length = jnp.maximum(jnp.max(positions) + 1, original).astype(jnp.float32)
        theta = theta * ((factor * length / original) - (factor - 1)) ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / (theta**exponents)
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        inv_freq = _llama3_inverse_frequencies(inv_freq, scaling)
    elif kind not in ("default", "dynamic"):
        raise ValueError(
            f"rope_scaling type {kind!r} is not supported; known: default, linear, dynamic, llama3"
        )
    return inv_freq


def _llama3_inverse_frequencies(inv_freq: jax.Array, scaling: Mapping) -> jax.Array:
    """Llama 3.1's frequency-dependent scaling (HF `_compute_llama3_parameters`)."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= old_context / high) & (wavelength <= old_context / low)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(
    x: jax.Array,
    positions: jax.Array,
    theta: float,
    scaling: Mapping | None = None,
) -> jax.Array:
    """Rotates x by its positions, HF Llama's `rotate_half` convention.

    The first and second halves of the head dimension form the (real, imaginary) pairs:
    `x·cos + rotate_half(x)·sin` with `rotate_half([x1, x2]) = [-x2, x1]`.

    Args:
      x: float[B, T, H, Dh].
      positions: int[B, T] — absolute positions (packing restarts them per segment).
      theta: the base (`rope_theta`).
      scaling: an HF `rope_scaling` dict or None (see `rope_inverse_frequencies`).

    Returns:
      float[B, T, H, Dh] in x's dtype; the rotation is computed in float32.
    """
    positions = positions.astype(jnp.float32)
    inv_freq = rope_inverse_frequencies(x.shape[-1], theta, scaling, positions)
    angles = positions[..., None] * inv_freq  # [B, T, Dh/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


class LMHead(nn.Module):
    """Untied output head: `kernel [D, V]` plus `added_kernel [D, A]` for added tokens.

    The added tokens' output rows train while `kernel` stays frozen, like `Embed.added_embedding`.
    Args of `__call__`: x: float[..., D]. Returns logits float[..., V + A] in `dtype`.
    """

    vocab_size: int
    num_added: int = 0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "vocab"))
        features = x.shape[-1]
        x = x.astype(self.dtype)
        kernel = self.param("kernel", init, (features, self.vocab_size), self.param_dtype)
        logits = jnp.einsum("...d,dv->...v", x, kernel.astype(self.dtype))
        if self.num_added:
            added = self.param("added_kernel", init, (features, self.num_added), self.param_dtype)
            logits = jnp.concatenate(
                [logits, jnp.einsum("...d,dv->...v", x, added.astype(self.dtype))], axis=-1
            )
        return logits
