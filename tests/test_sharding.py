"""The mesh, the rule table and the gathered contrastive loss."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from jaxvlm import sharding


def test_mesh_product_must_equal_device_count():
    with pytest.raises(ValueError, match="product of the mesh axes must equal the device count"):
        sharding.make_mesh({"data": 3, "fsdp": 1, "tensor": 1})
    with pytest.raises(ValueError, match="unknown axes"):
        sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1, "pipeline": 1})
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 1})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}


def test_logical_rules_shard_params_and_batches(mesh_2x4):
    assert sharding.logical_to_sharding(("embed", "mlp"), mesh_2x4).spec == PartitionSpec(
        "fsdp", None
    )
    tensor_mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    spec = sharding.logical_to_sharding(("embed", "mlp"), tensor_mesh).spec
    assert spec == PartitionSpec("fsdp", "tensor")
    assert sharding.batch_sharding(mesh_2x4, 2).spec == PartitionSpec(("data", "fsdp"), None)


def test_batch_not_divisible_by_mesh_is_an_error(mesh_2x4):
    with pytest.raises(ValueError, match="not divisible by the mesh's batch axes"):
        sharding.check_batch_divisible(12, mesh_2x4)


def _clip_loss(offset, local_images, local_texts, all_images, all_texts):
    labels = offset + jnp.arange(local_images.shape[0])
    image_to_text = jax.nn.log_softmax(local_images @ all_texts.T, axis=-1)
    text_to_image = jax.nn.log_softmax(local_texts @ all_images.T, axis=-1)
    pick = lambda logp: jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    return -0.5 * (pick(image_to_text) + pick(text_to_image))


def test_gathered_contrastive_loss_matches_single_device(mesh_2x4):
    """Negatives all-gathered across (data, fsdp): the loss and its gradient equal one device's."""
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    texts = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    single_mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])

    def loss(mesh, images, texts):
        per_example = sharding.with_gathered_batch(_clip_loss, mesh, num_local_args=2)
        return jnp.mean(per_example(images, texts, images, texts))

    def value_and_grad(mesh):
        placed = [jax.device_put(x, sharding.batch_sharding(mesh, 2)) for x in (images, texts)]
        fn = jax.jit(jax.value_and_grad(lambda i, t: loss(mesh, i, t), argnums=(0, 1)))
        with jax.set_mesh(mesh):
            return fn(*placed)

    reference = value_and_grad(single_mesh)
    gathered = value_and_grad(mesh_2x4)
    chex.assert_trees_all_close(gathered, reference, rtol=1e-5, atol=1e-6)
    # And against plain numpy on the full batch.
    logits = np.asarray(images) @ np.asarray(texts).T
    log_softmax = lambda x: (
        x
        - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True))
        - x.max(1, keepdims=True)
    )
    expected = -0.5 * (np.diag(log_softmax(logits)) + np.diag(log_softmax(logits.T))).mean()
    np.testing.assert_allclose(float(reference[0]), expected, rtol=1e-5)


def test_boxed_params_get_their_logical_shardings(mesh_2x4):
    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x):
            kernel = self.param(
                "kernel",
                nn.with_logical_partitioning(nn.initializers.ones, ("embed", "mlp")),
                (8, 4),
            )
            return x @ kernel

    boxed = jax.eval_shape(Tiny().init, jax.random.key(0), jnp.ones((2, 8)))
    shardings = sharding.tree_shardings(boxed, mesh_2x4)
    assert shardings["params"]["kernel"].spec == PartitionSpec("fsdp", None)
