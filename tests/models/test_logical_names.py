"""Every parameter of the tiny ViT and Llama has logical names from `sharding.LOGICAL_AXES`."""

import jax
import jax.numpy as jnp
import pytest
from helpers import assert_logical_names

from jaxvlm.encoders.vit import ViT
from jaxvlm.llms.llama import Llama

VIT = dict(image_size=16, patch_size=4, width=32, depth=2, num_heads=4, mlp_dim=64)
LLAMA = dict(vocab_size=64, dim=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64)


@pytest.mark.parametrize(
    "model, inputs",
    [
        (ViT(**VIT), jnp.zeros((1, 16, 16, 3))),
        (
            ViT(**VIT, scan_layers=False, class_token=False, patch_bias=True, pool="map"),
            jnp.zeros((1, 16, 16, 3)),
        ),
        (Llama(**LLAMA, num_added_embeddings=2, qkv_bias=True), jnp.zeros((1, 4), jnp.int32)),
        (
            Llama(
                **LLAMA,
                scan_layers=False,
                tie_embeddings=True,
                attention_bias=True,
                mlp_bias=True,
                param_dtype=jnp.bfloat16,
            ),
            jnp.zeros((1, 4), jnp.int32),
        ),
    ],
    ids=["vit_clip_scanned", "vit_siglip_loop", "llama_scanned", "llama_loop_bf16"],
)
def test_every_parameter_has_logical_names(model, inputs):
    boxed = jax.eval_shape(model.init, jax.random.key(0), inputs)["params"]
    assert assert_logical_names(boxed) > 10


def test_helper_rejects_unboxed_and_unknown_names():
    import flax.linen as nn

    class Bad(nn.Module):
        @nn.compact
        def __call__(self, x):
            self.param("unboxed", nn.initializers.zeros, (2,))
            init = nn.with_logical_partitioning(nn.initializers.zeros, ("hidden",))
            self.param("misnamed", init, (2,))
            return x

    boxed = jax.eval_shape(Bad().init, jax.random.key(0), jnp.zeros(1))["params"]
    with pytest.raises(AssertionError) as error:
        assert_logical_names(boxed)
    assert "['unboxed']: not boxed" in str(error.value)
    assert "['misnamed']: unknown logical names ['hidden']" in str(error.value)
