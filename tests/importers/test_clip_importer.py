"""CLIP / SigLIP vision import from saved Hugging Face directories: hidden states, features and pooled
output equal to transformers'; a full two-tower directory imports its vision tower only."""

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch

from jaxvlm import importers
from jaxvlm.encoders.vit import ViT
from jaxvlm.importers import CheckpointImportError
from jaxvlm.param_paths import flatten_params, unflatten_params

B, SIZE, PATCH = 2, 16, 4
TOWER = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=SIZE,
    patch_size=PATCH,
    attn_implementation="eager",
)
# (family, vision config kwargs, scan_layers): two configurations per family.
CONFIGS = {
    "clip_quick_gelu": ("clip", dict(hidden_act="quick_gelu"), True),
    "clip_gelu_eps": ("clip", dict(hidden_act="gelu", layer_norm_eps=1e-3), False),
    "siglip_head": ("siglip", dict(), True),
    "siglip_no_head": ("siglip", dict(vision_use_head=False, layer_norm_eps=1e-5), False),
}


def _perturbed(model):
    torch.manual_seed(1)
    with torch.no_grad():  # random biases and norm scales: a missed one cannot pass by accident
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _vision_model(family, kwargs):
    import transformers

    config_class, model_class = {
        "clip": (transformers.CLIPVisionConfig, transformers.CLIPVisionModel),
        "siglip": (transformers.SiglipVisionConfig, transformers.SiglipVisionModel),
    }[family]
    torch.manual_seed(0)
    return _perturbed(model_class(config_class(**TOWER, **kwargs)))


def _import(directory, scan_layers):
    arch = importers.architecture("encoder", directory)
    model = ViT(**arch, scan_layers=scan_layers)
    images = np.zeros((1, SIZE, SIZE, 3), np.float32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    expected = {f"encoder/{k}": v for k, v in flatten_params(nn.unbox(boxed)).items()}
    component = {**arch, "scan_layers": scan_layers, "feature_norm": False}
    loaded = importers.load_component("encoder", directory, component, expected)
    return model, unflatten_params({k[len("encoder/") :]: v for k, v in loaded.items()})


def _close(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_outputs_match_transformers(name, tmp_path):
    family, kwargs, scan_layers = CONFIGS[name]
    hf = _vision_model(family, kwargs)
    hf.save_pretrained(tmp_path)
    model, params = _import(tmp_path, scan_layers)
    images = np.asarray(jax.random.normal(jax.random.key(0), (B, SIZE, SIZE, 3)), np.float32)
    with torch.no_grad():
        ref = hf(torch.tensor(images.transpose(0, 3, 1, 2)), output_hidden_states=True)
    with jax.default_matmul_precision("highest"):
        out = model.apply({"params": params}, images, return_hidden_states=True)
    _close(out.hidden_states, np.stack([h.numpy() for h in ref.hidden_states]))
    _close(out.features, ref.hidden_states[-1])  # feature_layer=-1, no feature_norm
    if ref.pooler_output is not None:
        _close(out.pooled, ref.pooler_output)
    else:
        assert out.pooled is None
    # What bridges read: LLaVA's layer before the last (CLIP); SigLIP's last_hidden_state (PaliGemma).
    if family == "clip":
        chosen, expected = model.clone(feature_layer=-2), ref.hidden_states[-2]
    elif model.pool != "none":
        chosen, expected = model.clone(feature_norm=True), ref.last_hidden_state
    else:
        return
    with jax.default_matmul_precision("highest"):
        _close(chosen.apply({"params": params}, images).features, expected)


def test_a_two_tower_clip_directory_imports_its_vision_tower(tmp_path):
    import transformers

    config = transformers.CLIPConfig(
        vision_config=dict(TOWER, hidden_act="quick_gelu"),
        text_config=dict(
            hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    clip = _perturbed(transformers.CLIPModel(config))
    clip.save_pretrained(tmp_path)
    model, params = _import(tmp_path, scan_layers=True)
    images = np.asarray(jax.random.normal(jax.random.key(2), (B, SIZE, SIZE, 3)), np.float32)
    with torch.no_grad():
        ref = clip.vision_model(torch.tensor(images.transpose(0, 3, 1, 2)))
    with jax.default_matmul_precision("highest"):
        out = model.apply({"params": params}, images)
    _close(out.pooled, ref.pooler_output)


def test_a_non_rgb_tower_is_refused(tmp_path):
    import transformers

    transformers.CLIPVisionModel(
        transformers.CLIPVisionConfig(**TOWER, num_channels=1)
    ).save_pretrained(tmp_path)
    with pytest.raises(CheckpointImportError, match=r"num_channels=1.*RGB"):
        importers.architecture("encoder", tmp_path)
    with pytest.raises(
        CheckpointImportError, match=r"'clip_vision_model' cannot be imported as config.llm"
    ):
        importers.architecture("llm", tmp_path)
