"""Optimizer: warm-up + decay schedules, the trainable mask from regexes, and frozen leaves via
`optax.multi_transform` (frozen leaves get `optax.set_to_zero()` and therefore carry no optimizer state).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
import optax

from jaxvlm.param_paths import path_string

TRAIN, FROZEN = "train", "frozen"


def trainable_mask(params, patterns: Sequence[str]):
    """A bool pytree: True where the leaf's path fully matches one of `patterns`.

    Raises if a pattern matches no leaf (a typo would otherwise freeze what was meant to train).
    """
    compiled = [re.compile(p) for p in patterns]
    used = [False] * len(compiled)

    def is_trainable(path, _):
        name = path_string(path)
        hit = False
        for i, pattern in enumerate(compiled):
            if pattern.fullmatch(name):
                used[i] = hit = True
        return hit

    mask = jax.tree_util.tree_map_with_path(is_trainable, params)
    unused = [p for p, u in zip(patterns, used, strict=True) if not u]
    if unused:
        some = [path_string(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)[:5]]
        raise ValueError(
            f"config.trainable patterns {unused} match no parameter; paths look like {some}"
        )
    return mask


def count_params(params, mask=None) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(params)]
    if mask is None:
        return sum(sizes), 0
    flags = jax.tree.leaves(mask)
    trainable = sum(s for s, f in zip(sizes, flags, strict=True) if f)
    return trainable, sum(sizes) - trainable


def make_schedule(opt: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to the peak, then cosine / linear decay to `min_learning_rate`, or constant."""
    peak, floor, warmup = opt.learning_rate, opt.min_learning_rate, opt.warmup_steps
    decay_steps = max(1, num_steps - warmup)
    if opt.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=floor / peak if peak else 0.0)
    elif opt.schedule == "linear":
        decay = optax.linear_schedule(peak, floor, decay_steps)
    elif opt.schedule == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(
            f"config.optimizer.schedule={opt.schedule!r}; allowed: cosine, linear, constant"
        )
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def build_optimizer(
    config: ml_collections.ConfigDict, params, mask
) -> optax.GradientTransformation:
    """AdamW (+ global-norm clip) on trainable leaves, `set_to_zero` on frozen ones.

    Weight decay applies to matrices only (norm scales and biases are not decayed).
    """
    opt = config.optimizer
    schedule = make_schedule(opt, config.train.num_steps)
    train_chain = [
        optax.adamw(
            schedule,
            b1=opt.b1,
            b2=opt.b2,
            eps=opt.eps,
            weight_decay=opt.weight_decay,
            mask=matrices_only,
        )
    ]
    if opt.grad_clip_norm:
        train_chain.insert(0, optax.clip_by_global_norm(opt.grad_clip_norm))
    labels = jax.tree.map(lambda trainable: TRAIN if trainable else FROZEN, mask)
    trainable, frozen = count_params(params, mask)
    logging.info("parameters: %s trainable, %s frozen", f"{trainable:,}", f"{frozen:,}")
    return optax.multi_transform(
        {TRAIN: optax.chain(*train_chain), FROZEN: optax.set_to_zero()}, labels
    )


# Leaves that get weight decay, by their name; norm scales, biases, gates and temperatures do not.
DECAYED_LEAVES = ("kernel", "embedding", "added_embedding", "added_kernel")


def matrices_only(params):
    """Weight-decay mask by leaf name (not by rank: scanned norm scales are 2-D too)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: path_string(path).rsplit("/", 1)[-1] in DECAYED_LEAVES, params
    )


def learning_rate_at(config: ml_collections.ConfigDict, step: int) -> float:
    return float(make_schedule(config.optimizer, config.train.num_steps)(step))
