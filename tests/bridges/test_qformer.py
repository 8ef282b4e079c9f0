"""BLIP-2's Q-Former: shared self-attention under the three masks, ITC/ITM/ITG, gathered negatives."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm import config_utils, objectives, sharding
from jaxvlm.bridges import BridgeText, qformer
from jaxvlm.evals import retrieval

VISION_DIM, BATCH, PATCHES, TEXT_LENGTH = 16, 4, 5, 6


def _bridge(**fields):
    return qformer.Bridge(llm_dim=0, **{**qformer.TINY_FIELDS, **fields})


def _batch(batch=BATCH, seed=0):
    keys = jax.random.split(jax.random.key(seed), 2)
    features = jax.random.normal(keys[0], (batch, 1, 1, PATCHES, VISION_DIM), jnp.float32)
    ids = jax.random.randint(keys[1], (batch, TEXT_LENGTH), 8, qformer.TINY_FIELDS["vocab_size"])
    ids = ids.at[:, 0].set(2)  # the tokenizer's bos, replaced by [CLS] / [DEC]
    mask = jnp.ones((batch, TEXT_LENGTH), jnp.int32).at[0, -2:].set(0)  # row 0 padded
    return {
        "image_features": features,
        "image_mask": jnp.ones((batch, 1), bool),
        "text": BridgeText(ids=ids, mask=mask),
    }


@functools.cache
def _params():
    batch = _batch()
    init = jax.jit(lambda rng, x: _bridge().init(rng, x, image_mask=batch["image_mask"])["params"])
    return jax.device_get(nn.unbox(init(jax.random.key(1), batch["image_features"])))


def _apply(method, *args, bridge=None):
    bridge = bridge or _bridge()
    return jax.jit(lambda p, *a: bridge.apply({"params": p}, *a, method=method))(_params(), *args)


def test_cross_attention_every_other_layer_and_separate_query_ffn():
    params = _params()
    assert set(params["layers_0"]) == {
        "self_attn",
        "cross_attn",
        "feed_forward",
        "feed_forward_query",
    }
    assert "cross_attn" not in params["layers_1"]  # cross_attention_frequency=2
    chex.assert_shape(params["query_tokens"], (4, 32))
    assert "language_projection" not in params  # llm_dim=0: stage 1 has no LLM


def test_unimodal_mask_keeps_queries_and_text_apart():
    """ITC's joint pass equals a queries-only pass and a text-only pass (shared weights)."""
    batch = _batch()
    features = batch["image_features"][:, 0, 0]
    ids, mask = batch["text"].ids, batch["text"].mask

    def joint(module, x, ids, mask):
        return module.encode(x, ids, mask, "unimodal")

    def queries_alone(module, x):
        return module.encode(x, None, None)[0]

    def text_alone(module, ids, mask):
        return module.encode(None, ids, mask, "unimodal", with_queries=False)[1]

    queries, text = _apply(joint, features, ids, mask)
    chex.assert_trees_all_close(queries, _apply(queries_alone, features), atol=1e-5)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(
        np.asarray(text)[real], np.asarray(_apply(text_alone, ids, mask))[real], atol=1e-5
    )


def test_itg_is_causal_over_text_and_reads_the_image():
    batch = _batch()
    features = batch["image_features"][:, 0, 0]
    ids, mask = batch["text"].ids, batch["text"].mask
    logits = _apply(qformer.Bridge.itg_logits, features, ids, mask)
    chex.assert_shape(logits, (BATCH, TEXT_LENGTH, qformer.TINY_FIELDS["vocab_size"]))
    changed = _apply(qformer.Bridge.itg_logits, features, ids.at[:, 4].set(9), mask)
    np.testing.assert_allclose(logits[:, :4], changed[:, :4], atol=1e-5)  # j sees tokens <= j
    assert not np.allclose(logits[:, 4:], changed[:, 4:])
    other_image = _apply(qformer.Bridge.itg_logits, features[::-1], ids, mask)
    assert not np.allclose(logits, other_image)  # text sees the queries, which see the image


def test_max_over_queries_matches_numpy():
    rng = np.random.default_rng(0)
    images, texts = rng.normal(size=(3, 4, 5)), rng.normal(size=(7, 5))
    expected = np.array(
        [[max(images[i, q] @ texts[j] for q in range(4)) for j in range(7)] for i in range(3)]
    )
    np.testing.assert_allclose(qformer.max_over_queries(images, texts), expected, rtol=1e-5)
    np.testing.assert_allclose(retrieval.similarity(images, texts, chunk=2), expected, rtol=1e-12)


def _numpy_cross_entropy(logits, targets, smoothing):
    logits = np.asarray(logits, np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, np.asarray(targets)[..., None], -1)[..., 0]
    return (1 - smoothing) * nll - smoothing * log_probs.mean(-1)


def test_itc_and_itg_losses_equal_hand_computations():
    batch = _batch()
    features = batch["image_features"][:, 0, 0]
    ids, mask = batch["text"].ids, batch["text"].mask
    rngs = {"sampling": jax.random.key(0)}
    bridge = _bridge()
    _, metrics = jax.jit(lambda p, b: qformer.pretrain_loss(bridge, p, b, rngs))(_params(), batch)

    images, texts = _apply(qformer.Bridge.itc_embeddings, features, ids, mask)
    images, texts = np.asarray(images, np.float64), np.asarray(texts, np.float64)
    similarity = (images @ texts.T).max(axis=1) / 0.07  # i2t: max over the queries / τ
    labels = np.arange(BATCH)
    itc = 0.5 * (
        _numpy_cross_entropy(similarity, labels, 0.1).mean()
        + _numpy_cross_entropy(similarity.T, labels, 0.1).mean()
    )
    np.testing.assert_allclose(metrics["itc"], itc, rtol=1e-5)

    logits = _apply(qformer.Bridge.itg_logits, features, ids, mask)
    per_token = _numpy_cross_entropy(logits[:, :-1], ids[:, 1:], 0.1)
    weights = np.asarray(mask[:, 1:], np.float64)
    np.testing.assert_allclose(
        metrics["itg"], (per_token * weights).sum() / weights.sum(), rtol=1e-5
    )


def test_hard_negatives_never_pick_the_positive():
    rng = np.random.default_rng(0)
    similarity = jnp.asarray(rng.normal(size=(5, 5)), jnp.float32) + 50.0 * jnp.eye(5)
    draws = jax.vmap(lambda key: qformer.sample_hard_negatives(similarity, key))(
        jax.random.split(jax.random.key(0), 200)
    )
    assert not (np.asarray(draws) == np.arange(5)).any()
    # The draw follows the similarities: a dominant off-diagonal candidate is picked.
    skewed = jnp.zeros((3, 3)).at[0, 2].set(30.0).at[1, 0].set(30.0).at[2, 1].set(30.0)
    np.testing.assert_array_equal(
        qformer.sample_hard_negatives(skewed, jax.random.key(1)), [2, 0, 1]
    )


def test_gathered_loss_on_a_2x4_mesh_matches_one_device(mesh_2x4):
    """ITC negatives all-gathered across data and fsdp: every loss equals one device's on the
    whole batch (hard negatives are drawn per row, so ITM agrees too)."""
    batch = _batch(8, seed=3)
    bridge = _bridge()
    rngs = {"sampling": jax.random.key(5)}
    one_device = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])

    def metrics_on(mesh):
        similarities = objectives.gathered_max_over_queries(mesh)
        loss = lambda p, b: qformer.pretrain_loss(bridge, p, b, rngs, similarities=similarities)
        placed = jax.tree.map(
            lambda x: jax.device_put(x, sharding.batch_sharding(mesh, x.ndim)), batch
        )
        with jax.set_mesh(mesh):
            return jax.device_get(jax.jit(loss)(_params(), placed)[1])

    sharded, single = metrics_on(mesh_2x4), metrics_on(one_device)
    chex.assert_trees_all_close(sharded, single, rtol=1e-5, atol=1e-6)
    assert sharded["hard_negative_is_positive"] == 0.0
    assert set(sharded) >= {"itc", "itm", "itg", "loss"}


def test_itm_without_a_negative_is_a_clear_error():
    with pytest.raises(ValueError, match="ITM needs a global batch of at least 2"):
        qformer.pretrain_loss(
            _bridge(), _params(), _batch(batch=1), {"sampling": jax.random.key(0)}
        )


def test_blip2_config_rejects_a_batch_of_one_and_an_indivisible_batch(tiny_config):
    with pytest.raises(config_utils.ConfigError, match="ITM .* at least 2"):
        tiny_config("blip2", {"data.batch_size": 1})
    config = tiny_config("blip2", {"data.batch_size": 6, "mesh.data": 2, "mesh.fsdp": 4})
    with pytest.raises(ValueError, match="not divisible by the mesh's batch axes"):
        sharding.check_batch_divisible(config.data.batch_size, sharding.make_mesh(config.mesh))


def test_read_prompt_lets_the_question_steer_the_queries():
    """BLIP-2's VQA fine-tune: with `read_prompt` the query outputs depend on the question (its
    first token read as [CLS]); without it the text is ignored."""
    batch = _batch()
    other = _batch(seed=3)["text"]

    def tokens(text, read_prompt, first=None):
        if first is not None:
            text = BridgeText(ids=text.ids.at[:, 0].set(first), mask=text.mask)
        bridge = _bridge(read_prompt=read_prompt)
        fn = lambda p, f, t: bridge.apply({"params": p}, f, image_mask=batch["image_mask"], text=t)
        return jax.jit(fn)(_params(), batch["image_features"], text).tokens

    asked = tokens(batch["text"], True)
    chex.assert_shape(asked, (BATCH, 1, 4, 32))
    assert not np.allclose(asked, tokens(other, True), atol=1e-4)
    # Whatever the tokenizer put first (bos), the Q-Former reads [CLS] there.
    chex.assert_trees_all_close(asked, tokens(batch["text"], True, first=5), atol=1e-6)
    chex.assert_trees_all_equal(tokens(batch["text"], False), tokens(other, False))
    assert not np.allclose(asked, tokens(batch["text"], False), atol=1e-4)
