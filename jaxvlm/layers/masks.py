"""The one attention-mask builder, plus the fixed masks of BLIP-2's Q-Former and Flamingo's media.

Every mask is boolean, True where a query may attend to a key, shaped `bool[B, 1, Tq, Tk]` so it
broadcasts over heads in `jax.nn.dot_product_attention`. Masks are built from explicit positions and
segment ids, so KV caches (queries at positions past the prompt) and sequence packing (several
documents in one row) need no special cases.

- `make_attention_mask`: key padding, causal, prefix-LM and packing segments, combined.
- `qformer_masks`: BLIP-2 §3.2 (Fig. 2, right): the unimodal (ITC), multimodal-causal (ITG) and
  bidirectional (ITM) self-attention masks over `[queries; text]`.
- `make_media_mask`: Flamingo §2.3 / App. A.1.3: each text token cross-attends only to the visual
  tokens of the immediately preceding image (or, per example, the next one); tokens before any image
  attend to none (fully False rows — the caller zeroes their output, see papers.md §2).
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["make_attention_mask", "make_media_mask", "qformer_masks"]


def make_attention_mask(
    *,
    kv_mask: jnp.ndarray | None = None,
    causal: bool = False,
    query_positions: jnp.ndarray | None = None,
    kv_positions: jnp.ndarray | None = None,
    query_segment_ids: jnp.ndarray | None = None,
    kv_segment_ids: jnp.ndarray | None = None,
    prefix_length: jnp.ndarray | None = None,
    query_length: int | None = None,
    kv_length: int | None = None,
) -> jnp.ndarray:
    """Combines key padding, causality, prefix-LM and packing segments into one mask.

    A query at position p may attend to a key at position s when all of these hold:
      - `kv_mask[b, s]` (the key is not padding);
      - if `causal`: `s <= p`, or `s < prefix_length[b]` (prefix-LM: the prefix is visible to every
        query, so prefix tokens attend to each other bidirectionally);
      - `query_segment_ids[b, q] == kv_segment_ids[b, k]` (packing: stay within one document).

    Args:
      kv_mask: bool[B, Tk] — True for real keys, False for padding.
      causal: whether to apply the causal constraint (on positions, not on array indices).
      query_positions: int[B, Tq] — defaults to `arange(Tq)`. With a KV cache the queries sit at
        their absolute positions; with packing positions restart in each segment.
      kv_positions: int[B, Tk] — defaults to `arange(Tk)`.
      query_segment_ids, kv_segment_ids: int[B, Tq], int[B, Tk]. Either defaults to the other
        (self-attention without a cache).
      prefix_length: int[B] — with `causal`, keys at positions below it are visible to all queries.
      query_length, kv_length: only needed when no array above gives the length (Tk defaults to Tq).

    Returns:
      bool[B, 1, Tq, Tk]; B is 1 when no array carries a batch dimension.
    """
    if prefix_length is not None and not causal:
        raise ValueError(
            "make_attention_mask: prefix_length relaxes a causal mask; set causal=True"
        )
    if query_segment_ids is None:
        query_segment_ids = kv_segment_ids
    if kv_segment_ids is None:
        kv_segment_ids = query_segment_ids
    queries = [a for a in (query_positions, query_segment_ids) if a is not None]
    keys = [a for a in (kv_mask, kv_positions, kv_segment_ids) if a is not None]
    query_length = queries[0].shape[-1] if queries else query_length
    kv_length = keys[0].shape[-1] if keys else kv_length
    query_length = kv_length if query_length is None else query_length
    kv_length = query_length if kv_length is None else kv_length
    if query_length is None:
        raise ValueError("make_attention_mask: no argument gives the length; pass query_length")
    batch_size = max([a.shape[0] for a in queries + keys if a.ndim == 2], default=1)

    mask = jnp.ones((batch_size, query_length, kv_length), dtype=bool)
    if kv_mask is not None:
        mask &= kv_mask.astype(bool)[:, None, :]
    if causal:
        if query_positions is None:
            query_positions = jnp.arange(query_length)[None, :]
        if kv_positions is None:
            kv_positions = jnp.arange(kv_length)[None, :]
        allowed = kv_positions[:, None, :] <= query_positions[:, :, None]
        if prefix_length is not None:
            allowed |= kv_positions[:, None, :] < jnp.asarray(prefix_length)[:, None, None]
        mask &= allowed
    if query_segment_ids is not None:
        mask &= query_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return mask[:, None, :, :]


def qformer_masks(num_queries: int, text_mask: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """BLIP-2's three Q-Former self-attention masks over the sequence `[queries; text]`.

    Args:
      num_queries: the number of learned queries Q (32 in the paper).
      text_mask: bool[B, T] — True for real text tokens, False for padding.

    Returns:
      a dict of bool[B, 1, Q+T, Q+T]:
        `unimodal` (ITC): queries see only queries; text sees only (non-padding) text.
        `multimodal_causal` (ITG): queries see all queries and no text; text token j sees all
          queries and the text tokens <= j.
        `bidirectional` (ITM): everything sees everything (except text padding).
    """
    batch_size, text_length = text_mask.shape
    length = num_queries + text_length
    is_query = jnp.arange(length) < num_queries
    key_valid = jnp.concatenate(
        [jnp.ones((batch_size, num_queries), bool), text_mask.astype(bool)], axis=1
    )[:, None, None, :]
    query_row, key_col = is_query[:, None], is_query[None, :]
    same_modality = query_row == key_col
    text_causal = jnp.arange(length)[None, :] <= jnp.arange(length)[:, None]
    # Queries never see text; text sees every query and the text up to itself.
    multimodal_causal = jnp.where(query_row, key_col, key_col | text_causal)
    return {
        "unimodal": same_modality[None, None] & key_valid,
        "multimodal_causal": multimodal_causal[None, None] & key_valid,
        "bidirectional": jnp.ones((1, 1, length, length), bool) & key_valid,
    }


def make_media_mask(
    media_locations: jnp.ndarray,
    *,
    num_media: int,
    tokens_per_media: int = 1,
    media_valid: jnp.ndarray | None = None,
    attend_next: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """Flamingo's per-image cross-attention mask: text token t sees only the image before it.

    The m-th `<image>` marker (in text order) stands for media item m. A token attends to the media
    of the last marker at or before it (the marker token itself sees its own image, as in
    OpenFlamingo); tokens before any marker attend to nothing. With `attend_next[b]` the example
    instead attends to the marker after the previous one (Flamingo App. A.3.2 trains with
    p_next = 1/2): the first image for tokens before any marker, nothing after the last.

    Args:
      media_locations: bool[B, T] — True at the `<image>` marker tokens.
      num_media: M, the number of media slots the keys hold.
      tokens_per_media: L, the visual tokens per media item (keys are the M·L flattened tokens).
      media_valid: bool[B, M] — False for empty media slots (fewer images than M).
      attend_next: bool[B] — per example, attend to the next image instead of the previous one.

    Returns:
      bool[B, 1, T, M·L].
    """
    # 1-based index of the last marker at or before each token; 0 = no image yet.
    media_index = jnp.cumsum(media_locations.astype(jnp.int32), axis=-1)
    if attend_next is not None:
        media_index = media_index + attend_next.astype(jnp.int32)[:, None]
    mask = media_index[:, :, None] == jnp.arange(1, num_media + 1)[None, None, :]
    if media_valid is not None:
        mask &= media_valid.astype(bool)[:, None, :]
    mask = jnp.repeat(mask, tokens_per_media, axis=-1)
    return mask[:, None, :, :]
