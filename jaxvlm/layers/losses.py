"""Token cross-entropy, the one implementation shared by objectives and bridge losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["cross_entropy"]


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
