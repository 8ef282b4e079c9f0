"""What is specific to the LLaVA projector: the maths by hand, the class token, the errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvlm.bridges import build_bridge

VISION_DIM, LLM_DIM = 6, 8


def _apply(projector: str, features, drop_class_token: bool = False):
    cfg = {"name": "mlp_projector", "projector": projector, "drop_class_token": drop_class_token}
    bridge = build_bridge(cfg, vision_dim=VISION_DIM, llm_dim=LLM_DIM)
    mask = jnp.ones(features.shape[:2], bool)
    variables = bridge.init(jax.random.key(0), features, image_mask=mask, text=None, train=False)
    params = jax.tree.map(
        lambda p: np.asarray(p.value, np.float64),
        variables["params"],
        is_leaf=lambda p: hasattr(p, "value"),
    )
    out = bridge.apply(variables, features, image_mask=mask, text=None, train=False)
    return params, np.asarray(out.tokens, np.float64)


def _features(patches: int = 3, frames: int = 1):
    return jax.random.normal(jax.random.key(1), (1, 2, frames, patches, VISION_DIM), jnp.float32)


def test_linear_is_affine():
    features = _features(frames=2)
    params, tokens = _apply("linear", features)
    assert set(params) == {"linear_1"}
    x = np.asarray(features, np.float64).reshape(1, 2, 2 * 3, VISION_DIM)  # frames → tokens
    expected = x @ params["linear_1"]["kernel"] + params["linear_1"]["bias"]
    np.testing.assert_allclose(tokens, expected, rtol=1e-5, atol=1e-5)


def test_mlp2x_gelu_matches_numpy():
    features = _features()
    params, tokens = _apply("mlp2x_gelu", features)
    x = np.asarray(features, np.float64).reshape(1, 2, 3, VISION_DIM)
    hidden = x @ params["linear_1"]["kernel"] + params["linear_1"]["bias"]
    hidden = (
        0.5 * hidden * (1 + np.vectorize(math.erf)(hidden / math.sqrt(2)))
    )  # exact GELU, as HF "gelu"
    expected = hidden @ params["linear_2"]["kernel"] + params["linear_2"]["bias"]
    np.testing.assert_allclose(tokens, expected, rtol=1e-5, atol=1e-5)


def test_class_token_dropped():
    features = _features(patches=4, frames=2)
    _, with_cls = _apply("linear", features, drop_class_token=False)
    _, without = _apply("linear", features, drop_class_token=True)
    assert with_cls.shape == (1, 2, 8, LLM_DIM)
    assert without.shape == (1, 2, 6, LLM_DIM)
    # Frame f keeps patches 1..3; the same params (same init key) give the same tokens.
    kept = with_cls.reshape(1, 2, 2, 4, LLM_DIM)[:, :, :, 1:].reshape(1, 2, 6, LLM_DIM)
    np.testing.assert_allclose(without, kept, rtol=1e-6, atol=1e-6)


def test_bad_projector_names_the_key():
    with pytest.raises(ValueError, match=r"config\.bridge\.projector='mlp3x'.*linear"):
        build_bridge({"name": "mlp_projector", "projector": "mlp3x"}, vision_dim=4, llm_dim=8)


def test_misspelt_field_names_the_key():
    with pytest.raises(ValueError, match=r"config\.bridge\.projecter is not a field of Bridge"):
        build_bridge({"name": "mlp_projector", "projecter": "linear"}, vision_dim=4, llm_dim=8)


def test_unknown_bridge_lists_names():
    with pytest.raises(ValueError, match=r"config\.bridge\.name='qformr'.*mlp_projector"):
        build_bridge({"name": "qformr"}, vision_dim=4, llm_dim=8)
