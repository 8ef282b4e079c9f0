"""Named predict functions for evaluators: they see these, never the model.

`predict_fns(model, mesh)` returns the subset of `{"logits", "score", "embed_image", "embed_text"}` the
model supports (`score`: per-example summed next-token NLL and target count), each `fn(params, batch) -> array`, jitted once with batch-sharded inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvlm import models, objectives, sharding


def _jit(fn, mesh):
    def traced(params, batch):
        with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
            return fn(params, batch)

    jitted = jax.jit(traced)

    def call(params, batch):
        batch = {
            k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()
        }
        with jax.set_mesh(mesh):
            output = jitted(params, batch)
        if not output.is_fully_addressable:  # multi-process: every process gets the whole result
            from jax.experimental import multihost_utils

            return multihost_utils.process_allgather(output, tiled=True)
        return jax.device_get(output)

    return call


def _sequence_nll(model, params, batch):
    """Per-example `[nll summed over target tokens, number of target tokens]`, `float[B, 2]`."""
    logits = model.apply({"params": params}, batch["tokens"], mask=batch["mask"]).logits
    targets, weights = objectives.next_token_targets(batch["tokens"], batch["loss_mask"])
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return jnp.stack([jnp.sum(nll * weights, axis=-1), jnp.sum(weights, axis=-1)], axis=-1)


def predict_fns(model: nn.Module, mesh) -> dict[str, Callable]:
    fns: dict[str, Callable] = {}
    if isinstance(model, models.LanguageModel):
        fns["logits"] = lambda params, batch: (
            model.apply({"params": params}, batch["tokens"], mask=batch["mask"]).logits
        )
        fns["score"] = lambda params, batch: _sequence_nll(model, params, batch)
    if isinstance(model, models.DualEncoder):
        fns["embed_image"] = lambda params, batch: model.apply(
            {"params": params}, batch["image"], method=models.DualEncoder.embed_image
        )
        fns["embed_text"] = lambda params, batch: model.apply(
            {"params": params},
            batch["text_tokens"],
            batch["text_mask"],
            method=models.DualEncoder.embed_text,
        )
    return {name: _jit(fn, mesh) for name, fn in fns.items()}
