"""T5 / FlanT5 (`model_type` t5) → `llms.t5.T5`.

`architecture(hf_config)` derives our `config.llm` fields from `config.json`: `d_model`, `d_kv`
(a head size that need not be d_model / num_heads), `d_ff`, `num_layers`, `num_decoder_layers`,
`num_heads`, the relative-attention buckets and maximum distance, `layer_norm_epsilon`,
`feed_forward_proj` (`relu` or `gated-gelu`; anything else is refused by name) and the head. It
refuses a config that is not an encoder-decoder (`is_encoder_decoder=false`, `is_decoder=true`).

The head, as transformers 5.23 decides it:
  - the decoder output is scaled by d_model**-0.5 when `scale_decoder_outputs` (written by
    transformers 5) or, in older files, `tie_word_embeddings` (default true) says so;
  - transformers 5 writes `tie_word_embeddings: true` for every T5 and ties `lm_head` to `shared`
    exactly when the checkpoint has no distinct `lm_head.weight`. So an older config's
    `tie_word_embeddings` decides (FlanT5: false, with `lm_head.weight`), and in a transformers-5
    config the head is untied when the outputs are not scaled (T5 v1.1 / FlanT5); an untied
    head missing from the checkpoint is a copy of `shared.weight`, as transformers loads it.

Tensors (HF Linear weights are [out, in]; ours [in, out], attention [D, H, Dh] / [H, Dh, D]):
  shared.weight                                         → shared/embedding
  {encoder,decoder}.embed_tokens.weight                 → (copies of shared: must be equal)
  lm_head.weight                                        → lm_head/kernel (untied; tied: must equal)
  {stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight
                                                        → {stack}/relative_attention_bias/embedding
  {stack}.block.N.layer.0.SelfAttention.{q,k,v,o}       → {stack}/layers…/self_attn/{q,k,v,o}_proj
  {stack}.block.N.layer.0.layer_norm                    → …/self_attn_norm
  decoder.block.N.layer.1.EncDecAttention.{q,k,v,o}     → decoder/layers…/cross_attn/{q,k,v,o}_proj
  decoder.block.N.layer.1.layer_norm                    → …/cross_attn_norm
  {stack}.block.N.layer.{1 enc, 2 dec}.DenseReluDense.{wi | wi_0, wi_1}, wo
                                                        → …/mlp/{fc1 | gate_proj, up_proj}, fc2 | down_proj
  {stack}.block.N.layer.{1, 2}.layer_norm               → …/mlp_norm
  {stack}.final_layer_norm.weight                       → {stack}/final_layer_norm/scale
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from jaxvlm.importers.base import CheckpointImportError, HFCheckpoint, unsupported
from jaxvlm.llms.stack import merge_layers

MODEL_TYPES = ("t5",)
# HF `feed_forward_proj` → (our hidden_act, gated_mlp). "gated-gelu" means gelu_new (tanh).
FEED_FORWARD = {"relu": ("relu", False), "gated-gelu": ("gelu_tanh", True)}
# Fields our config takes from config.json; the rest of `config.llm` (dtype, param_dtype,
# scan_layers, remat, implementation, num_added_embeddings) stays the user's.
ARCHITECTURE_FIELDS = (
    "vocab_size",
    "dim",
    "depth",
    "decoder_depth",
    "num_heads",
    "head_dim",
    "mlp_dim",
    "hidden_act",
    "gated_mlp",
    "tie_embeddings",
    "scale_decoder_outputs",
    "relative_attention_num_buckets",
    "relative_attention_max_distance",
    "rms_norm_eps",
)
# transformers drops this one when loading (`_keys_to_ignore_on_load_unexpected`): old checkpoints
# kept a relative-bias table on the decoder's first cross-attention, which T5 never uses.
IGNORED_KEYS = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


def architecture(hf: dict) -> dict:
    """Our `config.llm` architecture fields from a T5 `config.json` dict."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise unsupported("t5", "model_type", model_type, f"supported: {', '.join(MODEL_TYPES)}")
    if not hf.get("is_encoder_decoder", True):
        raise unsupported("t5", "is_encoder_decoder", False, "only the encoder-decoder model")
    if hf.get("is_decoder", False):
        raise unsupported("t5", "is_decoder", True, "only the encoder-decoder model")
    feed_forward = hf.get("feed_forward_proj", "relu")
    if feed_forward not in FEED_FORWARD:
        raise unsupported(
            "t5", "feed_forward_proj", feed_forward, f"supported: {', '.join(FEED_FORWARD)}"
        )
    hidden_act, gated = FEED_FORWARD[feed_forward]
    tied = bool(hf.get("tie_word_embeddings", True))
    if "scale_decoder_outputs" in hf:  # transformers 5: tie_word_embeddings is always true
        scaled = bool(hf["scale_decoder_outputs"])
        tied = scaled
    else:
        scaled = tied
    layers = int(hf.get("num_layers", 6))
    decoder_layers = hf.get("num_decoder_layers")
    return dict(
        vocab_size=int(hf["vocab_size"]),
        dim=int(hf["d_model"]),
        depth=layers,
        decoder_depth=layers if decoder_layers is None else int(decoder_layers),
        num_heads=int(hf["num_heads"]),
        head_dim=int(hf["d_kv"]),
        mlp_dim=int(hf["d_ff"]),
        hidden_act=hidden_act,
        gated_mlp=gated,
        tie_embeddings=tied,
        scale_decoder_outputs=scaled,
        relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
        rms_norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)),
    )


def _take_copy(checkpoint: HFCheckpoint, key: str, reference: np.ndarray, why: str) -> None:
    """Takes `key` if the checkpoint stores it, failing unless it equals `reference`."""
    if key in checkpoint and not np.array_equal(checkpoint.take(key), reference):
        raise CheckpointImportError(
            f"{checkpoint.directory}: {key} differs from shared.weight ({why})"
        )


def convert(checkpoint: HFCheckpoint, arch: dict, component_config: Mapping) -> dict:
    """The T5 parameter tree (numpy leaves, stored dtypes) in the layout
    `component_config["scan_layers"]` selects."""
    dim, heads, head_dim = arch["dim"], arch["num_heads"], arch["head_dim"]
    take = checkpoint.take

    def attention(prefix: str) -> dict:
        qkv = {
            f"{name}_proj": {"kernel": take(f"{prefix}.{name}.weight").T.reshape(dim, heads, -1)}
            for name in ("q", "k", "v")
        }
        o = take(f"{prefix}.o.weight").T.reshape(heads, head_dim, dim)
        return {**qkv, "o_proj": {"kernel": o}}

    def feed_forward(prefix: str) -> dict:
        names = (
            {"wi_0": "gate_proj", "wi_1": "up_proj", "wo": "down_proj"}
            if arch["gated_mlp"]
            else {"wi": "fc1", "wo": "fc2"}
        )
        return {ours: {"kernel": take(f"{prefix}.{hf}.weight").T} for hf, ours in names.items()}

    def norm(key: str) -> dict:
        return {"scale": take(f"{key}.weight")}

    def stack(name: str, depth: int) -> dict:
        layers = []
        for i in range(depth):
            p = f"{name}.block.{i}.layer."
            layer = {
                "self_attn_norm": norm(p + "0.layer_norm"),
                "self_attn": attention(p + "0.SelfAttention"),
            }
            if name == "decoder":
                layer["cross_attn_norm"] = norm(p + "1.layer_norm")
                layer["cross_attn"] = attention(p + "1.EncDecAttention")
            ff = p + ("2" if name == "decoder" else "1")
            layer["mlp_norm"] = norm(ff + ".layer_norm")
            layer["mlp"] = feed_forward(ff + ".DenseReluDense")
            layers.append(layer)
        bias = take(f"{name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        other = {
            "relative_attention_bias": {"embedding": bias},
            "final_layer_norm": norm(f"{name}.final_layer_norm"),
        }
        return merge_layers(other, layers, scan_layers=component_config["scan_layers"])

    shared = take("shared.weight")
    for name in ("encoder", "decoder"):
        _take_copy(
            checkpoint, f"{name}.embed_tokens.weight", shared, "T5 ties both input tables to it"
        )
    tree = {
        "shared": {"embedding": shared},
        "encoder": stack("encoder", arch["depth"]),
        "decoder": stack("decoder", arch["decoder_depth"]),
    }
    if arch["tie_embeddings"]:
        _take_copy(
            checkpoint,
            "lm_head.weight",
            shared,
            "config.json ties the head: tie_word_embeddings / scale_decoder_outputs",
        )
    else:  # transformers ties an untied head the checkpoint lacks to shared.weight
        head = take("lm_head.weight") if "lm_head.weight" in checkpoint else shared
        tree["lm_head"] = {"kernel": head.T}
    return tree


def ignored_keys(checkpoint: HFCheckpoint) -> list[str]:
    """Checkpoint keys allowed to stay unused."""
    return [k for k in checkpoint.keys() if k in IGNORED_KEYS]
