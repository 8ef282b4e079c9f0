"""The `OBJECTIVES` table: generic losses shared by every recipe.

An objective is `loss_fn(model, params, batch, rng, *, mesh, config) -> (loss, metrics)`: `loss` is the
mean over the batch's weight (tokens for LMs, examples for contrastive losses), and `metrics["weight"]`
is that weight, so gradient accumulation can combine micro-batches exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from jaxvlm import sharding
from jaxvlm.layers.losses import cross_entropy


def next_token_targets(tokens, loss_mask):
    """Shifts for next-token prediction: position t predicts token t+1.

    `tokens int[B, T]`, `loss_mask int[B, T]` (1 where a token is a target) → targets and weights for
    positions 0..T-2, i.e. `(int[B, T-1], float[B, T-1])`.
    """
    return tokens[:, 1:], loss_mask[:, 1:].astype(jnp.float32)


def _next_token_loss(logits, sequence, loss_mask):
    """Mean next-token cross-entropy of `logits float[B, T, V]` on `sequence int[B, T]` where
    `loss_mask` marks targets → (loss, metrics with "loss", "accuracy", "weight")."""
    targets, weights = next_token_targets(sequence, loss_mask)
    # Score all T positions, the last with weight 0: slicing the logits to T-1 would copy
    # float[B, T-1, V] forward and pad its gradient back to T.
    targets = jnp.pad(targets, ((0, 0), (0, 1)))
    weights = jnp.pad(weights, ((0, 0), (0, 1)))
    loss_sum, weight, hits = cross_entropy(logits, targets, weights)
    weight_safe = jnp.maximum(weight, 1.0)
    metrics = {"loss": loss_sum / weight_safe, "accuracy": hits / weight_safe, "weight": weight}
    return loss_sum / weight_safe, metrics


VLM_INPUTS = ("images", "image_mask", "bridge_ids", "bridge_mask")


def lm_loss(model, params, batch, rng, *, mesh, config):
    """Next-token cross-entropy over the positions `batch["loss_mask"]` marks (for a VLM batch,
    with its "images", "image_mask" and, for a prompt-reading bridge, "bridge_ids"/"bridge_mask")."""
    del rng, mesh
    images = {key: batch[key] for key in VLM_INPUTS if key in batch}
    output = model.apply({"params": params}, batch["tokens"], mask=batch["mask"], **images)
    return _next_token_loss(output.logits, batch["tokens"], batch["loss_mask"])


def prefix_lm_loss(model, params, batch, rng, *, mesh, config):
    """An encoder-decoder's (T5) next-token cross-entropy on the decoder: "tokens"/"mask" enter
    the encoder (a VLM's with the image tokens), "decoder_tokens" (start token first) the
    decoder, "loss_mask" over the decoder's positions (BLIP-2 §3.3's prefix LM when the host split
    moved a caption prefix into the encoder: `transforms.SplitForEncoderDecoder`). Also logs
    "unsplit_fraction", the rows whose target was too short to split."""
    del rng, mesh
    images = {key: batch[key] for key in VLM_INPUTS if key in batch}
    output = model.apply(
        {"params": params},
        batch["tokens"],
        mask=batch["mask"],
        decoder_tokens=batch["decoder_tokens"],
        decoder_mask=batch["decoder_mask"],
        **images,
    )
    loss, metrics = _next_token_loss(output.logits, batch["decoder_tokens"], batch["loss_mask"])
    if "unsplit" in batch:
        metrics["unsplit_fraction"] = jnp.mean(batch["unsplit"].astype(jnp.float32))
    return loss, metrics


def contrastive_loss(model, params, batch, rng, *, mesh, config):
    """Symmetric InfoNCE (CLIP) with in-batch negatives gathered from every batch shard.

    Each device scores its own rows against the whole global batch (all-gathered with `shard_map`
    across every mesh axis the batch is split over), so the loss equals the single-device loss.
    """
    del rng
    image_embeddings, text_embeddings, scale = model.apply(
        {"params": params}, batch["image"], batch["text_tokens"], batch["text_mask"]
    )
    smoothing = config.contrastive.label_smoothing
    # Scaling the image side once scales both directions' logits (t·(s·i) = s·(t·i)).
    scaled_images = image_embeddings * scale

    def per_example(offset, local_images, local_texts, all_images, all_texts):
        labels = offset + jnp.arange(local_images.shape[0])
        image_to_text = local_images @ all_texts.T  # [b, B]
        text_to_image = local_texts @ all_images.T  # [b, B]
        return 0.5 * (
            _row_cross_entropy(image_to_text, labels, smoothing)
            + _row_cross_entropy(text_to_image, labels, smoothing)
        )

    gathered = sharding.with_gathered_batch(per_example, mesh, num_local_args=2)
    losses = gathered(scaled_images, text_embeddings, scaled_images, text_embeddings)
    loss = jnp.mean(losses)
    similarity = image_embeddings @ text_embeddings.T
    accuracy = jnp.mean(jnp.argmax(similarity, axis=-1) == jnp.arange(similarity.shape[0]))
    metrics = {
        "loss": loss,
        "accuracy": accuracy,
        "logit_scale": scale,
        "weight": jnp.asarray(losses.shape[0], jnp.float32),
    }
    return loss, metrics


def _row_cross_entropy(logits, labels, label_smoothing):
    """Per-row cross-entropy `float[b]` of `logits float[b, B]` against `labels int[b]`."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(log_probs, axis=-1)
    return nll


def gathered_max_over_queries(mesh):
    """BLIP-2 ITC similarities over the global batch, negatives all-gathered with `shard_map`.

    Returns `fn(image_embeddings float[B, Q, E], text_embeddings float[B, E]) -> (i2t, t2i)`, both
    float[B, B] with i2t[i, j] = t2i[j, i] = max_q image_iq · text_j. Each device computes the
    rows of its own images and texts against the gathered batch (`sharding.with_gathered_batch`).
    """

    def per_example(offset, local_images, local_texts, all_images, all_texts):
        del offset
        i2t = jnp.max(jnp.einsum("iqe,je->iqj", local_images, all_texts), axis=1)
        t2i = jnp.max(jnp.einsum("je,iqe->jqi", local_texts, all_images), axis=1)
        return jnp.stack([i2t, t2i], axis=1)  # [b, 2, B]

    gathered = sharding.with_gathered_batch(per_example, mesh, num_local_args=2)

    def similarities(image_embeddings, text_embeddings):
        both = gathered(image_embeddings, text_embeddings, image_embeddings, text_embeddings)
        return both[:, 0], both[:, 1]

    return similarities


def bridge_pretrain_loss(model, params, batch, rng, *, mesh, config):
    """A bridge's own stage (BLIP-2 stage 1: ITC + ITM + ITG) on image–caption pairs.

    The frozen encoder's features (`VLM.image_features`) feed the bridge's `pretrain_loss`,
    with the weights and label smoothings of `config.loss` and the ITC negatives gathered
    across every batch axis of `mesh`. Batch: the "captions" task's "image", "text_tokens",
    "text_mask".
    """
    from jaxvlm.bridges import BridgeText
    from jaxvlm.vlm import VLM

    bridge = model.bridge
    if not hasattr(bridge, "pretrain_loss"):
        raise ValueError(
            f"config.objective='bridge_pretrain' but config.bridge.name={config.bridge.name!r} "
            "defines no pretrain_loss"
        )
    images = batch["image"][:, None]
    features = model.apply({"params": params}, images, method=VLM.image_features)
    bridge_batch = {
        "image_features": features,
        "image_mask": jnp.ones(images.shape[:2], bool),
        "text": BridgeText(ids=batch["text_tokens"], mask=batch["text_mask"]),
    }
    dropout_rng, sampling_rng = jax.random.split(rng)
    return bridge.pretrain_loss(
        bridge,
        params["bridge"],
        bridge_batch,
        {"dropout": dropout_rng, "sampling": sampling_rng},
        similarities=gathered_max_over_queries(mesh),
        **config.loss,
    )


LossFn = Callable[..., tuple[jax.Array, dict]]

OBJECTIVES: dict[str, LossFn] = {
    "lm": lm_loss,
    "prefix_lm": prefix_lm_loss,
    "bridge_pretrain": bridge_pretrain_loss,
    "contrastive": contrastive_loss,
}


def get_objective(config: ml_collections.ConfigDict) -> LossFn:
    if config.objective not in OBJECTIVES:
        raise ValueError(
            f"config.objective={config.objective!r} is unknown; known: {', '.join(sorted(OBJECTIVES))}"
        )
    return OBJECTIVES[config.objective]
