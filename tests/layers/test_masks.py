"""Every mask against one built by hand, entry by entry."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm.layers import masks


def _loop_mask(num_queries, num_keys, allowed):
    return np.array([[allowed(q, k) for k in range(num_keys)] for q in range(num_queries)], bool)


def test_causal():
    mask = masks.make_attention_mask(causal=True, query_length=4)
    np.testing.assert_array_equal(mask[0, 0], _loop_mask(4, 4, lambda q, k: k <= q))
    assert mask.shape == (1, 1, 4, 4)


def test_padding_and_causal_with_left_padding():
    kv_mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    positions = jnp.maximum(jnp.cumsum(kv_mask, -1) - 1, 0)
    mask = masks.make_attention_mask(
        kv_mask=kv_mask, causal=True, query_positions=positions, kv_positions=positions
    )
    assert mask.shape == (2, 1, 5, 5)
    for b in range(2):
        p = np.asarray(positions[b])
        expected = _loop_mask(5, 5, lambda q, k, b=b, p=p: bool(kv_mask[b, k]) and p[k] <= p[q])
        np.testing.assert_array_equal(mask[b, 0], expected)


def test_padding_only():
    kv_mask = jnp.array([[1, 1, 0]])
    mask = masks.make_attention_mask(kv_mask=kv_mask)
    np.testing.assert_array_equal(mask[0, 0], np.array([[1, 1, 0]] * 3, bool))


def test_prefix_lm():
    prefix_length = jnp.array([2, 0])
    mask = masks.make_attention_mask(causal=True, prefix_length=prefix_length, query_length=4)
    assert mask.shape == (2, 1, 4, 4)
    np.testing.assert_array_equal(mask[0, 0], _loop_mask(4, 4, lambda q, k: k <= q or k < 2))
    np.testing.assert_array_equal(mask[1, 0], _loop_mask(4, 4, lambda q, k: k <= q))
    with pytest.raises(ValueError, match="causal=True"):
        masks.make_attention_mask(prefix_length=prefix_length, query_length=4)


def test_segments_with_restarting_positions():
    segments = jnp.array([[1, 1, 2, 2, 2, 0]])  # two packed documents, then padding
    positions = jnp.array([[0, 1, 0, 1, 2, 0]])
    mask = masks.make_attention_mask(
        kv_mask=segments > 0,
        causal=True,
        query_positions=positions,
        kv_positions=positions,
        query_segment_ids=segments,
    )
    s, p = np.asarray(segments[0]), np.asarray(positions[0])
    expected = _loop_mask(6, 6, lambda q, k: s[k] > 0 and s[q] == s[k] and p[k] <= p[q])
    np.testing.assert_array_equal(mask[0, 0], expected)


def test_decoding_queries_against_cache_slots():
    # Two new queries at positions 3 and 4 against 6 cache slots, 5 written (slot 5 empty).
    kv_positions = jnp.array([[0, 1, 2, 3, 4, 0]])
    kv_mask = jnp.array([[1, 1, 1, 1, 1, 0]])
    mask = masks.make_attention_mask(
        kv_mask=kv_mask,
        causal=True,
        query_positions=jnp.array([[3, 4]]),
        kv_positions=kv_positions,
    )
    expected = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]], bool)
    np.testing.assert_array_equal(mask[0, 0], expected)


def test_qformer_masks():
    num_queries = 2
    text_mask = jnp.array([[1, 1, 0]])
    got = masks.qformer_masks(num_queries, text_mask)
    valid = [True, True, True, True, False]  # 2 queries, 2 text tokens, 1 pad
    is_query = lambda i: i < num_queries
    expected = {
        "unimodal": lambda q, k: valid[k] and is_query(q) == is_query(k),
        "multimodal_causal": lambda q, k: (
            valid[k] and (is_query(k) if is_query(q) else (is_query(k) or k <= q))
        ),
        "bidirectional": lambda q, k: valid[k],
    }
    assert set(got) == set(expected)
    for name, allowed in expected.items():
        assert got[name].shape == (1, 1, 5, 5), name
        np.testing.assert_array_equal(got[name][0, 0], _loop_mask(5, 5, allowed), err_msg=name)


def test_media_mask_previous_image():
    # tokens: t0 <img> t2 t3 <img> t5 ; 3 media slots, the third empty; 2 visual tokens per image.
    locations = jnp.array([[0, 1, 0, 0, 1, 0]], bool)
    mask = masks.make_media_mask(
        locations, num_media=3, tokens_per_media=2, media_valid=jnp.array([[1, 1, 0]], bool)
    )
    assert mask.shape == (1, 1, 6, 6)
    image_of_token = [None, 0, 0, 0, 1, 1]
    expected = _loop_mask(6, 6, lambda t, k: image_of_token[t] == k // 2)
    np.testing.assert_array_equal(mask[0, 0], expected)
    assert not mask[0, 0, 0].any()  # before any image: attends to nothing


def test_media_mask_next_image():
    locations = jnp.array([[0, 1, 0, 1, 0], [0, 1, 0, 1, 0]], bool)
    mask = masks.make_media_mask(locations, num_media=2, attend_next=jnp.array([True, False]))
    next_image = [0, 1, 1, None, None]
    previous_image = [None, 0, 0, 1, 1]
    for b, image_of_token in enumerate([next_image, previous_image]):
        expected = _loop_mask(5, 2, lambda t, k, i=image_of_token: i[t] == k)
        np.testing.assert_array_equal(mask[b, 0], expected)
