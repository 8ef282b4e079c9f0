"""Freezing by regex, no optimizer state for frozen leaves, schedules."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxvlm import optim


def params():
    return {
        "encoder": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)},
        "bridge": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)},
    }


def config(**optimizer):
    base = dict(
        learning_rate=1e-2,
        min_learning_rate=1e-3,
        warmup_steps=10,
        schedule="cosine",
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.1,
        grad_clip_norm=1.0,
    )
    base.update(optimizer)
    return ml_collections.ConfigDict({"optimizer": base, "train": {"num_steps": 110}})


def test_trainable_mask_from_regexes():
    mask = optim.trainable_mask(params(), ("bridge/.*",))
    assert mask == {
        "encoder": {"kernel": False, "bias": False},
        "bridge": {"kernel": True, "bias": True},
    }


def test_a_pattern_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match="brigde/.*"):
        optim.trainable_mask(params(), ("brigde/.*",))


def test_frozen_leaves_carry_no_optimizer_state_and_do_not_move():
    p = params()
    mask = optim.trainable_mask(p, ("bridge/.*",))
    tx = optim.build_optimizer(config(warmup_steps=0), p, mask)
    state = tx.init(p)
    state_elements = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
    assert state_elements == 2 * (4 * 2 + 2)  # two Adam moments of the bridge only
    grads = jax.tree.map(jnp.ones_like, p)
    updates, _ = tx.update(grads, state, p)
    new = optax.apply_updates(p, updates)
    np.testing.assert_array_equal(new["encoder"]["kernel"], p["encoder"]["kernel"])
    assert not np.allclose(new["bridge"]["kernel"], p["bridge"]["kernel"])


def test_warmup_then_cosine_to_the_floor():
    schedule = optim.make_schedule(config().optimizer, 110)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(5)), 5e-3, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(10)), 1e-2, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(60)), 1e-3 + 0.5 * (1e-2 - 1e-3), rtol=1e-5)
    np.testing.assert_allclose(float(schedule(110)), 1e-3, rtol=1e-5)
    constant = optim.make_schedule(config(schedule="constant").optimizer, 110)
    assert float(constant(100)) == pytest.approx(1e-2)


def test_weight_decay_skips_norm_scales_and_biases_whatever_their_rank():
    stacked = {
        "layers": {
            "norm": {"scale": jnp.ones((2, 4))},
            "proj": {"bias": jnp.ones((2, 4)), "kernel": jnp.ones((2, 4, 4))},
        },
        "embed": {"embedding": jnp.ones((8, 4))},
    }
    decayed = optim.matrices_only(stacked)
    assert decayed == {
        "layers": {"norm": {"scale": False}, "proj": {"bias": False, "kernel": True}},
        "embed": {"embedding": True},
    }
