"""Attention (GQA, cross, cache), RoPE, norms, MLP and embeddings against references."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxvlm.layers import (
    Attention,
    Embed,
    KVCache,
    LayerNorm,
    Mlp,
    RMSNorm,
    apply_rope,
    make_attention_mask,
)
from jaxvlm.layers.embeddings import rope_inverse_frequencies

B, T, D, HEADS, HEAD_DIM = 2, 5, 32, 4, 8


def _x(seed=0, shape=(B, T, D)):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _random_params(module, *args, **kwargs):
    """Random params of the module's shapes, without compiling its init."""
    init = lambda rng: module.init(rng, *args, **kwargs)
    shapes = nn.unbox(jax.eval_shape(init, jax.random.key(0)))["params"]
    rng = np.random.default_rng(1)
    return jax.tree.map(
        lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape, np.float32)), shapes
    )


def _jit_apply(module):
    return jax.jit(
        lambda params, *args, **kwargs: module.apply({"params": params}, *args, **kwargs)
    )


def test_gqa_equals_mha_with_repeated_kv_heads():
    x = _x()
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    mask = make_attention_mask(causal=True, query_positions=positions, kv_positions=positions)
    kw = dict(num_heads=HEADS, head_dim=HEAD_DIM, rope_theta=100.0, use_qkv_bias=True)
    gqa = Attention(num_kv_heads=2, **kw)
    params = _random_params(gqa, x, mask=mask, positions=positions)  # random biases too
    repeat = lambda a, axis: jnp.repeat(a, HEADS // 2, axis=axis)  # HF repeat_kv order
    mha_params = dict(params)
    for name in ("k_proj", "v_proj"):
        mha_params[name] = {
            "kernel": repeat(params[name]["kernel"], 1),
            "bias": repeat(params[name]["bias"], 0),
        }
    mha = Attention(num_kv_heads=HEADS, **kw)
    apply = lambda m, p: _jit_apply(m)(p, x, mask=mask, positions=positions).hidden
    chex.assert_trees_all_close(apply(gqa, params), apply(mha, mha_params), atol=1e-5)


def test_cross_attention_shapes_mask_and_bias():
    x, kv = _x(0), _x(1, (B, 7, 16))
    attention = Attention(num_heads=HEADS, head_dim=HEAD_DIM, out_dim=24, use_out_bias=True)
    mask = jnp.ones((B, 1, T, 7), bool).at[:, :, :, 3:].set(False)
    params = _random_params(attention, x, kv, mask=mask)
    apply = _jit_apply(attention)
    out = apply(params, x, kv, mask=mask)
    chex.assert_shape(out.hidden, (B, T, 24))
    assert out.cache is None
    # Masked keys do not matter; an additive -inf bias is the same as the mask.
    changed = apply(params, x, kv.at[:, 3:].set(100.0), mask=mask).hidden
    chex.assert_trees_all_close(out.hidden, changed, atol=1e-6)
    bias = jnp.where(mask, 0.0, -1e9)
    chex.assert_trees_all_close(apply(params, x, kv, bias=bias).hidden, out.hidden, atol=1e-5)


def test_cache_prefill_then_decode_equals_full():
    x = _x()
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    attention = Attention(num_heads=HEADS, head_dim=HEAD_DIM, num_kv_heads=2, rope_theta=10.0)
    full_mask = make_attention_mask(causal=True, query_positions=positions, kv_positions=positions)
    params = _random_params(attention, x, mask=full_mask, positions=positions)
    apply = _jit_apply(attention)
    full = apply(params, x, mask=full_mask, positions=positions).hidden
    slots = jnp.broadcast_to(jnp.arange(8), (B, 8))
    cache = KVCache.zeros(B, 8, 2, HEAD_DIM, jnp.float32)
    outputs = []
    for start, stop in [(0, 3), (3, 4), (4, 5)]:
        q_pos = positions[:, start:stop]
        mask = make_attention_mask(causal=True, query_positions=q_pos, kv_positions=slots)
        out = apply(params, x[:, start:stop], mask=mask, positions=q_pos, cache=cache)
        outputs.append(out.hidden)
        cache = out.cache
    assert int(cache.index) == T
    chex.assert_trees_all_close(jnp.concatenate(outputs, 1), full, atol=1e-5)


def _hf_rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 16},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ],
)
def test_rope_matches_hf(scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta, head_dim = 500.0, 16
    positions = np.array([[0, 3, 7, 40], [1, 2, 35, 60]])
    x = np.asarray(_x(3, (2, 4, 3, head_dim)))
    rope_parameters = {"rope_type": "default", "rope_theta": theta, **(scaling or {})}
    config = LlamaConfig(
        hidden_size=head_dim * 3,
        num_attention_heads=3,
        max_position_embeddings=16,
        rope_parameters=rope_parameters,
    )
    kind = rope_parameters["rope_type"]
    seq_len = int(positions.max()) + 1 if kind == "dynamic" else None
    if kind == "default":
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    else:
        inv_freq, _ = ROPE_INIT_FUNCTIONS[kind](config, "cpu", seq_len=seq_len)
    ours_inv_freq = rope_inverse_frequencies(head_dim, theta, scaling, jnp.asarray(positions))
    np.testing.assert_allclose(ours_inv_freq, inv_freq.numpy(), rtol=1e-5)
    angles = torch.tensor(positions, dtype=torch.float32)[..., None] * inv_freq
    emb = torch.cat([angles, angles], -1)[:, :, None, :]
    xt = torch.tensor(x)
    expected = xt * emb.cos() + _hf_rotate_half(xt) * emb.sin()
    ours = apply_rope(jnp.asarray(x), jnp.asarray(positions), theta, scaling)
    np.testing.assert_allclose(ours, expected.numpy(), atol=1e-4)


def test_norms_match_torch():
    x = np.asarray(_x(4)) * 3 + 1
    ln = LayerNorm(eps=1e-5)
    params = ln.init(jax.random.key(0), x)
    ref = torch.nn.functional.layer_norm(torch.tensor(x), (D,), eps=1e-5).numpy()
    np.testing.assert_allclose(ln.apply(params, x), ref, atol=1e-5)
    rms = RMSNorm(eps=1e-6)
    params = rms.init(jax.random.key(0), x)
    xt = torch.tensor(x)
    ref = (xt * torch.rsqrt(xt.pow(2).mean(-1, keepdim=True) + 1e-6)).numpy()
    np.testing.assert_allclose(rms.apply(params, x), ref, atol=1e-5)


@pytest.mark.parametrize(
    "activation, gated, reference",
    [
        ("gelu", False, lambda t: torch.nn.functional.gelu(t)),
        ("gelu_tanh", False, lambda t: torch.nn.functional.gelu(t, approximate="tanh")),
        ("quick_gelu", False, lambda t: t * torch.sigmoid(1.702 * t)),
        ("relu", False, torch.relu),
        ("squared_relu", False, lambda t: torch.relu(t) ** 2),
        ("silu", True, torch.nn.functional.silu),
        ("gelu", True, lambda t: torch.nn.functional.gelu(t)),
    ],
)
def test_mlp_activations(activation, gated, reference):
    x = _x(5, (2, 3, 8))
    mlp = Mlp(16, activation=activation, gated=gated, use_bias=not gated)
    params = nn.unbox(mlp.init(jax.random.key(0), x))["params"]
    t = torch.tensor(np.asarray(x))
    w = lambda name: torch.tensor(np.asarray(params[name]["kernel"]))
    if gated:
        assert set(params) == {"gate_proj", "up_proj", "down_proj"}
        ref = (reference(t @ w("gate_proj")) * (t @ w("up_proj"))) @ w("down_proj")
    else:
        assert set(params) == {"fc1", "fc2"}
        ref = reference(t @ w("fc1")) @ w("fc2")
    np.testing.assert_allclose(mlp.apply({"params": params}, x), ref.numpy(), atol=1e-5)


def test_embed_added_tokens_behave_as_concatenated_table():
    embed = Embed(num_embeddings=10, features=4, num_added=3)
    ids = jnp.array([[0, 9, 10, 12]])
    params = nn.unbox(embed.init(jax.random.key(0), ids))["params"]
    assert params["added_embedding"].shape == (3, 4)
    table = jnp.concatenate([params["embedding"], params["added_embedding"]])
    chex.assert_trees_all_equal(embed.apply({"params": params}, ids), table[ids])
    x = _x(6, (1, 2, 4))
    logits = embed.apply({"params": params}, x, method=Embed.attend)
    chex.assert_trees_all_close(logits, x @ table.T, atol=1e-6)
    no_added = Embed(num_embeddings=10, features=4)
    assert set(no_added.init(jax.random.key(0), ids)["params"]) == {"embedding"}
