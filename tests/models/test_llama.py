"""Llama: scan vs loop, KV-cache decoding, the cross-attention hook, heads, packing, HF parity."""

import functools
import zlib

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm.llms import build_llm, llama
from jaxvlm.llms.llama import Llama
from jaxvlm.llms.stack import hook_layer_indices, merge_layers, split_layers

VOCAB, DIM, DEPTH, HEADS, KV_HEADS, MLP = 64, 32, 5, 4, 2, 64
B, T = 2, 6
TINY = dict(
    vocab_size=VOCAB,
    dim=DIM,
    depth=DEPTH,
    num_heads=HEADS,
    num_kv_heads=KV_HEADS,
    mlp_dim=MLP,
    rope_theta=100.0,
)
TOKENS = jax.random.randint(jax.random.key(0), (B, T), 0, VOCAB)


@functools.cache
def _apply(model: nn.Module):
    """One jitted apply per model configuration (flax modules hash by their fields)."""
    return jax.jit(
        lambda params, *args, **kwargs: model.apply({"params": params}, *args, **kwargs),
        static_argnames=("return_hidden", "causal"),
    )


def _shapes(model, *args, **kwargs):
    """The params' structure and shapes, traced but never compiled."""
    init = functools.partial(model.init, **kwargs)
    return nn.unbox(jax.eval_shape(init, jax.random.key(1), *args))["params"]


def _random_params(model, *args):
    """Random params of the model's shapes: no init compile (compile time dominates on CPU)."""
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda s: 0.3 * rng.standard_normal(s.shape, np.float32), _shapes(model, *args)
    )


@pytest.fixture(scope="module")
def scanned():
    model = Llama(**TINY, scan_layers=True)
    return model, _random_params(model, TOKENS)


def _relayout(params, *, to_scan, every_n_layers=None, from_scan=True, from_every_n=None):
    other, layers = split_layers(
        params, depth=DEPTH, scan_layers=from_scan, every_n_layers=from_every_n
    )
    return merge_layers(other, layers, scan_layers=to_scan, every_n_layers=every_n_layers)


def test_scanned_equals_unscanned(scanned):
    model, params = scanned
    assert params["layers"]["self_attn"]["q_proj"]["kernel"].shape == (
        DEPTH,
        DIM,
        HEADS,
        DIM // HEADS,
    )
    unscanned = Llama(**TINY, scan_layers=False)
    loop_params = _relayout(params, to_scan=False)
    assert jax.tree.structure(loop_params) == jax.tree.structure(_shapes(unscanned, TOKENS))
    out = _apply(model)(params, TOKENS)
    loop_out = _apply(unscanned)(loop_params, TOKENS)
    chex.assert_shape(out.logits, (B, T, VOCAB))
    chex.assert_trees_all_close(out.logits, loop_out.logits, atol=1e-5)
    back = _relayout(loop_params, to_scan=True, from_scan=False)
    chex.assert_trees_all_equal(back, params)


def test_cache_decoding_equals_full_forward_with_left_padding(scanned):
    model, params = scanned
    kv_mask = jnp.ones((B, T), bool).at[0, :2].set(False)  # example 0 is left-padded by 2
    positions = jnp.maximum(jnp.cumsum(kv_mask, axis=-1) - 1, 0)
    full = _apply(model)(params, TOKENS, kv_mask=kv_mask, positions=positions).logits
    prompt = 3
    cache = model.init_cache(B, 8)
    out = _apply(model)(
        params,
        TOKENS[:, :prompt],
        kv_mask=kv_mask[:, :prompt],
        positions=positions[:, :prompt],
        cache=cache,
    )
    logits = [out.logits]
    for t in range(prompt, T):
        out = _apply(model)(
            params, TOKENS[:, t : t + 1], positions=positions[:, t : t + 1], cache=out.cache
        )
        logits.append(out.logits)
    assert int(out.cache.index) == T
    decoded = jnp.concatenate(logits, axis=1)
    real = np.asarray(kv_mask)
    np.testing.assert_allclose(np.asarray(decoded)[real], np.asarray(full)[real], atol=1e-5)


def test_packed_segments_equal_separate_sequences(scanned):
    model, params = scanned
    first, second = TOKENS[:1, :2], TOKENS[1:, :4]
    packed = jnp.concatenate([first, second], axis=1)
    segment_ids = jnp.array([[1, 1, 2, 2, 2, 2]])
    positions = jnp.array([[0, 1, 0, 1, 2, 3]])
    out = _apply(model)(params, packed, segment_ids=segment_ids, positions=positions).logits
    chex.assert_trees_all_close(out[:, :2], _apply(model)(params, first).logits, atol=1e-5)
    chex.assert_trees_all_close(out[:, 2:], _apply(model)(params, second).logits, atol=1e-5)


def test_return_hidden_skips_the_head(scanned):
    model, params = scanned
    out = _apply(model)(params, TOKENS, return_hidden=True)
    assert out.logits is None and out.cache is None
    chex.assert_shape(out.hidden, (B, T, DIM))
    # A text tower initialised with return_hidden has no LM head at all.
    tower = _shapes(model, TOKENS, return_hidden=True)
    assert "lm_head" not in tower and "norm" in tower


def test_tied_and_untied_heads_and_added_tokens():
    tied = Llama(**{**TINY, "depth": 1}, tie_embeddings=True, num_added_embeddings=2)
    tokens = TOKENS.at[0, 0].set(VOCAB + 1)  # an added token
    params = _random_params(tied, tokens)
    assert "lm_head" not in params
    assert params["embed_tokens"]["added_embedding"].shape == (2, DIM)
    out = _apply(tied)(params, tokens)
    chex.assert_shape(out.logits, (B, T, VOCAB + 2))
    table = jnp.concatenate(
        [params["embed_tokens"]["embedding"], params["embed_tokens"]["added_embedding"]]
    )
    chex.assert_trees_all_close(out.logits, out.hidden @ table.T, atol=1e-5)
    untied = Llama(**{**TINY, "depth": 1}, tie_embeddings=False, num_added_embeddings=2)
    untied_params = _shapes(untied, tokens)
    assert untied_params["lm_head"]["kernel"].shape == (DIM, VOCAB)
    assert untied_params["lm_head"]["added_kernel"].shape == (DIM, 2)


def test_bf16_params_init():
    model = Llama(**{**TINY, "depth": 2}, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    boxed = jax.eval_shape(model.init, jax.random.key(0), TOKENS)["params"]
    dtypes = {x.dtype for x in jax.tree.leaves(nn.unbox(boxed))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    out = jax.eval_shape(model.apply, nn.unbox({"params": boxed}), TOKENS)
    assert out.logits.dtype == jnp.float32 and out.hidden.dtype == jnp.bfloat16


def test_hook_layer_indices_follow_the_papers():
    assert hook_layer_indices(40, 4, "paper") == list(range(0, 40, 4))  # Flamingo-9B: 10 blocks
    assert hook_layer_indices(80, 7, "paper")[-1] == 77  # Flamingo-80B: 12 blocks
    assert len(hook_layer_indices(80, 7, "paper")) == 12
    assert hook_layer_indices(8, 4, "openflamingo") == [3, 7]
    with pytest.raises(ValueError, match="placement"):
        hook_layer_indices(8, 4, "middle")
    with pytest.raises(ValueError, match="every_n_layers=9"):
        hook_layer_indices(8, 9, "paper")


class _GatedBlock(nn.Module):
    """A test block: `hidden + gate · tanh(w · mean(media))`, gate initialised at 0."""

    @nn.compact
    def __call__(self, hidden, media, media_mask):
        gate = self.param("gate", nn.with_logical_partitioning(nn.initializers.zeros, ()), ())
        w = self.param(
            "w", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("embed",)), (DIM,)
        )
        update = jnp.tanh(w * jnp.mean(media, axis=(1, 2))[:, None, :]) * media_mask[:, :, None]
        return hidden + gate * update


class _Hook(nn.Module):
    """The hook contract with other parameters beside the blocks, as a real bridge has."""

    every_n_layers: int
    placement: str

    def setup(self):
        self.projection = nn.Dense(
            DIM,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("embed", "embed")
            ),
        )
        self.scanned_block = _GatedBlock()
        self.blocks = [_GatedBlock() for _ in range(DEPTH)]

    def __call__(self, media):
        return self.projection(media)

    def cross_attention_block(self, index):
        return self.scanned_block if index is None else self.blocks[index]


class _Owner(nn.Module):
    scan_layers: bool
    placement: str

    def setup(self):
        self.bridge = _Hook(every_n_layers=2, placement=self.placement)
        self.llm = Llama(**TINY, scan_layers=self.scan_layers, cross_attention=self.bridge)

    def __call__(self, tokens, media, media_mask, **kwargs):
        return self.llm(tokens, media=self.bridge(media), media_mask=media_mask, **kwargs)


def _random_or_closed_gate(path, shape):
    """Gates at 0; other leaves random, seeded by their path (same in both layouts)."""
    name = jax.tree_util.keystr(path)
    if name.endswith("['gate']"):
        return jnp.zeros(shape.shape)
    return jax.random.normal(jax.random.key(zlib.crc32(name.encode())), shape.shape)


MEDIA = jax.random.normal(jax.random.key(2), (B, 1, 3, DIM))
MEDIA_MASK = jnp.ones((B, T)).at[0, :2].set(0.0)


@pytest.mark.parametrize("placement", ["paper", "openflamingo"])
def test_cross_attention_hook(scanned, placement):
    plain_model, plain = scanned
    reference = _apply(plain_model)(plain, TOKENS).logits
    n = 2
    num_groups = DEPTH // n
    hooks = hook_layer_indices(DEPTH, n, placement)
    logits = {}
    for scan in (True, False):
        owner = _Owner(scan_layers=scan, placement=placement)
        shapes = _shapes(owner, TOKENS, MEDIA, MEDIA_MASK)
        llm, bridge = shapes["llm"], shapes["bridge"]
        llm_paths = [
            jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(llm)[0]
        ]
        assert not [p for p in llm_paths if p.endswith("['gate']")], "hook params under llm/"
        if scan:
            assert bridge["scanned_block"]["w"].shape == (num_groups, DIM)
            assert "groups" in llm and f"layers_{DEPTH - 1}" in llm
            extra = [f"blocks_{num_groups}"] if len(hooks) > num_groups else []
            assert sorted(k for k in bridge if k.startswith("blocks")) == extra
        else:
            assert sorted(k for k in bridge if k.startswith("blocks")) == [
                f"blocks_{i}" for i in range(len(hooks))
            ]
        # The decoder weights of the plain model, in this layout; random bridge weights, gates at 0.
        llm = _relayout(plain, to_scan=scan, every_n_layers=n if scan else None)
        assert jax.tree.structure(llm) == jax.tree.structure(shapes["llm"])
        bridge = jax.tree_util.tree_map_with_path(_random_or_closed_gate, bridge)
        params = {"llm": llm, "bridge": bridge}
        zero = _apply(owner)(params, TOKENS, MEDIA, MEDIA_MASK).logits
        chex.assert_trees_all_close(zero, reference, atol=1e-6)  # gates at 0: the frozen LM
        # Open every gate, with a different w per block (block i of the loop = group i's slice).
        if scan:
            bridge["scanned_block"] = {
                "gate": jnp.ones((num_groups,)),
                "w": jnp.arange(1.0, num_groups + 1)[:, None] * jnp.ones(DIM),
            }
        for i in range(len(hooks)):
            if f"blocks_{i}" in bridge:
                bridge[f"blocks_{i}"] = {"gate": jnp.ones(()), "w": (i + 1.0) * jnp.ones(DIM)}
        logits[scan] = _apply(owner)(params, TOKENS, MEDIA, MEDIA_MASK).logits
        assert np.abs(np.asarray(logits[scan] - reference)).max() > 1e-3
    # Scanned groups and the unscanned loop apply the same block before the same layers.
    chex.assert_trees_all_close(logits[True], logits[False], atol=1e-5)


def test_cross_attention_hook_with_cache(scanned):
    """Scanned groups + remainder + open gates: prefill then decode equals the full forward."""
    owner = _Owner(scan_layers=True, placement="paper")
    shapes = _shapes(owner, TOKENS, MEDIA, MEDIA_MASK)
    bridge = jax.tree_util.tree_map_with_path(_random_or_closed_gate, shapes["bridge"])
    bridge = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.ones_like(x) if jax.tree_util.keystr(p).endswith("['gate']") else x,
        bridge,
    )
    params = {"llm": _relayout(scanned[1], to_scan=True, every_n_layers=2), "bridge": bridge}
    apply = _apply(owner)
    full = apply(params, TOKENS, MEDIA, MEDIA_MASK).logits
    out = apply(
        params, TOKENS[:, :3], MEDIA, MEDIA_MASK[:, :3], cache=Llama(**TINY).init_cache(B, 8)
    )
    logits = [out.logits]
    for t in range(3, T):
        out = apply(params, TOKENS[:, t : t + 1], MEDIA, MEDIA_MASK[:, t : t + 1], cache=out.cache)
        logits.append(out.logits)
    chex.assert_trees_all_close(jnp.concatenate(logits, axis=1), full, atol=1e-5)


def test_build_llm_from_config():
    model = build_llm({"name": "llama", "checkpoint": "", **TINY, "param_dtype": "bfloat16"})
    assert model.param_dtype == jnp.bfloat16 and model.depth == DEPTH
    with pytest.raises(ValueError, match=r"config.llm.hiden is not a field of Llama"):
        build_llm({"name": "llama", **TINY, "hiden": 3})
    with pytest.raises(ValueError, match=r"known names: \[.*'llama'"):
        build_llm({"name": "gpt5"})
    with pytest.raises(ValueError, match=r"config.text_encoder.x is not a field"):
        build_llm({"name": "llama", **TINY, "x": 1}, where="config.text_encoder")


# Parity with transformers (Llama and Qwen2, through the importer): tests/importers/.


def test_module_exports():
    assert llama.DecoderOutput is not None and "Llama" in llama.__all__


def test_a_rope_scaled_llama_is_hashable():
    """Compiled-function caches key on the module (decoding.llm_decoder): a rope_scaling dict
    from a config or an importer must not make it unhashable."""
    scaled = Llama(**TINY, rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert hash(scaled) == hash(Llama(**TINY, rope_scaling={"rope_type": "linear", "factor": 2.0}))
    assert scaled.rope_scaling["factor"] == 2.0
