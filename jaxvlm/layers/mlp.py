"""The feed-forward block: `fc1 → act → fc2`, or gated `down(act(gate(x)) * up(x))`.

Activation names follow the HF `hidden_act` vocabulary where one exists:
`gelu` (exact erf), `gelu_tanh` (HF `gelu_pytorch_tanh` / `gelu_new`), `quick_gelu` (CLIP:
`x·σ(1.702x)`), `relu`, `squared_relu` (Flamingo, Primer), `silu`. Gated variants (Shazeer 2020,
"GLU Variants Improve Transformer") are `gated=True`: SwiGLU = `activation="silu", gated=True`
(Llama's `gate_proj`/`up_proj`/`down_proj`), GeGLU = `activation="gelu"` or `"gelu_tanh"`.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["ACTIVATIONS", "Mlp"]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "squared_relu": lambda x: jnp.square(jax.nn.relu(x)),
    "silu": jax.nn.silu,
}


def logical_dense(features, names, use_bias, dtype, param_dtype, name) -> nn.Dense:
    """A Dense layer whose kernel has logical names `names` and whose bias has `names[-1:]`."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[-1:]),
        name=name,
    )


class Mlp(nn.Module):
    """Position-wise feed-forward network.

    Submodules: `fc1`, `fc2` (plain) or `gate_proj`, `up_proj`, `down_proj` (gated), as in the HF
    CLIP/OPT and Llama checkpoints.

    Args of `__call__`: x: float[..., D]. Returns float[..., out_dim or D] in `dtype`.
    """

    hidden_dim: int
    out_dim: int | None = None
    activation: str = "gelu"
    gated: bool = False
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"Mlp.activation={self.activation!r} is unknown; known: {sorted(ACTIVATIONS)}"
            )
        act = ACTIVATIONS[self.activation]
        out_dim = self.out_dim or x.shape[-1]
        dense = lambda features, names, name: logical_dense(
            features, names, self.use_bias, self.dtype, self.param_dtype, name
        )
        constrain = lambda h: (
            nn.with_logical_constraint(h, ("batch", "length", "mlp")) if h.ndim == 3 else h
        )
        if self.gated:
            gate = dense(self.hidden_dim, ("embed", "mlp"), "gate_proj")(x)
            up = dense(self.hidden_dim, ("embed", "mlp"), "up_proj")(x)
            down = dense(out_dim, ("mlp", "embed"), "down_proj")
            hidden = lambda down, gate, up: down(constrain(act(gate) * up))
            pre_activations = (gate, up)
        else:
            pre = dense(self.hidden_dim, ("embed", "mlp"), "fc1")(x)
            down = dense(out_dim, ("mlp", "embed"), "fc2")
            hidden = lambda down, pre: down(constrain(act(pre)))
            pre_activations = (pre,)
        # The backward pass keeps only the pre-activations and recomputes the activation (and the
        # product) from them, rather than storing several more float[..., hidden_dim] buffers.
        return nn.remat(hidden)(down, *pre_activations)
