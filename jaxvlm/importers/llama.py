"""Llama-family LLMs (`model_type` llama — Vicuna, SmolLM2, TinyLlama — and qwen2) → `llms.llama.Llama`.

`architecture(hf_config)` derives our `config.llm` fields from `config.json`, supporting every field
that changes the math (`attention_bias` on q, k, v and o; Qwen2's q/k/v-only bias; `mlp_bias`;
`head_dim`; `rope_theta` and rope scaling none / linear / dynamic / llama3, read from transformers
5's `rope_parameters` or the older top-level `rope_theta` / `rope_scaling`; `tie_word_embeddings`;
`rms_norm_eps`; `hidden_act`) and refusing any other value with an error naming the field.
`convert(checkpoint, arch, scan_layers)` maps the tensors (the table below), one layer at a time.

HF keeps Linear weights as [out, in]; our Dense kernels are [in, out], attention projections
[D, H, Dh] / [H, Dh, D].
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from jaxvlm.importers.base import CheckpointImportError, HFCheckpoint, unsupported
from jaxvlm.llms.stack import merge_layers

MODEL_TYPES = ("llama", "qwen2")
# HF `hidden_act` → our activation name (layers/mlp.py ACTIVATIONS).
HIDDEN_ACTS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "relu": "relu",
}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
# Fields our config takes from config.json; the rest of `config.llm` (dtype, scan_layers, remat,
# implementation, num_added_embeddings, ...) stays the user's.
ARCHITECTURE_FIELDS = (
    "vocab_size",
    "dim",
    "depth",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "mlp_dim",
    "hidden_act",
    "tie_embeddings",
    "attention_bias",
    "qkv_bias",
    "mlp_bias",
    "rope_theta",
    "rope_scaling",
    "rms_norm_eps",
)


def _rope(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, our rope_scaling dict or None) from `rope_parameters` or the older fields."""
    parameters = hf.get("rope_parameters") or {}
    scaling = dict(hf.get("rope_scaling") or {})
    theta = parameters.get("rope_theta", hf.get("rope_theta", 10000.0))
    if parameters:
        scaling = {k: v for k, v in parameters.items() if k != "rope_theta"}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise unsupported("llama", "rope_type", kind, f"supported: {', '.join(ROPE_TYPES)}")
    if kind == "default":
        return float(theta), None
    scaling["rope_type"] = kind
    scaling.pop("type", None)
    if kind == "dynamic":  # HF's dynamic NTK starts from max_position_embeddings
        scaling.setdefault("original_max_position_embeddings", hf["max_position_embeddings"])
    return float(theta), scaling


def architecture(hf: dict) -> dict:
    """Our `config.llm` architecture fields from a Llama / Qwen2 `config.json` dict."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise unsupported("llama", "model_type", model_type, f"supported: {', '.join(MODEL_TYPES)}")
    act = hf.get("hidden_act", "silu")
    if act not in HIDDEN_ACTS:
        raise unsupported("llama", "hidden_act", act, f"supported: {', '.join(HIDDEN_ACTS)}")
    if model_type == "qwen2" and hf.get("use_sliding_window", False):
        raise unsupported(
            "llama", "use_sliding_window", True, "sliding-window attention is not implemented"
        )
    heads = int(hf["num_attention_heads"])
    theta, scaling = _rope(hf)
    return dict(
        vocab_size=int(hf["vocab_size"]),
        dim=int(hf["hidden_size"]),
        depth=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        mlp_dim=int(hf["intermediate_size"]),
        hidden_act=HIDDEN_ACTS[act],
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        qkv_bias=model_type == "qwen2",  # Qwen2: q, k, v biases, none on o
        mlp_bias=bool(hf.get("mlp_bias", False)),
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
    )


def convert(checkpoint: HFCheckpoint, arch: dict, component_config: Mapping) -> dict:
    """The Llama parameter tree (numpy leaves, stored dtypes) in the layout
    `component_config["scan_layers"]` selects."""
    heads, kv_heads, head_dim = arch["num_heads"], arch["num_kv_heads"], arch["head_dim"]
    qkv_bias = arch["attention_bias"] or arch["qkv_bias"]
    take = checkpoint.take

    def dense(key: str, bias: bool) -> dict:
        out = {"kernel": take(f"{key}.weight").T}
        if bias:
            out["bias"] = take(f"{key}.bias")
        return out

    def projection(key: str, num: int) -> dict:  # [H·Dh, D] → [D, H, Dh]
        out = {"kernel": take(f"{key}.weight").T.reshape(arch["dim"], num, head_dim)}
        if qkv_bias:
            out["bias"] = take(f"{key}.bias").reshape(num, head_dim)
        return out

    layers = []
    for i in range(arch["depth"]):
        p = f"model.layers.{i}."
        o_proj = {"kernel": take(p + "self_attn.o_proj.weight").T.reshape(heads, head_dim, -1)}
        if arch["attention_bias"]:
            o_proj["bias"] = take(p + "self_attn.o_proj.bias")
        layers.append(
            {
                "input_layernorm": {"scale": take(p + "input_layernorm.weight")},
                "post_attention_layernorm": {"scale": take(p + "post_attention_layernorm.weight")},
                "self_attn": {
                    "q_proj": projection(p + "self_attn.q_proj", heads),
                    "k_proj": projection(p + "self_attn.k_proj", kv_heads),
                    "v_proj": projection(p + "self_attn.v_proj", kv_heads),
                    "o_proj": o_proj,
                },
                "mlp": {
                    name: dense(p + f"mlp.{name}", arch["mlp_bias"])
                    for name in ("gate_proj", "up_proj", "down_proj")
                },
            }
        )
    other = {
        "embed_tokens": {"embedding": take("model.embed_tokens.weight")},
        "norm": {"scale": take("model.norm.weight")},
    }
    if not arch["tie_embeddings"]:
        other["lm_head"] = {"kernel": take("lm_head.weight").T}
    elif "lm_head.weight" in checkpoint:  # a tied checkpoint may store the shared matrix twice
        head = take("lm_head.weight")
        if not np.array_equal(head, other["embed_tokens"]["embedding"]):
            raise CheckpointImportError(
                f"{checkpoint.directory}: tie_word_embeddings is true but lm_head.weight differs "
                "from model.embed_tokens.weight"
            )
    return merge_layers(other, layers, scan_layers=component_config["scan_layers"])


# Buffers some checkpoints store that carry no parameters.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def ignored_keys(checkpoint: HFCheckpoint) -> list[str]:
    """Checkpoint keys allowed to stay unused (buffers)."""
    return [k for k in checkpoint.keys() if k.endswith(IGNORED_SUFFIXES)]
