"""CLIP and SigLIP vision towers (`model_type` clip_vision_model / clip, siglip_vision_model / siglip)
→ `encoders.vit.ViT`.

A full CLIP / SigLIP directory (both towers) imports its vision tower; the text tower's tensors are
the only ones allowed to stay unused. The vision tensors are found under whatever prefix the
checkpoint uses (`vision_model.`, or none for a transformers 5 `CLIPVisionModel`).

Supported fields that change the math: `hidden_act` (quick_gelu, gelu, gelu_pytorch_tanh),
`layer_norm_eps`, SigLIP's `vision_use_head` (attention-pooling head, or none); `num_channels`
must be 3. `feature_layer` / `feature_norm` stay the user's (they choose which hidden state a
bridge reads, not the weights).
"""

from __future__ import annotations

from collections.abc import Mapping

from jaxvlm.importers.base import CheckpointImportError, HFCheckpoint, unsupported
from jaxvlm.llms.stack import merge_layers

MODEL_TYPES = ("clip_vision_model", "clip", "siglip_vision_model", "siglip")
HIDDEN_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}
ARCHITECTURE_FIELDS = (
    "image_size",
    "patch_size",
    "width",
    "depth",
    "num_heads",
    "mlp_dim",
    "activation",
    "class_token",
    "pre_norm",
    "post_norm",
    "patch_bias",
    "pool",
    "norm_eps",
)
IGNORED_SUFFIXES = ("position_ids",)


def _vision_config(hf: dict) -> tuple[dict, bool]:
    """(the vision tower's config, whether it is SigLIP)."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise unsupported("clip", "model_type", model_type, f"supported: {', '.join(MODEL_TYPES)}")
    vision = hf["vision_config"] if model_type in ("clip", "siglip") else hf
    return vision, model_type.startswith("siglip")


def architecture(hf: dict) -> dict:
    """Our `config.encoder` architecture fields from a CLIP / SigLIP `config.json` dict."""
    vision, siglip = _vision_config(hf)
    act = vision.get("hidden_act", "gelu_pytorch_tanh" if siglip else "quick_gelu")
    if act not in HIDDEN_ACTS:
        raise unsupported("clip", "hidden_act", act, f"supported: {', '.join(HIDDEN_ACTS)}")
    if vision.get("num_channels", 3) != 3:
        raise unsupported("clip", "num_channels", vision["num_channels"], "RGB images only")
    return dict(
        image_size=int(vision["image_size"]),
        patch_size=int(vision["patch_size"]),
        width=int(vision["hidden_size"]),
        depth=int(vision["num_hidden_layers"]),
        num_heads=int(vision["num_attention_heads"]),
        mlp_dim=int(vision["intermediate_size"]),
        activation=HIDDEN_ACTS[act],
        class_token=not siglip,
        pre_norm=not siglip,
        post_norm=True,
        patch_bias=siglip,
        pool=("map" if vision.get("vision_use_head", True) else "none") if siglip else "cls",
        norm_eps=float(vision.get("layer_norm_eps", 1e-6 if siglip else 1e-5)),
    )


def vision_prefix(checkpoint: HFCheckpoint) -> str:
    """The key prefix of the vision tower ("" or e.g. "vision_model.")."""
    marker = "embeddings.patch_embedding.weight"
    found = sorted(k[: -len(marker)] for k in checkpoint.keys() if k.endswith(marker))
    vision = [p for p in found if "text" not in p]
    if len(vision) != 1:
        raise CheckpointImportError(
            f"{checkpoint.directory}: expected one vision tower (a key ending in {marker}), found "
            f"{found or 'none'}"
        )
    return vision[0]


def ignored_keys(checkpoint: HFCheckpoint) -> list[str]:
    """Keys allowed to stay unused: buffers, and every tensor outside the vision tower."""
    prefix = vision_prefix(checkpoint)
    return [
        k for k in checkpoint.keys() if k.endswith(IGNORED_SUFFIXES) or not k.startswith(prefix)
    ]


def convert(checkpoint: HFCheckpoint, arch: dict, component_config: Mapping) -> dict:
    """The ViT parameter tree (numpy leaves) in the layout `component_config["scan_layers"]`
    selects. `post_layernorm` is left out when the configured model never applies it (no pooling
    and `feature_norm` False): it is then the one tensor pair read and not imported."""
    p = vision_prefix(checkpoint)
    take = checkpoint.take
    width, heads = arch["width"], arch["num_heads"]
    head_dim = width // heads

    def norm(key):
        return {"scale": take(f"{key}.weight"), "bias": take(f"{key}.bias")}

    def dense(key):
        return {"kernel": take(f"{key}.weight").T, "bias": take(f"{key}.bias")}

    def projection(weight, bias):  # [H·Dh, D] → [D, H, Dh]
        return {
            "kernel": weight.T.reshape(width, heads, head_dim),
            "bias": bias.reshape(heads, head_dim),
        }

    def out_projection(key):
        return {
            "kernel": take(f"{key}.weight").T.reshape(heads, head_dim, width),
            "bias": take(f"{key}.bias"),
        }

    layers = []
    for i in range(arch["depth"]):
        q = f"{p}encoder.layers.{i}."
        attn = {
            name: projection(take(f"{q}self_attn.{name}.weight"), take(f"{q}self_attn.{name}.bias"))
            for name in ("q_proj", "k_proj", "v_proj")
        }
        attn["o_proj"] = out_projection(f"{q}self_attn.out_proj")
        layers.append(
            {
                "layer_norm1": norm(f"{q}layer_norm1"),
                "layer_norm2": norm(f"{q}layer_norm2"),
                "self_attn": attn,
                "mlp": {name: dense(f"{q}mlp.{name}") for name in ("fc1", "fc2")},
            }
        )
    patch = {"kernel": take(f"{p}embeddings.patch_embedding.weight").transpose(2, 3, 1, 0)}
    if arch["patch_bias"]:
        patch["bias"] = take(f"{p}embeddings.patch_embedding.bias")
    other = {
        "patch_embedding": patch,
        "position_embedding": take(f"{p}embeddings.position_embedding.weight"),
    }
    post_layernorm = norm(f"{p}post_layernorm")
    feature_norm = "feature_norm" in component_config and component_config["feature_norm"]
    if arch["pool"] != "none" or feature_norm:
        other["post_layernorm"] = post_layernorm
    if arch["class_token"]:
        other["class_embedding"] = take(f"{p}embeddings.class_embedding")
    if arch["pre_norm"]:
        other["pre_layernorm"] = norm(f"{p}pre_layrnorm")  # sic: HF's CLIP spelling
    if arch["pool"] == "map":
        h = f"{p}head."
        in_w, in_b = take(f"{h}attention.in_proj_weight"), take(f"{h}attention.in_proj_bias")
        other["head"] = {
            "probe": take(f"{h}probe")[0],
            "attention": {
                name: projection(
                    in_w[j * width : (j + 1) * width], in_b[j * width : (j + 1) * width]
                )
                for j, name in enumerate(("q_proj", "k_proj", "v_proj"))
            }
            | {"o_proj": out_projection(f"{h}attention.out_proj")},
            "layernorm": norm(f"{h}layernorm"),
            "mlp": {name: dense(f"{h}mlp.{name}") for name in ("fc1", "fc2")},
        }
    return merge_layers(other, layers, scan_layers=component_config["scan_layers"])
