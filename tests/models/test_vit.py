"""ViT: CLIP and SigLIP forms, feature-layer selection, scan vs loop, HF parity, build_encoder."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

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


def _np(t):
    return t.detach().numpy().astype(np.float32)


def _hf_encoder_layers(hf_layers, heads):
    """HF CLIP/SigLIP encoder layers → our stacked `layers` (the importer's table, written out)."""
    head_dim = WIDTH // heads
    layers = []
    for layer in hf_layers:
        attn = layer.self_attn
        proj = lambda m: {
            "kernel": _np(m.weight).T.reshape(WIDTH, heads, head_dim),
            "bias": _np(m.bias).reshape(heads, head_dim),
        }
        layers.append(
            {
                "layer_norm1": {
                    "scale": _np(layer.layer_norm1.weight),
                    "bias": _np(layer.layer_norm1.bias),
                },
                "layer_norm2": {
                    "scale": _np(layer.layer_norm2.weight),
                    "bias": _np(layer.layer_norm2.bias),
                },
                "self_attn": {
                    "q_proj": proj(attn.q_proj),
                    "k_proj": proj(attn.k_proj),
                    "v_proj": proj(attn.v_proj),
                    "o_proj": {
                        "kernel": _np(attn.out_proj.weight).T.reshape(heads, head_dim, WIDTH),
                        "bias": _np(attn.out_proj.bias),
                    },
                },
                "mlp": {
                    name: {
                        "kernel": _np(getattr(layer.mlp, name).weight).T,
                        "bias": _np(getattr(layer.mlp, name).bias),
                    }
                    for name in ("fc1", "fc2")
                },
            }
        )
    return jax.tree.map(lambda *a: np.stack(a), *layers)


def _norm(m):
    return {"scale": _np(m.weight), "bias": _np(m.bias)}


def _perturb_(hf_model):
    """Random biases and norm scales, so a missing one cannot pass by accident."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))


def _close(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_parity_with_clip_vision_model():
    import transformers

    config = transformers.CLIPVisionConfig(
        hidden_size=WIDTH,
        intermediate_size=MLP,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        image_size=SIZE,
        patch_size=PATCH,
        hidden_act="quick_gelu",
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    hf = transformers.CLIPVisionModel(config).eval()
    _perturb_(hf)
    vm = getattr(hf, "vision_model", hf)  # transformers 5 flattens the wrapper
    emb = vm.embeddings
    params = {
        "patch_embedding": {"kernel": _np(emb.patch_embedding.weight).transpose(2, 3, 1, 0)},
        "class_embedding": _np(emb.class_embedding),
        "position_embedding": _np(emb.position_embedding.weight),
        "pre_layernorm": _norm(vm.pre_layrnorm),
        "layers": _hf_encoder_layers(vm.encoder.layers, HEADS),
        "post_layernorm": _norm(vm.post_layernorm),
    }
    model = ViT(**CLIP, feature_layer=-2)
    assert jax.tree.structure(params) == jax.tree.structure(
        nn.unbox(jax.eval_shape(model.init, jax.random.key(0), IMAGES))["params"]
    )
    with torch.no_grad():
        ref = hf(torch.tensor(np.asarray(IMAGES).transpose(0, 3, 1, 2)), output_hidden_states=True)
    with jax.default_matmul_precision("highest"):
        out = _apply(model)(params, IMAGES)
    _close(out.features, ref.hidden_states[-2])  # LLaVA's vision_feature_layer=-2
    _close(out.hidden_states, np.stack([_np(h) for h in ref.hidden_states]))
    _close(out.pooled, ref.pooler_output)


def test_parity_with_siglip_vision_model():
    import transformers

    config = transformers.SiglipVisionConfig(
        hidden_size=WIDTH,
        intermediate_size=MLP,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        image_size=SIZE,
        patch_size=PATCH,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    hf = transformers.SiglipVisionModel(config).eval()
    _perturb_(hf)
    vm = getattr(hf, "vision_model", hf)  # transformers 5 flattens the wrapper
    emb, head = vm.embeddings, vm.head
    in_w, in_b = _np(head.attention.in_proj_weight), _np(head.attention.in_proj_bias)
    head_dim = WIDTH // HEADS
    head_proj = lambda i: {
        "kernel": in_w[i * WIDTH : (i + 1) * WIDTH].T.reshape(WIDTH, HEADS, head_dim),
        "bias": in_b[i * WIDTH : (i + 1) * WIDTH].reshape(HEADS, head_dim),
    }
    params = {
        "patch_embedding": {
            "kernel": _np(emb.patch_embedding.weight).transpose(2, 3, 1, 0),
            "bias": _np(emb.patch_embedding.bias),
        },
        "position_embedding": _np(emb.position_embedding.weight),
        "layers": _hf_encoder_layers(vm.encoder.layers, HEADS),
        "post_layernorm": _norm(vm.post_layernorm),
        "head": {
            "probe": _np(head.probe)[0],
            "attention": {
                "q_proj": head_proj(0),
                "k_proj": head_proj(1),
                "v_proj": head_proj(2),
                "o_proj": {
                    "kernel": _np(head.attention.out_proj.weight).T.reshape(HEADS, head_dim, WIDTH),
                    "bias": _np(head.attention.out_proj.bias),
                },
            },
            "layernorm": _norm(head.layernorm),
            "mlp": {
                name: {
                    "kernel": _np(getattr(head.mlp, name).weight).T,
                    "bias": _np(getattr(head.mlp, name).bias),
                }
                for name in ("fc1", "fc2")
            },
        },
    }
    model = ViT(**SIGLIP, feature_norm=True)  # features = SigLIP's last_hidden_state (PaliGemma)
    with torch.no_grad():
        ref = hf(torch.tensor(np.asarray(IMAGES).transpose(0, 3, 1, 2)), output_hidden_states=True)
    with jax.default_matmul_precision("highest"):
        out = _apply(model)(params, IMAGES)
    _close(out.features, ref.last_hidden_state)
    _close(out.hidden_states[-1], ref.hidden_states[-1])
    _close(out.pooled, ref.pooler_output)


def test_build_encoder_from_config():
    model = build_encoder({"name": "vit", "checkpoint": "x", **CLIP, "dtype": "bfloat16"})
    assert isinstance(model, ViT) and model.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match=r"config.encoder.widht is not a field of ViT"):
        build_encoder({"name": "vit", **CLIP, "widht": 3})
    with pytest.raises(ValueError, match=r"known names: \['vit'\]"):
        build_encoder({"name": "resnet"})
