"""The one multi-head attention: self- or cross-, MHA/GQA/MQA, optional RoPE, functional KV cache.

Built on `jax.nn.dot_product_attention` (mask and bias inputs), so a fused kernel is the
`implementation` field (`None`/`"xla"` or `"cudnn"`), not a rewrite. Softmax runs in float32.
T5's relative position bias enters as `bias`; T5's unscaled logits as `scale=1.0`.

Projections follow the HF names `q_proj`, `k_proj`, `v_proj`, `o_proj`, with kernels shaped per head
(`q_proj.kernel: [D, H, Dh]`, `o_proj.kernel: [H, Dh, D]`) so heads shard over `tensor`; an importer
reshapes HF's `[H·Dh, D]` weights. Bias flags cover Llama (none), Qwen2 (q/k/v only), CLIP, SigLIP,
OPT and BERT (all four).

KV cache (decoding): a `KVCache(k, v, index)` is passed in and a new one returned; the new keys
and values are written at slots `[index, index + T)` and the queries attend over all `S` slots,
with the slots at or past `index + T` masked out. The caller's `mask` covers the `S` slots (see
`masks.make_attention_mask` with `kv_positions`).

Reused keys and values: every call returns its projected `keys_values`, and a later call given
them back skips `k_proj`/`v_proj` (T5's decoder projects the encoder output once for all
decoding steps).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from jaxvlm.layers.embeddings import apply_rope

__all__ = ["Attention", "AttentionOutput", "KVCache"]

HEAD_ACTIVATION = ("batch", "length", "heads", "kv")


@struct.dataclass
class KVCache:
    """One attention layer's cache.

    k, v: float[B, S, Hkv, Dh] — keys (after RoPE) and values of the first `index` slots.
    index: int32[] — the number of slots written so far (one write position for the whole batch;
      left-padding keeps it shared).
    """

    k: jax.Array
    v: jax.Array
    index: jax.Array

    @classmethod
    def zeros(cls, batch_size: int, max_length: int, num_kv_heads: int, head_dim: int, dtype):
        shape = (batch_size, max_length, num_kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))


@struct.dataclass
class AttentionOutput:
    """hidden: float[B, Tq, D_out]; cache: the updated `KVCache`, or None without one;
    keys_values: (k, v) float[B, Tk, Hkv, Dh], this call's keys (after RoPE) and values before
    any cache write, for a caller that passes them back as `keys_values` on later calls."""

    hidden: jax.Array
    cache: KVCache | None = None
    keys_values: tuple[jax.Array, jax.Array] | None = None


class Attention(nn.Module):
    """Scaled dot-product attention with `num_heads` query and `num_kv_heads` key/value heads.

    GQA: query head n reads key/value head `n // (num_heads // num_kv_heads)` (HF `repeat_kv`).
    RoPE (`rope_theta` set) rotates queries at `positions` and keys at `kv_positions`
    (self-attention: `positions`) before caching.
    """

    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None
    out_dim: int | None = None
    use_qkv_bias: bool = False
    use_out_bias: bool = False
    rope_theta: float | None = None
    rope_scaling: dict | None = None
    scale: float | None = None
    implementation: str | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        kv: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        bias: jax.Array | None = None,
        positions: jax.Array | None = None,
        kv_positions: jax.Array | None = None,
        cache: KVCache | None = None,
        keys_values: tuple[jax.Array, jax.Array] | None = None,
    ) -> AttentionOutput:
        """Attends from x to kv (x itself when kv is None).

        Args:
          x: float[B, Tq, D] — queries' inputs.
          kv: float[B, Tk, Dkv] — cross-attention inputs; None for self-attention.
          mask: bool[B, 1 or H, Tq, Tk or S] — True where attention is allowed.
          bias: float[B or 1, 1 or H, Tq, Tk or S] — added to the logits.
          positions: int[B, Tq] — query positions for RoPE.
          kv_positions: int[B, Tk] — key positions for RoPE in cross-attention.
          cache: the `KVCache` to extend (self-attention decoding).
          keys_values: (k, v) float[B, Tk, Hkv, Dh] from an earlier call's output, used as they
            are: `kv`, `k_proj`, `v_proj` and RoPE are skipped (cross-attention keys and values
            computed once for many calls).

        Returns:
          AttentionOutput(hidden float[B, Tq, out_dim or D], cache, keys_values).
        """
        num_kv_heads = self.num_kv_heads or self.num_heads
        if self.num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={num_kv_heads}"
            )
        q = self._project(x, self.num_heads, "q_proj")
        if self.rope_theta is not None:
            q = apply_rope(q, positions, self.rope_theta, self.rope_scaling)
        if keys_values is None:
            k = self._project(x if kv is None else kv, num_kv_heads, "k_proj")
            v = self._project(x if kv is None else kv, num_kv_heads, "v_proj")
            if self.rope_theta is not None:
                k_positions = positions if kv is None else kv_positions
                k = apply_rope(k, k_positions, self.rope_theta, self.rope_scaling)
        else:
            k, v = keys_values
        keys_values = (k, v)
        if cache is not None:
            k, v, mask, cache = _update_cache(cache, k, v, mask)
        q, k, v = (nn.with_logical_constraint(t, HEAD_ACTIVATION) for t in (q, k, v))
        attend = functools.partial(
            jax.nn.dot_product_attention, scale=self.scale, implementation=self.implementation
        )
        if self.implementation in (None, "xla"):
            # As a fused kernel does: keep q, k, v and recompute the probabilities in the backward
            # pass rather than store float[B, H, Tq, Tk] (twice) per layer.
            attend = jax.checkpoint(attend)
        out = attend(q, k.astype(q.dtype), v.astype(q.dtype), bias, mask)
        out = nn.with_logical_constraint(out, HEAD_ACTIVATION)
        out = _Projection(
            (self.out_dim or x.shape[-1],),
            num_contracted=2,
            names=("heads", "kv", "embed"),
            use_bias=self.use_out_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="o_proj",
        )(out)
        return AttentionOutput(hidden=out, cache=cache, keys_values=keys_values)

    def _project(self, x: jax.Array, num_heads: int, name: str) -> jax.Array:
        """float[B, T, D] → float[B, T, heads, Dh]."""
        return _Projection(
            (num_heads, self.head_dim),
            num_contracted=1,
            names=("embed", "heads", "kv"),
            use_bias=self.use_qkv_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )(x)


class _Projection(nn.Module):
    """`x · kernel (+ bias)` contracting x's last `num_contracted` axes; kernel [*in, *features].

    Not `nn.DenseGeneral`: that initialises a flattened kernel, which breaks logical-partitioning
    constraints on a multi-axis kernel under a mesh.
    """

    features: tuple[int, ...]
    num_contracted: int
    names: tuple[str, ...]
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n = self.num_contracted
        shape = (*x.shape[-n:], *self.features)
        init = nn.initializers.lecun_normal(
            in_axis=tuple(range(n)), out_axis=tuple(range(n, len(shape)))
        )
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(init, self.names), shape, self.param_dtype
        )
        # One 2-D matmul on flattened views of x and the kernel (free reshapes): a multi-axis
        # contraction lowers to transposes around the dot on CPU, forward and backward.
        fan_in = math.prod(shape[:n])
        batch_shape = x.shape[:-n]
        x2d = x.astype(self.dtype).reshape(math.prod(batch_shape), fan_in)
        y = x2d @ kernel.astype(self.dtype).reshape(fan_in, -1)
        y = y.reshape(*batch_shape, *self.features)
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, self.names[n:]),
                self.features,
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y


def _update_cache(cache: KVCache, k: jax.Array, v: jax.Array, mask: jax.Array | None):
    """Writes k, v [B, T, Hkv, Dh] at slot `cache.index`; masks the slots not yet written."""
    index = cache.index
    k_all = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, index, 0, 0))
    v_all = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, index, 0, 0))
    new_index = index + k.shape[1]
    written = (jnp.arange(cache.k.shape[1]) < new_index)[None, None, None, :]
    mask = written if mask is None else mask & written
    return k_all, v_all, mask, KVCache(k=k_all, v=v_all, index=new_index)
