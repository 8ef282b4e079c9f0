"""BERT checkpoints (`model_type` bert: bert-base, MiniLM such as all-MiniLM-L6-v2) →
`layers.bert.BertModel`, the text encoder a BLIP-2 Q-Former is initialised from.

`architecture(hf_config)` derives our fields from `config.json`, supporting every field that
changes the math — `hidden_act` (gelu, gelu_new / gelu_pytorch_tanh, relu), `layer_norm_eps`,
`type_vocab_size`, `max_position_embeddings` — and refusing the rest with an error naming the
field: `position_embedding_type` other than "absolute", `is_decoder` (a causal self-mask) and
`add_cross_attention` (a BERT decoder's cross-attention). Whether the model has a pooler is not in
config.json but in the weights: `has_pooler(checkpoint)`; `BertModel.pooler` is the user's field
(a pooler in the checkpoint that the model does not use is read and dropped, as CLIP's unused
`post_layernorm` is). `load(directory)` does the whole import with strict accounting.

The tensors sit under `bert.` in a checkpoint saved from a task model (`BertForMaskedLM`,
`BertForPreTraining`, ...) and under no prefix in a `BertModel`'s; the task heads (`IGNORED_HEADS`)
and the `position_ids` / `token_type_ids` buffers of older checkpoints are the only tensors allowed
to stay unused. Older checkpoints name LayerNorm parameters `gamma` / `beta`; both spellings are
read. HF keeps Linear weights as [out, in]; our Dense kernels are [in, out], attention projections
[D, H, Dh] / [H, Dh, D].
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from jaxvlm.importers.base import (
    CheckpointImportError,
    HFCheckpoint,
    check_filled,
    linear_kernel,
    unsupported,
)
from jaxvlm.llms.stack import merge_layers
from jaxvlm.param_paths import flatten_params, unflatten_params

MODEL_TYPES = ("bert",)
HIDDEN_ACTS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}
# Fields our config takes from config.json; `pooler`, `scan_layers`, `remat`, `implementation`,
# `dtype` and `param_dtype` stay the user's.
ARCHITECTURE_FIELDS = (
    "vocab_size",
    "dim",
    "depth",
    "num_heads",
    "mlp_dim",
    "max_positions",
    "type_vocab_size",
    "hidden_act",
    "layer_norm_eps",
)
# Per layer: our path (under `layers_{i}`) → the HF module under `{prefix}encoder.layer.{i}.`, and
# how its [out, in] weight becomes our kernel ("dense": transpose; "heads_in": [D, H, Dh];
# "heads_out": [H, Dh, D]); biases are copied (q/k/v biases as [H, Dh]).
LAYER_TABLE = {
    "self_attn/attention/q_proj": ("attention.self.query", "heads_in"),
    "self_attn/attention/k_proj": ("attention.self.key", "heads_in"),
    "self_attn/attention/v_proj": ("attention.self.value", "heads_in"),
    "self_attn/attention/o_proj": ("attention.output.dense", "heads_out"),
    "feed_forward/mlp/fc1": ("intermediate.dense", "dense"),
    "feed_forward/mlp/fc2": ("output.dense", "dense"),
}
LAYER_NORMS = {
    "self_attn/layer_norm": "attention.output.LayerNorm",
    "feed_forward/layer_norm": "output.LayerNorm",
}
# Outside the encoder: our path → the HF module under the prefix.
EMBEDDING_TABLE = {
    "embeddings/word_embeddings/embedding": "embeddings.word_embeddings.weight",
    "embeddings/position_embeddings/embedding": "embeddings.position_embeddings.weight",
    "embeddings/token_type_embeddings": "embeddings.token_type_embeddings.weight",
}
# Task heads of transformers' Bert* classes (MLM / LM head, NSP, classifiers, QA): never imported.
IGNORED_HEADS = ("cls.predictions.", "cls.seq_relationship.", "classifier.", "qa_outputs.")
IGNORED_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
MARKER = "embeddings.word_embeddings.weight"


def architecture(hf: dict) -> dict:
    """Our `BertModel` architecture fields from a BERT `config.json` dict."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise unsupported("bert", "model_type", model_type, f"supported: {', '.join(MODEL_TYPES)}")
    act = hf.get("hidden_act", "gelu")
    if act not in HIDDEN_ACTS:
        raise unsupported("bert", "hidden_act", act, f"supported: {', '.join(HIDDEN_ACTS)}")
    position_type = hf.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise unsupported(
            "bert", "position_embedding_type", position_type, "absolute positions only"
        )
    for field, why in (
        ("is_decoder", "a bidirectional encoder only; pass a causal mask to BertModel.encode"),
        ("add_cross_attention", "no cross-attention layers (the Q-Former adds its own)"),
    ):
        if hf.get(field, False):
            raise unsupported("bert", field, hf[field], why)
    dim, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    if dim % heads:
        raise unsupported(
            "bert", "num_attention_heads", heads, f"hidden_size={dim} must be a multiple of it"
        )
    return dict(
        vocab_size=int(hf["vocab_size"]),
        dim=dim,
        depth=int(hf["num_hidden_layers"]),
        num_heads=heads,
        mlp_dim=int(hf["intermediate_size"]),
        max_positions=int(hf.get("max_position_embeddings", 512)),
        type_vocab_size=int(hf.get("type_vocab_size", 2)),
        hidden_act=HIDDEN_ACTS[act],
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
    )


def bert_prefix(checkpoint: HFCheckpoint) -> str:
    """The key prefix of the BERT tensors: "" (a `BertModel`) or "bert." (a task model)."""
    found = sorted(k[: -len(MARKER)] for k in checkpoint.keys() if k.endswith(MARKER))
    if len(found) != 1:
        raise CheckpointImportError(
            f"{checkpoint.directory}: expected one BERT (a key ending in {MARKER}), found "
            f"{found or 'none'}"
        )
    return found[0]


def has_pooler(checkpoint: HFCheckpoint) -> bool:
    """Whether the checkpoint holds a pooler (`BertModel(add_pooling_layer=True)`)."""
    return f"{bert_prefix(checkpoint)}pooler.dense.weight" in checkpoint


def ignored_keys(checkpoint: HFCheckpoint) -> list[str]:
    """Keys allowed to stay unused: the task heads and the position / token-type buffers."""
    buffers = {bert_prefix(checkpoint) + name for name in IGNORED_BUFFERS}
    return [k for k in checkpoint.keys() if k.startswith(IGNORED_HEADS) or k in buffers]


def convert(checkpoint: HFCheckpoint, arch: dict, component_config: Mapping) -> dict:
    """The BertModel parameter tree (numpy leaves, stored dtypes) in the layout
    `component_config["scan_layers"]` selects (default True, as `BertModel`'s), with the pooler
    when `component_config["pooler"]` (default True)."""
    p = bert_prefix(checkpoint)
    heads = arch["num_heads"]
    head_dim = arch["dim"] // heads
    take = checkpoint.take

    def norm(path: str, key: str) -> dict:
        old = f"{key}.gamma" in checkpoint  # pre-2020 checkpoints: gamma / beta
        return {
            f"{path}/scale": take(f"{key}.gamma" if old else f"{key}.weight"),
            f"{path}/bias": take(f"{key}.beta" if old else f"{key}.bias"),
        }

    layers = []
    for i in range(arch["depth"]):
        prefix = f"{p}encoder.layer.{i}."
        layer = {}
        for path, (key, kind) in LAYER_TABLE.items():
            bias = take(prefix + key + ".bias")
            layer[f"{path}/kernel"] = linear_kernel(
                take(prefix + key + ".weight"), kind, heads, head_dim
            )
            layer[f"{path}/bias"] = bias.reshape(heads, head_dim) if kind == "heads_in" else bias
        for path, key in LAYER_NORMS.items():
            layer.update(norm(path, prefix + key))
        layers.append(unflatten_params(layer))
    other = {path: take(p + key) for path, key in EMBEDDING_TABLE.items()}
    other.update(norm("embeddings/layer_norm", f"{p}embeddings.LayerNorm"))
    pooler = component_config["pooler"] if "pooler" in component_config else True
    if pooler or has_pooler(checkpoint):
        dense = {
            "pooler_dense/kernel": take(f"{p}pooler.dense.weight").T,
            "pooler_dense/bias": take(f"{p}pooler.dense.bias"),
        }
        if pooler:
            other.update(dense)
    scan_layers = component_config["scan_layers"] if "scan_layers" in component_config else True
    return merge_layers(unflatten_params(other), layers, scan_layers=scan_layers)


def load(directory: str | Path, *, scan_layers: bool = True, pooler: bool | None = None):
    """Imports a BERT directory: (our `BertModel` fields, its parameter tree of numpy arrays).

    `pooler` None: the checkpoint's (`has_pooler`). Fails listing every checkpoint tensor left
    unused (other than `ignored_keys`) and every parameter left unfilled or mis-shaped.
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jaxvlm.layers.bert import BertModel

    checkpoint = HFCheckpoint(directory)
    arch = architecture(checkpoint.hf_config)
    pooler = has_pooler(checkpoint) if pooler is None else pooler
    fields = {**arch, "pooler": pooler, "scan_layers": scan_layers}
    params = convert(checkpoint, arch, fields)
    checkpoint.finish(ignored=ignored_keys(checkpoint))
    init = BertModel(**fields).init
    expected = jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    check_filled(directory, flatten_params(params), flatten_params(nn.unbox(expected)))
    return fields, params
