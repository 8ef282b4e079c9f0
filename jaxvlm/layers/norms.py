"""Normalisation layers: LayerNorm (CLIP, SigLIP, OPT, BERT) and RMSNorm (Llama, Qwen2, T5).

Both compute their statistics in float32 whatever `dtype` is, as the HF reference implementations
do, and name their parameters `scale` and `bias` with the logical axis `embed`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["LayerNorm", "RMSNorm", "make_norm"]


class LayerNorm(nn.Module):
    """`(x - mean) / sqrt(var + eps) * scale + bias` over the last axis.

    Args of `__call__`: x: float[..., D]. Returns float[..., D] in `dtype`.
    """

    eps: float = 1e-5
    use_bias: bool = True
    use_scale: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        if self.use_scale:
            scale = self.param(
                "scale",
                nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                (features,),
                self.param_dtype,
            )
            y = y * scale.astype(jnp.float32)
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                (features,),
                self.param_dtype,
            )
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    """`x / sqrt(mean(x²) + eps) * scale` over the last axis (Zhang & Sennrich, 2019).

    As HF `LlamaRMSNorm`: normalise in float32, cast back to `dtype`, then multiply by `scale`.

    Args of `__call__`: x: float[..., D]. Returns float[..., D] in `dtype`.
    """

    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x = x.astype(jnp.float32)
        y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return y.astype(self.dtype) * scale.astype(self.dtype)


NORMS = {"layernorm": LayerNorm, "rmsnorm": RMSNorm}


def make_norm(
    kind: str,
    eps: float,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    name: str | None = None,
) -> nn.Module:
    """A norm by kind: `"layernorm"` or `"rmsnorm"`."""
    if kind not in NORMS:
        raise ValueError(f"unknown norm kind {kind!r}; known: {sorted(NORMS)}")
    return NORMS[kind](eps=eps, dtype=dtype, param_dtype=param_dtype, name=name)
