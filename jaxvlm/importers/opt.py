"""OPT LLMs (`model_type` opt: OPT-125m … 66b, OPT-350m's post-LN variant) → `llms.opt.Opt`.

`architecture(hf_config)` derives our `config.llm` fields from `config.json`, supporting every field
that changes the math — `do_layer_norm_before` (pre-LN or OPT-350m's post-LN), `_remove_final_layer_norm`
(old fine-tuned checkpoints), `word_embed_proj_dim` ≠ `hidden_size` (`project_in`/`project_out`),
`enable_bias`, `layer_norm_elementwise_affine`, `activation_function`, `tie_word_embeddings`,
`max_position_embeddings` — and refusing any other value with an error naming the field.
`convert(checkpoint, arch, component_config)` maps the tensors (the table below), one layer at a time.

HF keeps Linear weights as [out, in]; our Dense kernels are [in, out], attention projections
[D, H, Dh] / [H, Dh, D]. The position table is copied whole, its two offset rows included.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from jaxvlm.importers.base import CheckpointImportError, HFCheckpoint, linear_kernel, unsupported
from jaxvlm.importers.llama import HIDDEN_ACTS
from jaxvlm.llms.stack import merge_layers

MODEL_TYPES = ("opt",)
# Fields our config takes from config.json; the rest of `config.llm` (dtype, scan_layers, remat,
# implementation, num_added_embeddings, ...) stays the user's.
ARCHITECTURE_FIELDS = (
    "vocab_size",
    "dim",
    "layer_dim",
    "depth",
    "num_heads",
    "mlp_dim",
    "max_positions",
    "hidden_act",
    "pre_layer_norm",
    "final_norm",
    "use_bias",
    "norm_affine",
    "tie_embeddings",
)
# Per layer: our path (under `layers_{i}`) → the HF tensor under `model.decoder.layers.{i}.`, and
# how the [out, in] weight becomes our kernel ("dense": transpose; "heads_in": [D, H, Dh];
# "heads_out": [H, Dh, D]). Biases and norm parameters are copied (q/k/v biases as [H, Dh]).
LAYER_TABLE = {
    "self_attn/q_proj": ("self_attn.q_proj", "heads_in"),
    "self_attn/k_proj": ("self_attn.k_proj", "heads_in"),
    "self_attn/v_proj": ("self_attn.v_proj", "heads_in"),
    "self_attn/o_proj": ("self_attn.out_proj", "heads_out"),
    "mlp/fc1": ("fc1", "dense"),
    "mlp/fc2": ("fc2", "dense"),
}
LAYER_NORMS = ("self_attn_layer_norm", "final_layer_norm")


def architecture(hf: dict) -> dict:
    """Our `config.llm` architecture fields from an OPT `config.json` dict."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise unsupported("opt", "model_type", model_type, f"supported: {', '.join(MODEL_TYPES)}")
    act = hf.get("activation_function", "relu")
    if act not in HIDDEN_ACTS:
        raise unsupported("opt", "activation_function", act, f"supported: {', '.join(HIDDEN_ACTS)}")
    dim = int(hf["hidden_size"])
    heads = int(hf["num_attention_heads"])
    if dim % heads:
        raise unsupported(
            "opt", "num_attention_heads", heads, f"hidden_size={dim} must be a multiple of it"
        )
    # transformers' OPTDecoder ignores `layerdrop` and dropout in eval; nothing else changes the math.
    pre_layer_norm = bool(hf.get("do_layer_norm_before", True))
    word_dim = int(hf.get("word_embed_proj_dim") or dim)
    return dict(
        vocab_size=int(hf["vocab_size"]),
        dim=word_dim,
        layer_dim=dim,
        depth=int(hf["num_hidden_layers"]),
        num_heads=heads,
        mlp_dim=int(hf["ffn_dim"]),
        max_positions=int(hf.get("max_position_embeddings", 2048)),
        hidden_act=HIDDEN_ACTS[act],
        pre_layer_norm=pre_layer_norm,
        final_norm=pre_layer_norm and not hf.get("_remove_final_layer_norm", False),
        use_bias=bool(hf.get("enable_bias", True)),
        norm_affine=bool(hf.get("layer_norm_elementwise_affine", True)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def convert(checkpoint: HFCheckpoint, arch: dict, component_config: Mapping) -> dict:
    """The Opt parameter tree (numpy leaves, stored dtypes) in the layout
    `component_config["scan_layers"]` selects (default True, as `Opt`'s)."""
    heads = arch["num_heads"]
    head_dim = arch["layer_dim"] // heads
    take = checkpoint.take

    def norm(key: str) -> dict:
        if not arch["norm_affine"]:
            return {}
        return {"scale": take(f"{key}.weight"), "bias": take(f"{key}.bias")}

    layers = []
    for i in range(arch["depth"]):
        prefix = f"model.decoder.layers.{i}."
        layer: dict = {}
        for path, (key, kind) in LAYER_TABLE.items():
            entry = {"kernel": linear_kernel(take(prefix + key + ".weight"), kind, heads, head_dim)}
            if arch["use_bias"]:
                bias = take(prefix + key + ".bias")
                entry["bias"] = bias.reshape(heads, head_dim) if kind == "heads_in" else bias
            module, name = path.split("/")
            layer.setdefault(module, {})[name] = entry
        if arch["norm_affine"]:
            layer.update({name: norm(prefix + name) for name in LAYER_NORMS})
        layers.append(layer)
    other = {
        "embed_tokens": {"embedding": take("model.decoder.embed_tokens.weight")},
        "embed_positions": {"embedding": take("model.decoder.embed_positions.weight")},
    }
    if arch["dim"] != arch["layer_dim"]:
        other["project_in"] = {"kernel": take("model.decoder.project_in.weight").T}
        other["project_out"] = {"kernel": take("model.decoder.project_out.weight").T}
    if arch["final_norm"] and arch["norm_affine"]:
        other["final_layer_norm"] = norm("model.decoder.final_layer_norm")
    if not arch["tie_embeddings"]:
        other["lm_head"] = {"kernel": take("lm_head.weight").T}
    elif "lm_head.weight" in checkpoint:  # a tied checkpoint may store the shared matrix twice
        head = take("lm_head.weight")
        if not np.array_equal(head, other["embed_tokens"]["embedding"]):
            raise CheckpointImportError(
                f"{checkpoint.directory}: tie_word_embeddings is true but lm_head.weight differs "
                "from model.decoder.embed_tokens.weight"
            )
    return merge_layers(other, layers, scan_layers=component_config.get("scan_layers", True))


def ignored_keys(checkpoint: HFCheckpoint) -> list[str]:
    """Checkpoint keys allowed to stay unused: none (OPT stores no buffers)."""
    del checkpoint
    return []
