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


def cross_entropy(logits, targets, weights, label_smoothing: float = 0.0):
    """Weighted token cross-entropy in float32.

    Computed as `logsumexp(logits) - logits[target]` rather than through `log_softmax`: the gradient
    is then one fused `softmax - one_hot` pass, with no `[..., V]` log-probability buffer and no
    scatter into zeros for the gathered target. Argmax hits are the first maximal index (as
    `jnp.argmax`), found with two plain reductions instead of a variadic (value, index) one.

    Args:
      logits: float[..., V]; targets: int[...]; weights: float[...] (0 masks a position).
      label_smoothing: mass spread uniformly over the vocabulary (BLIP-2 uses 0.1).
    Returns:
      (sum of weighted losses, sum of weights, number of weighted argmax hits), all float32 scalars.
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    max_logits = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    log_normalizer = jnp.log(jnp.sum(jnp.exp(logits - max_logits), axis=-1)) + max_logits[..., 0]
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    losses = log_normalizer - target_logits
    if label_smoothing:
        mean_log_probs = jnp.mean(logits, axis=-1) - log_normalizer
        losses = (1.0 - label_smoothing) * losses - label_smoothing * mean_log_probs
    weights = weights.astype(jnp.float32)
    index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    argmax = jnp.min(jnp.where(logits == max_logits, index, vocab), axis=-1)
    hits = (argmax == targets).astype(jnp.float32)
    return jnp.sum(losses * weights), jnp.sum(weights), jnp.sum(hits * weights)


def next_token_targets(tokens, loss_mask):
    """Shifts for next-token prediction: position t predicts token t+1.

    `tokens int[B, T]`, `loss_mask int[B, T]` (1 where a token is a target) → targets and weights for
    positions 0..T-2, i.e. `(int[B, T-1], float[B, T-1])`.
    """
    return tokens[:, 1:], loss_mask[:, 1:].astype(jnp.float32)


def lm_loss(model, params, batch, rng, *, mesh, config):
    """Next-token cross-entropy over the positions `batch["loss_mask"]` marks (for a VLM batch,
    with its "images" and "image_mask")."""
    del rng, mesh
    images = {key: batch[key] for key in ("images", "image_mask") if key in batch}
    output = model.apply({"params": params}, batch["tokens"], mask=batch["mask"], **images)
    targets, weights = next_token_targets(batch["tokens"], batch["loss_mask"])
    # Score all T positions, the last with weight 0: slicing the logits to T-1 would copy
    # float[B, T-1, V] forward and pad its gradient back to T.
    targets = jnp.pad(targets, ((0, 0), (0, 1)))
    weights = jnp.pad(weights, ((0, 0), (0, 1)))
    loss_sum, weight, hits = cross_entropy(output.logits, targets, weights)
    weight_safe = jnp.maximum(weight, 1.0)
    metrics = {"loss": loss_sum / weight_safe, "accuracy": hits / weight_safe, "weight": weight}
    return loss_sum / weight_safe, metrics


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


LossFn = Callable[..., tuple[jax.Array, dict]]

OBJECTIVES: dict[str, LossFn] = {
    "lm": lm_loss,
    "contrastive": contrastive_loss,
}


def get_objective(config: ml_collections.ConfigDict) -> LossFn:
    if config.objective not in OBJECTIVES:
        raise ValueError(
            f"config.objective={config.objective!r} is unknown; known: {', '.join(sorted(OBJECTIVES))}"
        )
    return OBJECTIVES[config.objective]
