"""BLIP-2's Q-Former (Li et al., 2023; papers.md §1): learned queries read the frozen image features.

A BERT-architecture transformer over `[queries; text]` whose **self-attention is shared** by the
`num_queries` learned queries and the text, with **separate feed-forward layers** for the queries
(`feed_forward_query`, LAVIS `intermediate_query`/`output_query`) and cross-attention from the
queries to the image features in layer i iff `i % cross_attention_frequency == 0`. The image
features first pass a LayerNorm owned by the bridge (`ln_vision`, LAVIS `ln_vision`). Queries and
text meet only in self-attention, under one of the three masks of `layers.masks.qformer_masks`:
unimodal (ITC), multimodal-causal (ITG), bidirectional (ITM, and the VQA fine-tune's question).

As a `PREFIX` bridge (stage 2) the query outputs go through `language_projection` (Dense to the
LLM width) and become N = `num_queries` soft-prompt tokens per image. With `read_prompt` (BLIP-2
§4 VQA fine-tuning) the prompt's ids (`BridgeText`, in the Q-Former's vocabulary) join the queries
under the bidirectional mask.

Stage 1 (`pretrain_loss`, BLIP-2 §3.2): ITC (256-d projections, similarity = max over queries,
learned temperature from 0.07 clipped to [0.001, 0.5] as LAVIS, label smoothing), ITM (2-way head
on every query output, averaged; one hard negative text per image and one hard negative image per
text, sampled from the softmaxed ITC similarities with the positive excluded) and ITG (first text
token `[DEC]`, LM head tied to the word embeddings as BERT's, label smoothing), summed with the
given weights. The text's first token (the tokenizer's bos / `[CLS]`) is replaced by
`cls_token_id` for ITC/ITM and by `dec_token_id` for ITG, as LAVIS does.

Parameter layout (names follow HF `Blip2QFormerModel` where it keeps the importer a table):
`ln_vision`, `query_tokens [Q, D]`, `word_embeddings/embedding`, `position_embeddings/embedding`,
`embed_layer_norm`, `layers_{i}/{self_attn, cross_attn (cross layers), feed_forward,
feed_forward_query}` (each a `layers.bert` block), `language_projection` (when `llm_dim > 0`),
`vision_projection`, `text_projection`, `temperature`, `itm_head`, `lm_head_transform`,
`lm_head_layer_norm`, `lm_head_bias`. Text positions start at 0 and queries have none (LAVIS).
Deviations: no dropout; no token-type embeddings (LAVIS has none either).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvlm.bridges.base import BridgeOutput, BridgeText, Injection
from jaxvlm.layers.bert import QFormerLayer
from jaxvlm.layers.embeddings import Embed, PositionEmbedding
from jaxvlm.layers.losses import cross_entropy
from jaxvlm.layers.masks import qformer_masks
from jaxvlm.layers.mlp import ACTIVATIONS, logical_dense
from jaxvlm.layers.norms import LayerNorm

__all__ = ["TINY_FIELDS", "Bridge", "max_over_queries", "pretrain_loss", "sample_hard_negatives"]

# A small instance, for tests (the contract test builds every bridge with its TINY_FIELDS).
TINY_FIELDS = dict(
    num_queries=4,
    dim=32,
    depth=2,
    num_heads=2,
    mlp_dim=64,
    vocab_size=16,
    embed_dim=8,
    cls_token_id=6,
    dec_token_id=7,
)


class Bridge(nn.Module):
    """The Q-Former: image features float[B, M, F, P, Dv] → Q soft-prompt tokens per image.

    Attributes:
      llm_dim: Dllm of `language_projection`; 0 for a bridge-only stage (no LLM: stage 1).
      num_queries: Q learned queries (32 in the paper).
      dim, depth, num_heads, mlp_dim: BERT sizes (768, 12, 12, 3072 for BERT-base).
      cross_attention_frequency: cross-attention in layer i iff i % this == 0 (2: every other).
      vocab_size, max_positions: the text side's vocabulary (the Q-Former's own tokenizer) and
        position table.
      embed_dim: the ITC projection width (256).
      hidden_act, layer_norm_eps: BERT's; vision_norm_eps: `ln_vision`'s epsilon.
      temperature_init: ITC's learned temperature at the start (0.07).
      read_prompt: feed `text` (the question) to the Q-Former too (VQA fine-tuning).
      cls_token_id, dec_token_id: the text's first token for ITC/ITM and for ITG.
      dtype: computation dtype; param_dtype: storage dtype.
    """

    injection: ClassVar[Injection] = Injection.PREFIX

    llm_dim: int
    num_queries: int = 32
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    cross_attention_frequency: int = 2
    vocab_size: int = 30523
    max_positions: int = 512
    embed_dim: int = 256
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    vision_norm_eps: float = 1e-5
    temperature_init: float = 0.07
    read_prompt: bool = False
    cls_token_id: int = 101
    dec_token_id: int = 30522
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def __post_init__(self):
        if self.cross_attention_frequency < 1:
            raise ValueError(
                f"config.bridge.cross_attention_frequency={self.cross_attention_frequency} "
                "must be >= 1"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"config.bridge.hidden_act={self.hidden_act!r}; known: {sorted(ACTIVATIONS)}"
            )
        super().__post_init__()

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.ln_vision = LayerNorm(eps=self.vision_norm_eps, **kw)
        self.query_tokens = self.param(
            "query_tokens",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("queries", "embed")),
            (self.num_queries, self.dim),
            self.param_dtype,
        )
        self.word_embeddings = Embed(self.vocab_size, self.dim, **kw)
        self.position_embeddings = PositionEmbedding(self.max_positions, self.dim, **kw)
        self.embed_layer_norm = LayerNorm(eps=self.layer_norm_eps, **kw)
        self.layers = [
            QFormerLayer(
                num_heads=self.num_heads,
                mlp_dim=self.mlp_dim,
                has_cross_attention=i % self.cross_attention_frequency == 0,
                hidden_act=self.hidden_act,
                layer_norm_eps=self.layer_norm_eps,
                **kw,
            )
            for i in range(self.depth)
        ]
        dense = lambda features, names, name: logical_dense(
            features, names, True, self.dtype, self.param_dtype, name
        )
        if self.llm_dim:
            self.language_projection = dense(self.llm_dim, ("embed", "mlp"), None)
        self.vision_projection = dense(self.embed_dim, ("embed", "mlp"), None)
        self.text_projection = dense(self.embed_dim, ("embed", "mlp"), None)
        self.itm_head = dense(2, ("embed", None), None)
        self.temperature = self.param(
            "temperature",
            nn.with_logical_partitioning(nn.initializers.constant(self.temperature_init), ()),
            (),
            self.param_dtype,
        )
        self.lm_head_transform = dense(self.dim, ("embed", "mlp"), None)
        self.lm_head_layer_norm = LayerNorm(eps=self.layer_norm_eps, **kw)
        self.lm_head_bias = self.param(
            "lm_head_bias",
            nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
            (self.vocab_size,),
            self.param_dtype,
        )

    def encode(
        self,
        image_features: jax.Array | None,
        ids: jax.Array | None,
        text_mask: jax.Array | None,
        mask_kind: str = "bidirectional",
        *,
        with_queries: bool = True,
    ) -> tuple[jax.Array | None, jax.Array | None]:
        """Runs the Q-Former over `[queries; text]` under one of `qformer_masks`.

        Args:
          image_features: float[B, P, Dv] (before `ln_vision`) or None (a text-only pass).
          ids: int[B, T] in the Q-Former's vocabulary, or None (queries only).
          text_mask: int or bool[B, T], 1 for real tokens (with `ids`).
          mask_kind: "unimodal" | "multimodal_causal" | "bidirectional".
          with_queries: False for a text-only pass (ITC's text side alone).

        Returns:
          (query states float[B, Q, D] or None, text states float[B, T, D] or None).
        """
        batch = (image_features if image_features is not None else ids).shape[0]
        parts = []
        num_queries = self.num_queries if with_queries else 0
        if with_queries:
            queries = self.query_tokens.astype(self.dtype)
            parts.append(jnp.broadcast_to(queries[None], (batch, *queries.shape)))
        if ids is not None:
            positions = jnp.arange(ids.shape[1])[None, :]
            parts.append(self.word_embeddings(ids) + self.position_embeddings(positions))
        x = self.embed_layer_norm(jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0])
        mask = None
        if ids is not None:
            masks = qformer_masks(num_queries, jnp.asarray(text_mask).astype(bool))
            mask = masks[mask_kind]
        image = None if image_features is None else self.ln_vision(image_features)
        for layer in self.layers:
            x = layer(x, image, mask, num_queries=num_queries)
        queries_out = x[:, :num_queries] if with_queries else None
        text_out = x[:, num_queries:] if ids is not None else None
        return queries_out, text_out

    def __call__(
        self,
        image_features: jax.Array,
        *,
        image_mask: jax.Array,
        text: BridgeText | None = None,
        train: bool = False,
    ) -> BridgeOutput:
        """The query outputs of every image, projected to the LLM width.

        Args:
          image_features: float[B, M, F, P, Dv] — M images, F frames, P encoder tokens (all kept:
            BLIP-2 reads the class token too); frames are concatenated along the patch axis.
          image_mask: bool[B, M]; False slots give zero tokens.
          text: the prompt int[B, Tq] (Q-Former vocabulary, bos first), read only with
            `read_prompt`; its first token becomes `cls_token_id`.
          train: unused (no dropout).

        Returns:
          BridgeOutput(tokens float[B, M, Q, Dllm]; float[B, M, Q, D] when `llm_dim` is 0),
          aux {"query_output": float[B, M, Q, D]}.
        """
        del train
        if image_features.ndim != 5:
            raise ValueError(
                f"image_features must be float[B, M, F, P, Dv]; got shape {image_features.shape}"
            )
        batch, images, frames, patches, vision_dim = image_features.shape
        flat = image_features.reshape(batch * images, frames * patches, vision_dim)
        ids = text_mask = None
        if self.read_prompt and text is not None:
            # BLIP-2 §4 VQA fine-tune: [CLS] question, beside the queries (bidirectional mask).
            ids = jnp.repeat(text.ids.at[:, 0].set(self.cls_token_id), images, axis=0)
            text_mask = jnp.repeat(text.mask, images, axis=0)
        queries, _ = self.encode(flat, ids, text_mask, "bidirectional")
        if self.is_initializing():
            self._create_stage1_params(flat)
        queries = queries.reshape(batch, images, self.num_queries, self.dim)
        tokens = self.language_projection(queries) if self.llm_dim else queries
        tokens = jnp.where(image_mask[:, :, None, None], tokens, jnp.zeros((), tokens.dtype))
        tokens = nn.with_logical_constraint(tokens, ("batch", "media", "length", "embed"))
        return BridgeOutput(tokens=tokens, media=None, aux={"query_output": queries})

    def _create_stage1_params(self, image_features: jax.Array) -> None:
        """At init, runs the text side and heads once so that every parameter exists."""
        ids = jnp.zeros((image_features.shape[0], 2), jnp.int32)
        self.itc_embeddings(image_features, ids, jnp.ones_like(ids))
        self.itm_logits(image_features, ids, jnp.ones_like(ids))
        self.itg_logits(image_features, ids, jnp.ones_like(ids))

    def itc_embeddings(self, image_features, ids, text_mask):
        """ITC features from one pass under the unimodal mask.

        image_features float[B, P, Dv]; ids, text_mask int[B, T]. Returns (image embeddings
        float32[B, Q, E], text embeddings float32[B, E]), L2-normalised.
        """
        ids = ids.at[:, 0].set(self.cls_token_id)
        queries, text = self.encode(image_features, ids, text_mask, "unimodal")
        return _normalize(self.vision_projection(queries)), _normalize(
            self.text_projection(text[:, 0])
        )

    def embed_image(self, image_features):
        """Image side of ITC alone: float[B, P, Dv] → float32[B, Q, E] (retrieval)."""
        queries, _ = self.encode(image_features, None, None)
        return _normalize(self.vision_projection(queries))

    def embed_text(self, ids, text_mask):
        """Text side of ITC alone: int[B, T] → float32[B, E] (the `[CLS]` output; retrieval)."""
        ids = ids.at[:, 0].set(self.cls_token_id)
        _, text = self.encode(None, ids, text_mask, "unimodal", with_queries=False)
        return _normalize(self.text_projection(text[:, 0]))

    def itm_logits(self, image_features, ids, text_mask):
        """ITM: matched/unmatched logits float32[B, 2], the head averaged over the Q queries."""
        ids = ids.at[:, 0].set(self.cls_token_id)
        queries, _ = self.encode(image_features, ids, text_mask, "bidirectional")
        return jnp.mean(self.itm_head(queries).astype(jnp.float32), axis=1)

    def itg_logits(self, image_features, ids, text_mask):
        """ITG: next-token logits float32[B, T, V] of the text (first token `[DEC]`)."""
        ids = ids.at[:, 0].set(self.dec_token_id)
        _, text = self.encode(image_features, ids, text_mask, "multimodal_causal")
        h = ACTIVATIONS[self.hidden_act](self.lm_head_transform(text))
        h = self.lm_head_layer_norm(h)
        logits = self.word_embeddings.attend(h) + self.lm_head_bias.astype(self.dtype)
        return logits.astype(jnp.float32)

    def logit_scale(self):
        """1 / temperature, the temperature clipped to [0.001, 0.5] (LAVIS `temp.clamp_`)."""
        return 1.0 / jnp.clip(self.temperature.astype(jnp.float32), 0.001, 0.5)


def _normalize(x):
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def max_over_queries(image_embeddings, text_embeddings):
    """BLIP-2 ITC similarity: `float[I, Q, E]`, `float[J, E]` → `float[I, J]`, max over Q."""
    return jnp.max(jnp.einsum("iqe,je->iqj", image_embeddings, text_embeddings), axis=1)


def _default_similarities(image_embeddings, text_embeddings):
    similarity = max_over_queries(image_embeddings, text_embeddings)
    return similarity, similarity.T


def sample_hard_negatives(similarity, rng):
    """One index per row, drawn from `softmax(similarity[i])` with column i excluded.

    similarity: float32[B, B] (row i: candidates for example i; column i its positive).
    Returns int32[B]. Row i uses `fold_in(rng, i)`, so the draw does not depend on the mesh.
    """
    size = similarity.shape[0]
    logits = jnp.where(jnp.eye(size, dtype=bool), -jnp.inf, similarity)
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(size))
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def pretrain_loss(
    bridge: Bridge,
    params,
    batch: dict,
    rngs: dict,
    *,
    itc: float = 1.0,
    itm: float = 1.0,
    itg: float = 1.0,
    itc_label_smoothing: float = 0.1,
    itg_label_smoothing: float = 0.1,
    similarities: Callable | None = None,
):
    """BLIP-2 stage 1: `itc·ITC + itm·ITM + itg·ITG` (papers.md §1; equal weights by default).

    Args:
      bridge: the (unbound) Q-Former; params: its parameters.
      batch: "image_features" float[B, M, F, P, Dv] (frozen encoder output; slot 0 is used), "text"
        BridgeText(ids int[B, T] starting with bos/[CLS], mask int[B, T]).
      rngs: {"sampling": key} for the hard negatives.
      similarities: `(image_embeddings [B, Q, E], text_embeddings [B, E]) → (i2t [B, B],
        t2i [B, B])` over the global batch; the objective passes one that all-gathers the
        negatives across the mesh (`sharding.with_gathered_batch`); default: one device.

    Returns:
      (loss, metrics) with "itc", "itm", "itg", accuracies, "temperature" and "weight" (B).
    """
    features = batch["image_features"]
    if features.ndim != 5:
        raise ValueError(f"image_features must be float[B, M, F, P, Dv]; got {features.shape}")
    # One image per example (the first slot), its frames along the patch axis as in `__call__`.
    features = features[:, 0].reshape(features.shape[0], -1, features.shape[-1])
    ids, text_mask = batch["text"].ids, batch["text"].mask
    size = ids.shape[0]
    if size < 2 and itm:
        raise ValueError(
            f"ITM needs a global batch of at least 2 (a hard negative must exist); got {size}"
        )
    apply = lambda method, *args: bridge.apply({"params": params}, *args, method=method)
    similarities = similarities or _default_similarities

    image_embeddings, text_embeddings = apply(Bridge.itc_embeddings, features, ids, text_mask)
    i2t, t2i = similarities(image_embeddings, text_embeddings)
    scale = apply(Bridge.logit_scale)
    labels = jnp.arange(size)
    ones = jnp.ones((size,), jnp.float32)
    itc_sum = sum(
        cross_entropy(s * scale, labels, ones, itc_label_smoothing)[0] for s in (i2t, t2i)
    )
    itc_loss = itc_sum / (2 * size)
    itc_hits = jnp.mean(jnp.argmax(i2t, axis=-1) == labels)

    metrics = {"itc": itc_loss, "itc_accuracy": itc_hits, "temperature": 1.0 / scale}
    loss = itc * itc_loss
    if itm:
        # BLIP-2 §3.2 hard negative mining (no gradient through the draw, as LAVIS's no_grad).
        rng = rngs["sampling"]
        no_grad = jax.lax.stop_gradient
        negative_text = sample_hard_negatives(no_grad(i2t * scale), jax.random.fold_in(rng, 0))
        negative_image = sample_hard_negatives(no_grad(t2i * scale), jax.random.fold_in(rng, 1))
        # Rows: (image i, text i) matched; (hard image for text j, text j); (image i, hard text).
        itm_features = jnp.concatenate([features, features[negative_image], features])
        itm_ids = jnp.concatenate([ids, ids, ids[negative_text]])
        itm_mask = jnp.concatenate([text_mask, text_mask, text_mask[negative_text]])
        itm_labels = jnp.concatenate([jnp.ones(size, jnp.int32), jnp.zeros(2 * size, jnp.int32)])
        logits = apply(Bridge.itm_logits, itm_features, itm_ids, itm_mask)
        itm_sum, _, itm_hits = cross_entropy(logits, itm_labels, jnp.ones(3 * size))
        metrics.update(itm=itm_sum / (3 * size), itm_accuracy=itm_hits / (3 * size))
        metrics["hard_negative_is_positive"] = jnp.mean(
            (negative_text == labels) | (negative_image == labels)
        )
        loss = loss + itm * metrics["itm"]
    if itg:
        logits = apply(Bridge.itg_logits, features, ids, text_mask)
        targets = jnp.pad(ids[:, 1:], ((0, 0), (0, 1)))
        target_weights = jnp.pad(text_mask[:, 1:], ((0, 0), (0, 1))).astype(jnp.float32)
        itg_sum, count, itg_hits = cross_entropy(
            logits, targets, target_weights, itg_label_smoothing
        )
        count = jnp.maximum(count, 1.0)
        metrics.update(itg=itg_sum / count, itg_accuracy=itg_hits / count)
        loss = loss + itg * metrics["itg"]
    metrics.update(loss=loss, weight=jnp.asarray(size, jnp.float32))
    return loss, metrics


Bridge.pretrain_loss = staticmethod(pretrain_loss)
