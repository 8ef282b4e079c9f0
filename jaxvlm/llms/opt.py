"""OPT decoder (Zhang et al., 2022, "OPT: Open Pre-trained Transformer Language Models"), by fields.

A port of transformers' `OPTForCausalLM` with the call API of `llms.llama.Llama` (`embed`,
`__call__`, `logits`, `init_cache`, `DecoderOutput`, `DecoderCache`), so it can be the
`config.llm` of any run (LLaVA, BLIP-2's decoder LM) and goes through `decoding.llm_decoder`.

The math, as in transformers' `modeling_opt.py`:
  - token embedding `embed_tokens [V, dim]`; when `layer_dim != dim` (OPT-350m's
    `word_embed_proj_dim=512` against `hidden_size=1024`) `project_in` [dim → layer_dim] after the
    lookup and `project_out` [layer_dim → dim] before the head, both without bias;
  - learned absolute positions `embed_positions [max_positions + 2, layer_dim]`, read at
    `positions + 2` (OPT's offset: the table keeps two unused leading rows). HF derives positions from
    the attention mask (`cumsum(mask) - 1`), which is what callers pass as `positions` (decoding
    does), so left padding gives the same real-token positions;
  - blocks `x += attn(LN(x)); x += fc2(act(fc1(LN(x))))` (`pre_layer_norm=True`: OPT-125m, 1.3b,
    2.7b, …) or post-LN `x = LN(x + attn(x)); x = LN(x + fc2(act(fc1(x))))` (`False`: OPT-350m);
    multi-head attention (no GQA, no RoPE) scaled by 1/sqrt(head_dim); biases on q/k/v/out and
    fc1/fc2 with `use_bias` (HF `enable_bias`); LayerNorm eps 1e-5 with or without scale and bias
    (`norm_affine`, HF `layer_norm_elementwise_affine`);
  - `final_layer_norm` after the last block when `final_norm` (HF: pre-LN and not
    `_remove_final_layer_norm`), then `project_out`, then the head: tied to `embed_tokens` or an
    untied `lm_head`.

Names follow the HF checkpoint (`embed_tokens`, `embed_positions`, `project_in`, `project_out`,
`layers`, `self_attn.{q,k,v}_proj`, `self_attn_layer_norm`, `final_layer_norm`, `lm_head`), so the
importer is a table; two names come from the shared layers: the attention output projection is
`self_attn.o_proj` (HF `out_proj`) and the feed-forward is `mlp.fc1`, `mlp.fc2` (HF `fc1`, `fc2`).

Deviations: HF scales q before the q·k product, `jax.nn.dot_product_attention` scales the product
(the same up to float rounding, far inside the parity tolerance). HF gives padding tokens position
-1 (row 1 of the table), callers here give them 0; padding is never attended to, so only the
padding rows' own outputs differ. No cross-attention hook: `cross_attention` must stay None
(Flamingo-style bridges need `name="llama"`).

KV cache, `return_hidden` and the parameter layouts (`layers_{i}` unscanned, `layers` stacked
[depth, ...] scanned) are those of `llms.llama`, whose docstring states them.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvlm.layers.attention import Attention, KVCache
from jaxvlm.layers.embeddings import Embed, LMHead, PositionEmbedding
from jaxvlm.layers.masks import make_attention_mask
from jaxvlm.layers.mlp import Mlp, logical_dense
from jaxvlm.layers.norms import LayerNorm
from jaxvlm.layers.remat import maybe_remat
from jaxvlm.llms.llama import DecoderCache, DecoderOutput
from jaxvlm.llms.stack import CrossAttentionHook, layer_slice, scanned, stack_trees

__all__ = ["POSITION_OFFSET", "Opt", "OptDecoderLayer"]

# OPT's position table starts with two rows that no real token reads (a fairseq padding_idx relic).
POSITION_OFFSET = 2
# torch `nn.LayerNorm`'s default; OPT's config.json has no field for it.
LAYER_NORM_EPS = 1e-5


class OptDecoderLayer(nn.Module):
    """One OPT block (HF `OPTDecoderLayer`), pre-LN or post-LN.

    Args of `__call__`: x float[B, T, D]; cache `KVCache` or None; mask bool[B, 1, T, S].
    Returns (float[B, T, D], the updated `KVCache` or None).
    """

    num_heads: int
    mlp_dim: int
    hidden_act: str = "relu"
    pre_layer_norm: bool = True
    use_bias: bool = True
    norm_affine: bool = True
    implementation: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cache, mask):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: LayerNorm(
            LAYER_NORM_EPS, use_bias=self.norm_affine, use_scale=self.norm_affine, name=name, **kw
        )
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        dim = x.shape[-1]
        attention_norm, mlp_norm = norm("self_attn_layer_norm"), norm("final_layer_norm")
        h = attention_norm(x) if self.pre_layer_norm else x
        attention = Attention(
            num_heads=self.num_heads,
            head_dim=dim // self.num_heads,
            use_qkv_bias=self.use_bias,
            use_out_bias=self.use_bias,
            implementation=self.implementation,
            name="self_attn",
            **kw,
        )(h, mask=mask, cache=cache)
        x = x + attention.hidden
        if not self.pre_layer_norm:
            x = attention_norm(x)
        h = mlp_norm(x) if self.pre_layer_norm else x
        # Plain fc1 → act → fc2 with HF's names; `Mlp` keeps them.
        x = x + Mlp(
            self.mlp_dim,
            activation=self.hidden_act,
            gated=False,
            use_bias=self.use_bias,
            name="mlp",
            **kw,
        )(h)
        if not self.pre_layer_norm:
            x = mlp_norm(x)
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), attention.cache


class Opt(nn.Module):
    """Token ids (or embeddings) → next-token logits; HF `OPTForCausalLM` (see the module docstring).

    Widths: `dim` is what callers see — token embeddings (`embed`), `embeddings` inputs (what a
    bridge must produce), the `hidden` output and the head (HF `word_embed_proj_dim`); `layer_dim`
    is the width inside the blocks (HF `hidden_size`; None: equal to `dim`, no projections).
    `max_positions` is HF `max_position_embeddings` (the table holds 2 more rows).
    """

    vocab_size: int
    dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    layer_dim: int | None = None
    max_positions: int = 2048
    hidden_act: str = "relu"
    pre_layer_norm: bool = True
    final_norm: bool = True
    use_bias: bool = True
    norm_affine: bool = True
    tie_embeddings: bool = True
    num_added_embeddings: int = 0
    scan_layers: bool = True
    remat: str = "none"
    implementation: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    # The Llama API's field, kept so that a config or caller passing None works; a hook is refused.
    cross_attention: CrossAttentionHook | None = None

    def __post_init__(self):
        if self.cross_attention is not None:
            raise ValueError(
                "Opt: cross_attention hooks (Flamingo-style bridges) are not supported; "
                "use config.llm.name='llama' for a cross-attention bridge"
            )
        super().__post_init__()

    @property
    def width(self) -> int:
        """The blocks' width (HF `hidden_size`)."""
        return self.layer_dim or self.dim

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.width % self.num_heads:
            raise ValueError(
                f"Opt: layer width {self.width} is not a multiple of num_heads={self.num_heads}"
            )
        self.embed_tokens = Embed(self.vocab_size, self.dim, self.num_added_embeddings, **kw)
        self.embed_positions = PositionEmbedding(
            self.max_positions + POSITION_OFFSET, self.width, **kw
        )
        if self.width != self.dim:
            # Two different widths need two logical names (a repeated name is an error); `mlp` as
            # for the LLaVA projector's kernel.
            self.project_in = logical_dense(
                self.width, ("embed", "mlp"), False, self.dtype, self.param_dtype, "project_in"
            )
            self.project_out = logical_dense(
                self.dim, ("mlp", "embed"), False, self.dtype, self.param_dtype, "project_out"
            )
        if self.final_norm:
            self.final_layer_norm = LayerNorm(
                LAYER_NORM_EPS, use_bias=self.norm_affine, use_scale=self.norm_affine, **kw
            )
        if not self.tie_embeddings:
            self.lm_head = LMHead(self.vocab_size, self.num_added_embeddings, **kw)
        layer_class = maybe_remat(OptDecoderLayer, self.remat, scanned=self.scan_layers)
        fields = dict(
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            hidden_act=self.hidden_act,
            pre_layer_norm=self.pre_layer_norm,
            use_bias=self.use_bias,
            norm_affine=self.norm_affine,
            implementation=self.implementation,
            **kw,
        )
        if self.scan_layers:
            self.layers = scanned(layer_class, self.depth, 1)(**fields)
        else:
            self.layers = [layer_class(**fields) for _ in range(self.depth)]

    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens: int[B, T] in [0, vocab_size + num_added_embeddings). Returns float[B, T, dim]."""
        return self.embed_tokens(tokens)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden: float[B, T, dim] (after the final norm and `project_out`).
        Returns float32[B, T, V + A]."""
        if self.tie_embeddings:
            return self.embed_tokens.attend(hidden).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)

    def init_cache(self, batch_size: int, max_length: int) -> DecoderCache:
        """An empty cache for `max_length` slots; needs no parameters."""
        head_dim = self.width // self.num_heads
        shape = (self.depth, batch_size, max_length, self.num_heads, head_dim)
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
          tokens: int[B, T], or `embeddings` float[B, T, dim] (text with image tokens spliced in;
            HF `inputs_embeds`, i.e. before `project_in`).
          positions: int[B, T] in [0, max_positions) — defaults to `cache.index + arange(T)` (0
            without a cache); with left padding pass `cumsum(kv_mask) - 1` (HF's positions).
          mask: bool[B, 1, T, T or S] — a prebuilt mask; otherwise one is built from `kv_mask`
            bool[B, T] (padding), `segment_ids` int[B, T] (packing, no cache), `prefix_length`
            int[B] (prefix-LM) and `causal`.
          cache: a `DecoderCache` to extend (see `init_cache`).
          media, media_mask: must be None (no cross-attention hook).
          return_hidden: skip the LM head (logits None); the text-tower use.

        Returns:
          DecoderOutput(logits float32[B, T, V + A] or None, hidden float[B, T, dim], cache).
        """
        if (tokens is None) == (embeddings is None):
            raise ValueError("Opt: pass exactly one of tokens and embeddings")
        if media is not None or media_mask is not None:
            raise ValueError("Opt: media given but OPT has no cross-attention hook")
        x = self.embed(tokens) if embeddings is None else embeddings.astype(self.dtype)
        batch_size, length = x.shape[:2]
        # A position past the table would read fill values inside jit; refuse while shapes are static.
        slots = length if cache is None else cache.k.shape[2]
        if slots > self.max_positions:
            raise ValueError(
                f"Opt: {slots} tokens (or cache slots) exceed max_positions={self.max_positions} "
                "(HF max_position_embeddings)"
            )
        start = jnp.zeros((), jnp.int32) if cache is None else cache.index
        if positions is None:
            positions = jnp.broadcast_to(start + jnp.arange(length), (batch_size, length))
        if self.width != self.dim:
            x = self.project_in(x)
        x = x + self.embed_positions(positions + POSITION_OFFSET)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        if kv_mask is None:
            kv_mask = jnp.ones((batch_size, length), bool)
        kv_positions = positions
        if cache is not None:
            if segment_ids is not None:
                raise ValueError("Opt: segment_ids (packing) cannot be used with a cache")
            update = lambda buffer, new: jax.lax.dynamic_update_slice(
                buffer, new.astype(buffer.dtype), (0, start)
            )
            kv_positions = update(cache.positions, positions)
            kv_mask = update(cache.kv_mask, kv_mask)
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
        x, layer_cache = self._run_layers(x, layer_cache, mask)
        if self.final_norm:
            x = self.final_layer_norm(x)
        hidden = self.project_out(x) if self.width != self.dim else x
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

    def _run_layers(self, x, cache, mask):
        """All blocks in order; cache: a KVCache stacked [depth, ...] or None."""
        if self.scan_layers:
            return self.layers(x, cache, mask)
        new_caches = []
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, layer_slice(cache, i), mask)
            new_caches.append(layer_cache)
        return x, stack_trees(new_caches)
