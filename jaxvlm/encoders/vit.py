"""Vision Transformer (Dosovitskiy et al., 2021) in its CLIP and SigLIP forms, chosen by fields.

CLIP (Radford et al., 2021; HF `CLIPVisionModel`): class token, `pre_layernorm` (HF spells it
`pre_layrnorm`), no patch bias, `quick_gelu` (OpenAI weights), `pool="cls"` with `post_layernorm` on
the class token. SigLIP (Zhai et al., 2023; HF `SiglipVisionModel`): no class token, no pre-norm,
patch bias, `gelu_tanh`, `post_layernorm` on every token, then a multihead attention-pooling (MAP)
head, `pool="map"`.

`features` is HF's `hidden_states[feature_layer]`: index 0 is the (pre-normed) embeddings, index k
the output of layer k, so `feature_layer=-2` is LLaVA's `vision_feature_layer=-2` and BLIP-2's
"second-to-last layer". Features keep the class token when there is one (bridges drop it). With
`feature_norm`, `post_layernorm` is applied to the features too (SigLIP's `last_hidden_state`, as
PaliGemma uses it). Deviation: the image size is fixed by `image_size` (no position interpolation).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from jaxvlm.layers.attention import Attention
from jaxvlm.layers.mlp import Mlp
from jaxvlm.layers.norms import LayerNorm
from jaxvlm.layers.remat import maybe_remat

__all__ = ["EncoderLayer", "EncoderOutput", "MAPHead", "ViT"]

POOLS = ("cls", "mean", "map", "none")


@struct.dataclass
class EncoderOutput:
    """features: float[B, N, D] — N = P patches (+1 class token); pooled: float[B, D] or None;
    hidden_states: float[depth + 1, B, N, D] (HF's tuple, stacked) or None."""

    features: jax.Array
    pooled: jax.Array | None = None
    hidden_states: jax.Array | None = None


class EncoderLayer(nn.Module):
    """Pre-LN transformer block: `x += attn(ln1(x)); x += mlp(ln2(x))` (HF `CLIPEncoderLayer`).

    Args of `__call__`: x: float[B, N, D]. Returns float[B, N, D].
    """

    num_heads: int
    head_dim: int
    mlp_dim: int
    activation: str = "gelu"
    norm_eps: float = 1e-5
    implementation: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        h = LayerNorm(eps=self.norm_eps, name="layer_norm1", **kw)(x)
        x = (
            x
            + Attention(
                num_heads=self.num_heads,
                head_dim=self.head_dim,
                use_qkv_bias=True,
                use_out_bias=True,
                implementation=self.implementation,
                name="self_attn",
                **kw,
            )(h).hidden
        )
        h = LayerNorm(eps=self.norm_eps, name="layer_norm2", **kw)(x)
        x = x + Mlp(self.mlp_dim, activation=self.activation, name="mlp", **kw)(h)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class MAPHead(nn.Module):
    """Multihead attention pooling (Lee et al., 2019; SigLIP's head, HF
    `SiglipMultiheadAttentionPoolingHead`): one learned `probe` attends over the tokens, then a
    residual MLP after `layernorm`.

    Args of `__call__`: x: float[B, N, D]. Returns float[B, D].
    """

    num_heads: int
    mlp_dim: int
    activation: str = "gelu_tanh"
    norm_eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        width = x.shape[-1]
        probe = self.param(
            "probe",
            nn.with_logical_partitioning(nn.initializers.xavier_uniform(), ("queries", "embed")),
            (1, width),
            self.param_dtype,
        )
        probe = jnp.broadcast_to(probe.astype(self.dtype), (x.shape[0], 1, width))
        h = Attention(
            num_heads=self.num_heads,
            head_dim=width // self.num_heads,
            use_qkv_bias=True,
            use_out_bias=True,
            name="attention",
            **kw,
        )(probe, x).hidden
        y = LayerNorm(eps=self.norm_eps, name="layernorm", **kw)(h)
        h = h + Mlp(self.mlp_dim, activation=self.activation, name="mlp", **kw)(y)
        return h[:, 0]


class ViT(nn.Module):
    """Images → patch features and a pooled embedding.

    Params: `patch_embedding` (Conv, kernel [p, p, 3, D]), `class_embedding` [D] (if
    `class_token`), `position_embedding` [N, D], `pre_layernorm` (if `pre_norm`), `layers`
    (scanned, stacked on a leading `layers` axis) or `layers_0..` (unscanned), `post_layernorm` (if
    `post_norm`), `head` (if `pool == "map"`).
    """

    image_size: int
    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    activation: str = "gelu"
    class_token: bool = True
    pre_norm: bool = True
    post_norm: bool = True
    patch_bias: bool = False
    pool: str = "cls"
    norm_eps: float = 1e-5
    feature_layer: int = -1
    feature_norm: bool = False
    scan_layers: bool = True
    remat: str = "none"
    implementation: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, *, return_hidden_states: bool = False) -> EncoderOutput:
        """images: float[B, H, W, 3] with H = W = image_size (already normalised).

        Returns EncoderOutput(features float[B, N, D], pooled float[B, D] (None for pool="none"),
        hidden_states float[depth + 1, B, N, D] if `return_hidden_states`).
        """
        if self.pool not in POOLS:
            raise ValueError(f"ViT.pool={self.pool!r} is unknown; known: {POOLS}")
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(
                f"ViT expects images [B, {self.image_size}, {self.image_size}, 3], "
                f"got {images.shape}"
            )
        if not -self.depth - 1 <= self.feature_layer <= self.depth:
            raise ValueError(
                f"ViT.feature_layer={self.feature_layer} is outside [-{self.depth + 1}, "
                f"{self.depth}] for depth={self.depth}"
            )
        feature_index = self.feature_layer % (self.depth + 1)
        x = self._embed(images)
        x, features, hidden_states = self._encode(x, feature_index, return_hidden_states)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        post_norm = (
            LayerNorm(eps=self.norm_eps, name="post_layernorm", **kw)
            if self.post_norm
            else (lambda y: y)
        )
        if self.feature_norm:
            features = post_norm(features)
        pooled = None
        if self.pool == "cls":
            pooled = post_norm(x[:, 0])
        elif self.pool == "mean":
            pooled = jnp.mean(post_norm(x[:, int(self.class_token) :]), axis=1)
        elif self.pool == "map":
            head = MAPHead(
                self.num_heads, self.mlp_dim, self.activation, self.norm_eps, name="head", **kw
            )
            pooled = head(post_norm(x))
        return EncoderOutput(features=features, pooled=pooled, hidden_states=hidden_states)

    def _embed(self, images: jax.Array) -> jax.Array:
        """float[B, H, W, 3] → float[B, N, D]: patches, class token, positions, pre-norm."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Conv(
            self.width,
            (self.patch_size, self.patch_size),
            strides=(self.patch_size, self.patch_size),
            padding="VALID",
            use_bias=self.patch_bias,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (None, None, None, "embed")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name="patch_embedding",
            **kw,
        )(images.astype(self.dtype))
        x = x.reshape(x.shape[0], -1, self.width)
        if self.class_token:
            cls = self.param(
                "class_embedding",
                nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                (self.width,),
                self.param_dtype,
            )
            cls = jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, self.width))
            x = jnp.concatenate([cls, x], axis=1)
        position_embedding = self.param(
            "position_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("patches", "embed")),
            (x.shape[1], self.width),
            self.param_dtype,
        )
        x = x + position_embedding.astype(self.dtype)[None]
        if self.pre_norm:
            x = LayerNorm(eps=self.norm_eps, name="pre_layernorm", **kw)(x)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))

    def _encode(self, x: jax.Array, feature_index: int, return_hidden_states: bool):
        """Runs the layers; returns (last output, hidden_states[feature_index], all or None)."""
        layer_class = maybe_remat(EncoderLayer, self.remat, scanned=self.scan_layers)
        layer_kw = dict(
            num_heads=self.num_heads,
            head_dim=self.width // self.num_heads,
            mlp_dim=self.mlp_dim,
            activation=self.activation,
            norm_eps=self.norm_eps,
            implementation=self.implementation,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        if not self.scan_layers:
            hidden = [x]
            for i in range(self.depth):
                hidden.append(layer_class(**layer_kw, name=f"layers_{i}")(hidden[-1]))
            stacked = jnp.stack(hidden) if return_hidden_states else None
            return hidden[-1], hidden[feature_index], stacked

        # One scan over all layers; an intermediate feature layer rides along in the carry.
        collect = 0 < feature_index < self.depth

        def body(layer, carry, index):
            y, feature = carry
            y = layer(y)
            if collect:
                feature = jnp.where(index + 1 == feature_index, y, feature)
            return (y, feature), (y if return_hidden_states else None)

        scan = nn.scan(
            body,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            length=self.depth,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        layers = layer_class(**layer_kw, name="layers")
        (y, feature), ys = scan(layers, (x, x), jnp.arange(self.depth))
        if feature_index == self.depth:
            feature = y
        stacked = jnp.concatenate([x[None], ys]) if return_hidden_states else None
        return y, feature, stacked
