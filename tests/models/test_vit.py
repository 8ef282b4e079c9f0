"""ViT: CLIP and SigLIP forms, feature-layer selection, scan vs loop, HF parity, build_encoder."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm.encoders import build_encoder
from jaxvlm.encoders.vit import ViT

B, SIZE, PATCH, WIDTH, HEADS, MLP = 2, 16, 4, 32, 4, 64
PATCHES = (SIZE // PATCH) ** 2
CLIP = dict(
    image_size=SIZE,
    patch_size=PATCH,
    width=WIDTH,
    depth=2,
    num_heads=HEADS,
    mlp_dim=MLP,
    activation="quick_gelu",
)
SIGLIP = dict(
    CLIP,
    activation="gelu_tanh",
    class_token=False,
    pre_norm=False,
    patch_bias=True,
    pool="map",
    norm_eps=1e-6,
)
IMAGES = jax.random.normal(jax.random.key(0), (B, SIZE, SIZE, 3))


@functools.cache
def _apply(model):
    return jax.jit(
        lambda params, images: model.apply({"params": params}, images, return_hidden_states=True)
    )


def _init(model):
    """Random params of the model's shapes: no init compile (compile time dominates on CPU)."""
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(1), IMAGES))["params"]
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: 0.3 * rng.standard_normal(s.shape, np.float32), shapes)


@pytest.mark.parametrize("style", ["clip", "siglip"])
def test_output_shapes_and_params(style):
    fields = CLIP if style == "clip" else SIGLIP
    model = ViT(**fields)
    params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), IMAGES))["params"]
    out = jax.eval_shape(
        functools.partial(model.apply, return_hidden_states=True), {"params": params}, IMAGES
    )
    tokens = PATCHES + (style == "clip")
    chex.assert_shape(out.features, (B, tokens, WIDTH))
    chex.assert_shape(out.pooled, (B, WIDTH))
    chex.assert_shape(out.hidden_states, (3, B, tokens, WIDTH))
    assert params["layers"]["mlp"]["fc1"]["kernel"].shape == (2, WIDTH, MLP)
    if style == "clip":
        assert {"class_embedding", "pre_layernorm"} <= set(params) and "head" not in params
        assert "bias" not in params["patch_embedding"]
    else:
        assert not {"class_embedding", "pre_layernorm"} & set(params)
        assert {"probe", "attention", "layernorm", "mlp"} == set(params["head"])
    none = ViT(**{**fields, "pool": "none"})
    assert jax.eval_shape(none.apply, {"params": params}, IMAGES).pooled is None


@pytest.mark.parametrize("scan_layers", [True, False])
def test_feature_layer_minus_two_equals_one_layer_fewer(scan_layers):
    fields = dict(CLIP, scan_layers=scan_layers, depth=3)
    deep = ViT(**fields, feature_layer=-2)
    params = _init(deep)
    out = _apply(deep)(params, IMAGES)
    # The same weights without the last layer, read at its last layer.
    if scan_layers:
        shallow_params = {**params, "layers": jax.tree.map(lambda a: a[:2], params["layers"])}
    else:
        shallow_params = {k: v for k, v in params.items() if k != "layers_2"}
    shallow = ViT(**{**fields, "depth": 2}, feature_layer=-1)
    chex.assert_trees_all_close(
        out.features, _apply(shallow)(shallow_params, IMAGES).features, atol=1e-5
    )
    # HF's hidden_states convention: index 0 = embeddings, k = after layer k.
    chex.assert_trees_all_close(out.features, out.hidden_states[-2], atol=1e-6)
    assert not np.allclose(out.features, out.hidden_states[-1])


def test_scanned_equals_unscanned():
    model = ViT(**{**SIGLIP, "depth": 3})
    params = _init(model)
    loop = ViT(**{**SIGLIP, "depth": 3, "scan_layers": False})
    loop_params = {k: v for k, v in params.items() if k != "layers"}
    loop_params.update(
        {f"layers_{i}": jax.tree.map(lambda a, i=i: a[i], params["layers"]) for i in range(3)}
    )
    chex.assert_trees_all_close(
        _apply(model)(params, IMAGES), _apply(loop)(loop_params, IMAGES), atol=1e-5
    )


# Parity with transformers (CLIP and SigLIP, through the importer): tests/importers/.


def test_build_encoder_from_config():
    model = build_encoder({"name": "vit", "checkpoint": "x", **CLIP, "dtype": "bfloat16"})
    assert isinstance(model, ViT) and model.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match=r"config.encoder.widht is not a field of ViT"):
        build_encoder({"name": "vit", **CLIP, "widht": 3})
    with pytest.raises(ValueError, match=r"known names: \['vit'\]"):
        build_encoder({"name": "resnet"})
