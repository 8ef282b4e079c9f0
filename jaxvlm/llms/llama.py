"""Llama-family decoder (Touvron et al., 2023): Llama 2/3, Qwen2, SmolLM2, Vicuna, by fields.

Pre-RMSNorm blocks `x += attn(input_layernorm(x)); x += mlp(post_attention_layernorm(x))`, SwiGLU
MLP, RoPE in HF's rotate-half layout, GQA. Qwen2 is `qkv_bias=True` (q/k/v biases, none on o);
`attention_bias=True` puts biases on all four projections. Names follow the HF checkpoint
(`embed_tokens`, `layers`, `self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`, `input_layernorm`,
`post_attention_layernorm`, `norm`, `lm_head`), so the importer is a table.

Cross-attention hook (STYLE.md §4; Flamingo §2.4). `cross_attention` is an optional object with:
  - `every_n_layers: int` and `placement: str`: `"paper"` puts a block before layers 0, n, 2n, …;
    `"openflamingo"` before layer i when (i + 1) % n == 0;
  - `cross_attention_block(index: int | None) -> nn.Module`, a block called as
    `block(hidden float[B, T, D], media, media_mask) -> float[B, T, D]`. `media` and `media_mask`
    are passed through untouched from `Llama.__call__` (e.g. media float[B, M, L, D] and
    `masks.make_media_mask(...)` bool[B, 1, T, M·L]).
The blocks' parameters stay under the hook owner's path (e.g. `bridge/...`), never under `llm/`.
  - Unscanned decoder: block `i` (0-based, in layer order) is `cross_attention_block(i)`.
  - `scan_layers`: the decoder scans over `G = depth // n` groups of n layers; the module
    `cross_attention_block(None)` runs once per group inside the scan, so its parameters are
    stacked `[G, ...]` (axis name `layers`), and its scope must hold nothing else. With the paper
    placement and a remainder `depth % n > 0`, the remainder runs unscanned after the groups,
    preceded by `cross_attention_block(G)`.
Parameter layout (`stack.split_layers` / `stack.merge_layers` convert): unscanned `layers_{i}`;
scanned `layers` stacked [depth, ...]; scanned with a hook `groups/layers_{j}` stacked [G, ...] for
layer `g·n + j`, plus unscanned `layers_{i}` for the remainder layers i ≥ G·n.

KV cache: `init_cache(batch_size, max_length)` gives a `DecoderCache`; each call writes its T tokens
at `cache.index` and returns the advanced cache. With left padding, pass `kv_mask` and positions
(`cumsum(kv_mask) - 1`) for the prompt, then `positions = last + 1` per decoded token.
Text tower: `__call__(..., return_hidden=True)` skips the LM head and returns the final normed
hidden states (`causal=False` makes it a bidirectional encoder).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from flax.core import FrozenDict

from jaxvlm.layers.attention import Attention, KVCache
from jaxvlm.layers.embeddings import Embed, LMHead
from jaxvlm.layers.masks import make_attention_mask
from jaxvlm.layers.mlp import Mlp
from jaxvlm.layers.norms import RMSNorm
from jaxvlm.layers.remat import maybe_remat
from jaxvlm.llms.stack import (
    CrossAttentionHook,
    LayerGroup,
    hook_layer_indices,
    layer_slice,
    merge_group_axis,
    scanned,
    stack_trees,
)

__all__ = [
    "CrossAttentionHook",
    "DecoderCache",
    "DecoderLayer",
    "DecoderOutput",
    "Llama",
]


@struct.dataclass
class DecoderCache:
    """The decoder's KV cache.

    k, v: float[L, B, S, Hkv, Dh] — per layer, keys (after RoPE) and values of the written slots.
    positions: int32[B, S] — the position of each slot's token (for causal and prefix masks).
    kv_mask: bool[B, S] — True for slots holding real (non-padding) tokens.
    index: int32[] — the number of slots written.
    """

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    kv_mask: jax.Array
    index: jax.Array


@struct.dataclass
class DecoderOutput:
    """logits: float32[B, T, V + A] (None with `return_hidden`); hidden: float[B, T, D], the final
    normed hidden states; cache: the advanced `DecoderCache` (None without one)."""

    logits: jax.Array | None
    hidden: jax.Array
    cache: DecoderCache | None = None


class DecoderLayer(nn.Module):
    """One pre-norm Llama block (HF `LlamaDecoderLayer`).

    Args of `__call__`: x float[B, T, D]; cache `KVCache` or None; mask bool[B, 1, T, S];
    positions int[B, T]. Returns (float[B, T, D], the updated `KVCache` or None).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    hidden_act: str = "silu"
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: Mapping | None = None
    rms_norm_eps: float = 1e-6
    implementation: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cache, mask, positions):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        h = RMSNorm(self.rms_norm_eps, name="input_layernorm", **kw)(x)
        attention = Attention(
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            num_kv_heads=self.num_kv_heads,
            use_qkv_bias=self.qkv_bias,
            use_out_bias=self.out_bias,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            implementation=self.implementation,
            name="self_attn",
            **kw,
        )(h, mask=mask, positions=positions, cache=cache)
        x = x + attention.hidden
        h = RMSNorm(self.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
        x = x + Mlp(
            self.mlp_dim,
            activation=self.hidden_act,
            gated=True,
            use_bias=self.mlp_bias,
            name="mlp",
            **kw,
        )(h)
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), attention.cache


class Llama(nn.Module):
    """Token ids (or embeddings) → next-token logits, with an optional cross-attention hook.

    See the module docstring for the hook contract, the parameter layout and the cache.
    """

    vocab_size: int
    dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    tie_embeddings: bool = False
    attention_bias: bool = False
    qkv_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: Mapping | None = None
    rms_norm_eps: float = 1e-6
    num_added_embeddings: int = 0
    scan_layers: bool = True
    remat: str = "none"
    implementation: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    cross_attention: CrossAttentionHook | None = None

    def __post_init__(self):
        # Hashable, so that the module can key compiled-function caches (decoding.llm_decoder).
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, FrozenDict):
            object.__setattr__(self, "rope_scaling", FrozenDict(self.rope_scaling))
        super().__post_init__()

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = Embed(self.vocab_size, self.dim, self.num_added_embeddings, **kw)
        self.norm = RMSNorm(self.rms_norm_eps, **kw)
        if not self.tie_embeddings:
            self.lm_head = LMHead(self.vocab_size, self.num_added_embeddings, **kw)
        layer_class = maybe_remat(DecoderLayer, self.remat, scanned=self.scan_layers)
        make_layer = functools.partial(layer_class, **self._layer_fields())
        hook = self.cross_attention
        if not self.scan_layers:
            self.layers = [make_layer() for _ in range(self.depth)]
        elif hook is None:
            self.layers = scanned(layer_class, self.depth, 2)(**self._layer_fields())
        else:  # scan groups of n layers, each with the hook's block at one position
            n = hook.every_n_layers
            hook_layer_indices(self.depth, n, hook.placement)  # validates
            self.groups = scanned(LayerGroup, self.depth // n, 4)(
                make_layer=make_layer,
                num_layers=n,
                hook_position=0 if hook.placement == "paper" else n - 1,
                hook_block=hook.cross_attention_block(None),
            )
            first = self.depth // n * n
            self.layers = {i: make_layer() for i in range(first, self.depth)}

    def _layer_fields(self) -> dict:
        return dict(
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads or self.num_heads,
            head_dim=self.head_dim or self.dim // self.num_heads,
            mlp_dim=self.mlp_dim,
            hidden_act=self.hidden_act,
            qkv_bias=self.attention_bias or self.qkv_bias,
            out_bias=self.attention_bias,
            mlp_bias=self.mlp_bias,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            rms_norm_eps=self.rms_norm_eps,
            implementation=self.implementation,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens: int[B, T] in [0, vocab_size + num_added_embeddings). Returns float[B, T, D]."""
        return self.embed_tokens(tokens)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden: float[B, T, D] (final normed). Returns float32[B, T, V + A]."""
        if self.tie_embeddings:
            return self.embed_tokens.attend(hidden).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)

    def init_cache(self, batch_size: int, max_length: int) -> DecoderCache:
        """An empty cache for `max_length` slots; needs no parameters."""
        num_kv_heads = self.num_kv_heads or self.num_heads
        head_dim = self.head_dim or self.dim // self.num_heads
        shape = (self.depth, batch_size, max_length, num_kv_heads, head_dim)
        return DecoderCache(
            k=jnp.zeros(shape, self.dtype),
            v=jnp.zeros(shape, self.dtype),
            positions=jnp.zeros((batch_size, max_length), jnp.int32),
            kv_mask=jnp.zeros((batch_size, max_length), bool),
            index=jnp.zeros((), jnp.int32),
        )

    def __call__(
        self,
        tokens: jax.Array | None = None,
        *,
        embeddings: jax.Array | None = None,
        positions: jax.Array | None = None,
        mask: jax.Array | None = None,
        kv_mask: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        prefix_length: jax.Array | None = None,
        causal: bool = True,
        cache: DecoderCache | None = None,
        media: Any = None,
        media_mask: Any = None,
        return_hidden: bool = False,
    ) -> DecoderOutput:
        """Runs the decoder on T new tokens.

        Args:
          tokens: int[B, T], or `embeddings` float[B, T, D] (text with image tokens spliced in).
          positions: int[B, T] — defaults to `cache.index + arange(T)` (0 without a cache).
          mask: bool[B, 1, T, T or S] — a prebuilt mask; otherwise one is built from `kv_mask`
            bool[B, T] (padding), `segment_ids` int[B, T] (packing, no cache), `prefix_length`
            int[B] (prefix-LM) and `causal`.
          cache: a `DecoderCache` to extend (see `init_cache`).
          media, media_mask: passed to the cross-attention hook's blocks.
          return_hidden: skip the LM head (logits None); the text-tower use.

        Returns:
          DecoderOutput(logits float32[B, T, V + A] or None, hidden float[B, T, D], cache).
        """
        if (tokens is None) == (embeddings is None):
            raise ValueError("Llama: pass exactly one of tokens and embeddings")
        if media is not None and self.cross_attention is None:
            raise ValueError("Llama: media given but the decoder has no cross_attention hook")
        x = self.embed(tokens) if embeddings is None else embeddings.astype(self.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        batch_size, length = x.shape[:2]
        start = jnp.zeros((), jnp.int32) if cache is None else cache.index
        if positions is None:
            positions = jnp.broadcast_to(start + jnp.arange(length), (batch_size, length))
        if kv_mask is None:
            kv_mask = jnp.ones((batch_size, length), bool)
        kv_positions = positions
        if cache is not None:
            if segment_ids is not None:
                raise ValueError("Llama: segment_ids (packing) cannot be used with a cache")
            update = lambda buffer, new: jax.lax.dynamic_update_slice(
                buffer, new.astype(buffer.dtype), (0, start)
            )
            kv_positions, kv_mask = (
                update(cache.positions, positions),
                update(cache.kv_mask, kv_mask),
            )
        if mask is None:
            mask = make_attention_mask(
                kv_mask=kv_mask,
                causal=causal,
                query_positions=positions,
                kv_positions=kv_positions,
                query_segment_ids=segment_ids,
                prefix_length=prefix_length,
            )
        layer_cache = None
        if cache is not None:
            layer_cache = KVCache(cache.k, cache.v, jnp.full((self.depth,), cache.index))
        x, layer_cache = self._run_layers(x, layer_cache, mask, positions, media, media_mask)
        hidden = self.norm(x)
        new_cache = None
        if cache is not None:
            new_cache = DecoderCache(
                k=layer_cache.k,
                v=layer_cache.v,
                positions=kv_positions,
                kv_mask=kv_mask,
                index=cache.index + length,
            )
        logits = None if return_hidden else self.logits(hidden)
        return DecoderOutput(logits=logits, hidden=hidden, cache=new_cache)

    def _run_layers(self, x, cache, mask, positions, media, media_mask):
        """All layers and hook blocks in order; cache: a KVCache stacked [depth, ...] or None."""
        if not self.scan_layers:
            return self._run_loop(x, cache, mask, positions, media, media_mask)
        if self.cross_attention is None:
            return self.layers(x, cache, mask, positions)
        return self._run_groups(x, cache, mask, positions, media, media_mask)

    def _run_loop(self, x, cache, mask, positions, media, media_mask):
        hook = self.cross_attention
        hooks = []
        if hook is not None:
            hooks = hook_layer_indices(self.depth, hook.every_n_layers, hook.placement)
        new_caches = []
        for i, layer in enumerate(self.layers):
            if i in hooks:
                block = hook.cross_attention_block(hooks.index(i))
                x = block(x, media, media_mask).astype(x.dtype)
            x, layer_cache = layer(x, layer_slice(cache, i), mask, positions)
            new_caches.append(layer_cache)
        return x, stack_trees(new_caches)

    def _run_groups(self, x, cache, mask, positions, media, media_mask):
        """Scanned groups of n layers (hook block inside), then the unscanned remainder."""
        hook = self.cross_attention
        n = hook.every_n_layers
        num_groups, first = self.depth // n, self.depth // n * n
        grouped = None
        if cache is not None:
            grouped = jax.tree.map(lambda a: a[:first].reshape(num_groups, n, *a.shape[1:]), cache)
        x, grouped = self.groups(x, grouped, mask, positions, media, media_mask)
        new_caches = [] if cache is None else [jax.tree.map(merge_group_axis, grouped)]
        if first < self.depth and hook.placement == "paper":
            x = hook.cross_attention_block(num_groups)(x, media, media_mask).astype(x.dtype)
        for i in range(first, self.depth):
            x, layer_cache = self.layers[i](x, layer_slice(cache, i), mask, positions)
            new_caches.append(stack_trees([layer_cache]))
        if cache is None:
            return x, None
        return x, jax.tree.map(lambda *a: jnp.concatenate(a), *new_caches)
