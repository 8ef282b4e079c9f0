"""BERT (Devlin et al., 2019): the text encoder and the blocks BLIP-2's Q-Former is built from.

A port of transformers' `BertModel` (`modeling_bert.py`), encoder only (no causal self-mask, no
cross-attention, no KV cache). The math, as there:
  - embeddings: `LayerNorm(word[ids] + token_type[type_ids] + position[positions])`, learned
    absolute positions (`positions` default `arange(T)`, token types default 0);
  - post-norm layers: `x = LN(x + attn(x)); x = LN(x + fc2(act(fc1(x))))`, attention with biased
    q/k/v/o projections scaled by 1/sqrt(Dh), `hidden_act` one of `layers.mlp.ACTIVATIONS` (HF
    `gelu` = exact erf, `gelu_new` / `gelu_pytorch_tanh` = `gelu_tanh`, `relu`);
  - an optional pooler: `tanh(dense(x[:, 0]))`.
Deviations: no dropout (frozen or imported weights here).

It lives in `layers/` because its consumer is a bridge (the Q-Former, which may import only
`layers/`): `BertAttention` (self- or cross-attention with its residual and post-norm) and
`BertFeedForward` are the Q-Former's blocks too (its cross-attention and its query FFN), and
`QFormerLayer` is one Q-Former layer built from them (shared self-attention, query-only
cross-attention and FFN); `BertModel.embed` / `encode` / `apply_layer` run the text path with any mask (BLIP-2's unimodal,
causal or bidirectional masks from `masks.qformer_masks`).

Parameter layout: `embeddings/{word_embeddings,position_embeddings}/embedding`,
`embeddings/token_type_embeddings` [types, D], `embeddings/layer_norm`; `layers` stacked [depth,
...] (`scan_layers`) or `layers_{i}`, each `self_attn/attention/{q,k,v,o}_proj`,
`self_attn/layer_norm`, `feed_forward/mlp/{fc1,fc2}`, `feed_forward/layer_norm`; `pooler_dense`
(with `pooler`). `importers/bert.py` maps the HF checkpoint onto it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from jaxvlm.layers.attention import Attention
from jaxvlm.layers.embeddings import Embed, PositionEmbedding
from jaxvlm.layers.masks import make_attention_mask
from jaxvlm.layers.mlp import Mlp, logical_dense
from jaxvlm.layers.norms import LayerNorm
from jaxvlm.layers.remat import maybe_remat

__all__ = [
    "BertAttention",
    "BertEmbeddings",
    "BertFeedForward",
    "BertLayer",
    "BertModel",
    "BertModelOutput",
    "QFormerLayer",
]

EMBED_ACTIVATION = ("batch", "length", "embed")


@struct.dataclass
class BertModelOutput:
    """hidden: float[B, T, D], the last layer's output (HF `last_hidden_state`); pooled: float[B, D]
    (HF `pooler_output`) or None without a pooler; hidden_states: float[depth + 1, B, T, D] (HF's
    tuple, stacked: the embeddings, then each layer's output) or None."""

    hidden: jax.Array
    pooled: jax.Array | None = None
    hidden_states: jax.Array | None = None


class BertAttention(nn.Module):
    """`LayerNorm(x + o_proj(attention(x, kv)))` (HF `BertAttention`: `BertSelfAttention` +
    `BertSelfOutput`); self-attention when `kv` is None, cross-attention otherwise (the Q-Former's
    `crossattention`: kv of another width).

    Args of `__call__`: x float[B, Tq, D]; kv float[B, Tk, Dkv] or None; mask bool[B, 1, Tq, Tk]
    (True where attention is allowed) or None. Returns float[B, Tq, D].
    """

    num_heads: int
    layer_norm_eps: float = 1e-12
    implementation: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, kv: jax.Array | None = None, *, mask=None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"BertAttention: width {width} is not a multiple of num_heads")
        attended = Attention(
            num_heads=self.num_heads,
            head_dim=width // self.num_heads,
            use_qkv_bias=True,
            use_out_bias=True,
            implementation=self.implementation,
            name="attention",
            **kw,
        )(x, kv, mask=mask).hidden
        return LayerNorm(eps=self.layer_norm_eps, name="layer_norm", **kw)(x + attended)


class BertFeedForward(nn.Module):
    """`LayerNorm(x + fc2(act(fc1(x))))` (HF `BertIntermediate` + `BertOutput`; the Q-Former's
    `intermediate_query` / `output_query` too).

    Args of `__call__`: x float[B, T, D]. Returns float[B, T, D].
    """

    mlp_dim: int
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = Mlp(self.mlp_dim, activation=self.hidden_act, name="mlp", **kw)(x)
        return LayerNorm(eps=self.layer_norm_eps, name="layer_norm", **kw)(x + h)


class BertLayer(nn.Module):
    """One post-norm BERT layer (HF `BertLayer` of an encoder): `self_attn`, then `feed_forward`.

    Args of `__call__`: x float[B, T, D]; mask bool[B, 1, T, T] or None (all visible).
    Returns float[B, T, D].
    """

    num_heads: int
    mlp_dim: int
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    implementation: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        kw = dict(
            layer_norm_eps=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype
        )
        x = nn.with_logical_constraint(x, EMBED_ACTIVATION)
        x = BertAttention(
            self.num_heads, implementation=self.implementation, name="self_attn", **kw
        )(x, mask=mask)
        x = BertFeedForward(self.mlp_dim, self.hidden_act, name="feed_forward", **kw)(x)
        return nn.with_logical_constraint(x, EMBED_ACTIVATION)


class QFormerLayer(nn.Module):
    """One Q-Former layer over `[queries; text]` (HF `Blip2QFormerLayer`).

    Args of `__call__`: x float[B, Q + T, D] (the Q = `num_queries` queries first, Q may be 0);
    image float[B, P, Dv] or None; mask bool[B, 1, Q + T, Q + T] or None (all visible).
    Returns float[B, Q + T, D].
    """

    num_heads: int
    mlp_dim: int
    has_cross_attention: bool
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, image=None, mask=None, *, num_queries: int):
        kw = dict(
            layer_norm_eps=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype
        )
        x = nn.with_logical_constraint(x, EMBED_ACTIVATION)
        x = BertAttention(self.num_heads, name="self_attn", **kw)(x, mask=mask)
        queries, text = x[:, :num_queries], x[:, num_queries:]
        parts = []
        if queries.shape[1]:
            if self.has_cross_attention and image is not None:
                queries = BertAttention(self.num_heads, name="cross_attn", **kw)(queries, image)
            ffn = BertFeedForward(self.mlp_dim, self.hidden_act, name="feed_forward_query", **kw)
            parts.append(ffn(queries))
        if text.shape[1]:
            ffn = BertFeedForward(self.mlp_dim, self.hidden_act, name="feed_forward", **kw)
            parts.append(ffn(text))
        x = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
        return nn.with_logical_constraint(x, EMBED_ACTIVATION)


class BertEmbeddings(nn.Module):
    """Token ids → `LayerNorm(word + token_type + position)` (HF `BertEmbeddings`).

    Args of `__call__`: tokens int[B, T]; token_type_ids int[B, T] or None (all 0); positions
    int[B, T] or None (`arange(T)`). Returns float[B, T, D].
    """

    vocab_size: int
    dim: int
    max_positions: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens, token_type_ids=None, positions=None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        length = tokens.shape[-1]
        if positions is None:
            if length > self.max_positions:
                raise ValueError(
                    f"BertEmbeddings: {length} tokens exceed max_positions={self.max_positions}"
                )
            positions = jnp.arange(length)[None, :]
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(tokens)
        token_type_table = self.param(
            "token_type_embeddings",
            # A handful of rows (2 in BERT): replicated, not sharded over `vocab`.
            nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), (None, "embed")),
            (self.type_vocab_size, self.dim),
            self.param_dtype,
        )
        x = Embed(self.vocab_size, self.dim, name="word_embeddings", **kw)(tokens)
        x = x + jnp.take(token_type_table, token_type_ids, axis=0).astype(self.dtype)
        x = x + PositionEmbedding(self.max_positions, self.dim, name="position_embeddings", **kw)(
            positions
        )
        x = LayerNorm(eps=self.layer_norm_eps, name="layer_norm", **kw)(x)
        return nn.with_logical_constraint(x, EMBED_ACTIVATION)


class BertModel(nn.Module):
    """Tokens (+ token types, padding mask) → per-token states and the pooled first token.

    Sizes follow the HF config: dim = hidden_size, depth = num_hidden_layers, mlp_dim =
    intermediate_size, max_positions = max_position_embeddings. See the module docstring for the
    math and the parameter layout. Methods: `__call__` (HF `BertModel.forward`), `embed`,
    `encode` (the layers under any mask), `apply_layer` (one layer, in either layout), `pool`.
    """

    vocab_size: int
    dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    max_positions: int = 512
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    pooler: bool = True
    scan_layers: bool = True
    remat: str = "none"
    implementation: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embeddings = BertEmbeddings(
            self.vocab_size,
            self.dim,
            self.max_positions,
            self.type_vocab_size,
            self.layer_norm_eps,
            **kw,
        )
        layer = maybe_remat(BertLayer, self.remat, scanned=self.scan_layers)
        if self.scan_layers:  # one module, its params stacked by the scan in `encode`
            self.layers = layer(**self._layer_fields())
        else:
            self.layers = [layer(**self._layer_fields()) for _ in range(self.depth)]
        if self.pooler:
            self.pooler_dense = logical_dense(
                self.dim, ("embed", "mlp"), True, self.dtype, self.param_dtype, name=None
            )

    def _layer_fields(self) -> dict:
        return dict(
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps,
            implementation=self.implementation,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    def __call__(
        self,
        tokens: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        *,
        return_hidden_states: bool = False,
    ) -> BertModelOutput:
        """HF `BertModel(input_ids, attention_mask, token_type_ids, position_ids)`.

        Args:
          tokens: int[B, T].
          attention_mask: bool or int[B, T] — True / 1 for real tokens (padding on either side);
            None: all real.
          token_type_ids: int[B, T] in [0, type_vocab_size) or None (all 0).
          positions: int[B, T] or None (`arange(T)`).
          return_hidden_states: also return every layer's output (HF `output_hidden_states`).

        Returns:
          BertModelOutput(hidden float[B, T, D], pooled float[B, D] or None, hidden_states
          float[depth + 1, B, T, D] or None).
        """
        x = self.embed(tokens, token_type_ids, positions)
        kv_mask = None if attention_mask is None else attention_mask.astype(bool)
        mask = make_attention_mask(kv_mask=kv_mask, query_length=tokens.shape[1])
        hidden, hidden_states = self.encode(x, mask, return_hidden_states=return_hidden_states)
        pooled = self.pool(hidden) if self.pooler else None
        return BertModelOutput(hidden=hidden, pooled=pooled, hidden_states=hidden_states)

    def embed(self, tokens, token_type_ids=None, positions=None) -> jax.Array:
        """tokens, token_type_ids, positions: int[B, T] (see `__call__`). Returns float[B, T, D]."""
        return self.embeddings(tokens, token_type_ids, positions)

    def encode(
        self, x: jax.Array, mask: jax.Array | None, *, return_hidden_states: bool = False
    ) -> tuple[jax.Array, jax.Array | None]:
        """Runs every layer. x: float[B, T, D]; mask: bool[B, 1, T, T] or None (all visible).

        Returns (float[B, T, D], float[depth + 1, B, T, D] with `return_hidden_states`, else None).
        """
        if not self.scan_layers:
            hidden = [x]
            for layer in self.layers:
                hidden.append(layer(hidden[-1], mask))
            return hidden[-1], jnp.stack(hidden) if return_hidden_states else None

        def body(layer, carry, mask):
            y = layer(carry, mask)
            return y, (y if return_hidden_states else None)

        scan = nn.scan(
            body,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=nn.broadcast,
            length=self.depth,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        y, ys = scan(self.layers, x, mask)
        return y, jnp.concatenate([x[None], ys]) if return_hidden_states else None

    def apply_layer(self, index: int, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        """Layer `index` alone (a Q-Former interleaves its own blocks between layers).

        index: a Python int in [0, depth); x: float[B, T, D]; mask: bool[B, 1, T, T] or None.
        Returns float[B, T, D]. With `scan_layers`, layer `index`'s slice of the stacked params.
        """
        if not 0 <= index < self.depth:
            raise ValueError(f"BertModel.apply_layer: index {index} is outside [0, {self.depth})")
        if not self.scan_layers:
            return self.layers[index](x, mask)
        stacked = nn.unbox(self.variables["params"]["layers"])
        params = jax.tree.map(lambda a: a[index], stacked)
        layer = BertLayer(**self._layer_fields(), parent=None)  # a pure function of the slice
        return layer.apply({"params": params}, x, mask)

    def pool(self, hidden: jax.Array) -> jax.Array:
        """HF `BertPooler`: hidden float[B, T, D] → tanh(dense(hidden[:, 0])) float[B, D]."""
        if not self.pooler:
            raise ValueError("BertModel.pool: this model has no pooler (pooler=False)")
        return jnp.tanh(self.pooler_dense(hidden[:, 0]))
