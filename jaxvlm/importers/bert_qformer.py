"""A BERT checkpoint → the initial parameters of BLIP-2's Q-Former (`bridges.qformer`).

BLIP-2 §3.1 (papers.md §1) initialises the Q-Former from BERT-base and its cross-attention at
random; LAVIS (`Blip2Base.init_Qformer`) loads `bert-base-uncased` into its `BertLMHeadModel` with
`strict=False` and copies each layer's FFN into the queries' (`intermediate_query`,
`output_query`). From the checkpoint, read through the BERT importer's table (`bert.convert`):

- `word_embeddings` (the rows past the checkpoint's vocabulary, e.g. `[DEC]` appended at 30522 to
  BERT's WordPiece, stay fresh: `LeadingRows`), `position_embeddings` (the first `max_positions`
  rows) and `embed_layer_norm`;
- per layer, `self_attn` (shared by queries and text), and BERT's FFN twice: as the text's
  `feed_forward` and as the queries' `feed_forward_query`;
- the ITG head from BERT's MLM head when the checkpoint has one (`BertForMaskedLM`,
  `BertForPreTraining`, `BertLMHeadModel`): `cls.predictions.transform` → `lm_head_transform` and
  `lm_head_layer_norm`, `cls.predictions.bias` → `lm_head_bias` (fresh rows past the vocabulary);
  its decoder weight is tied to the word embeddings, as ours is.

Token types: the Q-Former has none (LAVIS neither), while BERT adds `token_type_embeddings[0]` to
every token; that row is folded into the position table, so the text side is exactly BERT on token
type 0 (LAVIS drops the row: a deliberate deviation towards BERT). Other rows go unused.

Fresh, from the model's init (`FRESH`): `query_tokens`, `ln_vision`, every `cross_attn`, the ITC
projections, `temperature`, `itm_head`, `language_projection`, and the LM head when the checkpoint
has none. The pooler, the NSP head and the id buffers are read and ignored (`bert.ignored_keys`).

Sizes stay the config's: `config.bridge.{dim, depth, num_heads, mlp_dim, hidden_act,
layer_norm_eps}` must equal the checkpoint's, `vocab_size` be at least and `max_positions` at most
the checkpoint's, or `check_architecture` raises naming every such field and both values.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jaxvlm.bridges import qformer
from jaxvlm.importers import bert
from jaxvlm.importers.base import (
    CheckpointImportError,
    HFCheckpoint,
    LeadingRows,
    check_filled,
    unsupported,
)
from jaxvlm.param_paths import flatten_params

MODEL_TYPES = bert.MODEL_TYPES
# config.bridge field → config.json field: equal, at least (>=) or at most (<=) the checkpoint's.
EQUAL_FIELDS = {
    "dim": "hidden_size",
    "depth": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "mlp_dim": "intermediate_size",
    "hidden_act": "hidden_act",
    "layer_norm_eps": "layer_norm_eps",
}
AT_LEAST_FIELDS = {"vocab_size": "vocab_size"}  # added tokens (`[DEC]`) get fresh rows
AT_MOST_FIELDS = {"max_positions": "max_position_embeddings"}  # the first rows are taken
# Q-Former parameters no BERT has (paths under the bridge), and the LM head (fresh without one).
FRESH = (
    r"query_tokens",
    r"ln_vision/.*",
    r"layers_\d+/cross_attn/.*",
    r"vision_projection/.*",
    r"text_projection/.*",
    r"itm_head/.*",
    r"temperature",
    r"language_projection/.*",
)
LM_HEAD = (r"lm_head_transform/.*", r"lm_head_layer_norm/.*", r"lm_head_bias")
MLM_HEAD = "cls.predictions."


def check_architecture(
    hf: Mapping, bridge_config: Mapping, source: str | Path, component: str = "bridge"
) -> None:
    """Raises unless `bridge_config` (a Q-Former's `config.bridge`) fits the BERT `config.json`
    dict `hf`; the error names every field that does not, with both values."""
    where = f"config.{component}"
    if bridge_config["name"] != "qformer":
        raise CheckpointImportError(
            f"{where}.checkpoint={source}: a BERT checkpoint initialises a Q-Former "
            f"({where}.name='qformer'), not {where}.name={bridge_config['name']!r}"
        )
    arch = bert.architecture(dict(hf))
    problems = []
    for fields, fits in (
        (EQUAL_FIELDS, lambda ours, theirs: ours == theirs),
        (AT_LEAST_FIELDS, lambda ours, theirs: ours >= theirs),
        (AT_MOST_FIELDS, lambda ours, theirs: ours <= theirs),
    ):
        for field, hf_field in fields.items():
            ours, theirs = _field(bridge_config, field), arch[field]
            if not fits(ours, theirs):
                wanted = "" if theirs == hf[hf_field] else f" ({where}.{field}={theirs!r})"
                problems.append(
                    f"{where}.{field}={ours!r} but the checkpoint's {hf_field} is "
                    f"{hf[hf_field]!r}{wanted}"
                )
    if problems:
        raise CheckpointImportError(
            f"{source}: the Q-Former keeps its configured sizes, which must fit the BERT "
            f"checkpoint (equal sizes, a vocabulary at least and positions at most its own): "
            + "; ".join(problems)
        )


def _field(bridge_config: Mapping, name: str):
    """`config.bridge.<name>`, else the Q-Former's default."""
    if name in bridge_config:
        return bridge_config[name]
    return {field.name: field.default for field in dataclasses.fields(qformer.Bridge)}[name]


def _grown(array: np.ndarray, rows: int):
    """`array` [R, ...] as a parameter of `rows` >= R rows (the extra ones fresh)."""
    if array.shape[0] == rows:
        return array
    return LeadingRows(array, (rows, *array.shape[1:]))


def _lm_head(checkpoint: HFCheckpoint, hf: Mapping, vocab_size: int) -> dict:
    """The ITG head from BERT's MLM head (`{}` when the checkpoint has none)."""
    if f"{MLM_HEAD}transform.dense.weight" not in checkpoint:
        return {}
    if hf.get("tie_word_embeddings", True) is False:
        raise unsupported(
            "bert_qformer", "tie_word_embeddings", False, "the Q-Former's LM head is tied"
        )
    take = checkpoint.take
    norm = f"{MLM_HEAD}transform.LayerNorm."
    old = f"{norm}gamma" in checkpoint  # pre-2020 checkpoints: gamma / beta
    bias = f"{MLM_HEAD}bias" if f"{MLM_HEAD}bias" in checkpoint else f"{MLM_HEAD}decoder.bias"
    return {
        "lm_head_transform/kernel": take(f"{MLM_HEAD}transform.dense.weight").T,
        "lm_head_transform/bias": take(f"{MLM_HEAD}transform.dense.bias"),
        "lm_head_layer_norm/scale": take(norm + ("gamma" if old else "weight")),
        "lm_head_layer_norm/bias": take(norm + ("beta" if old else "bias")),
        "lm_head_bias": _grown(take(bias), vocab_size),
    }


def convert(checkpoint: HFCheckpoint, bridge_config: Mapping) -> dict:
    """`{path under the bridge: numpy array or LeadingRows}` from a BERT checkpoint (see the
    module docstring); the fresh parameters are absent."""
    hf = checkpoint.hf_config
    arch = bert.architecture(hf)
    tree = flatten_params(bert.convert(checkpoint, arch, {"scan_layers": False, "pooler": False}))
    vocab_size = _field(bridge_config, "vocab_size")
    max_positions = _field(bridge_config, "max_positions")
    positions = tree.pop("embeddings/position_embeddings/embedding")[:max_positions]
    token_types = tree.pop("embeddings/token_type_embeddings")
    params = {
        "word_embeddings/embedding": _grown(
            tree.pop("embeddings/word_embeddings/embedding"), vocab_size
        ),
        # BERT adds token type 0 to every token; the Q-Former has no token types.
        "position_embeddings/embedding": positions.astype(np.float32)
        + token_types[0].astype(np.float32),
        "embed_layer_norm/scale": tree.pop("embeddings/layer_norm/scale"),
        "embed_layer_norm/bias": tree.pop("embeddings/layer_norm/bias"),
    }
    for path, value in tree.items():  # layers_{i}/{self_attn, feed_forward}/...
        params[path] = value
        layer, block, rest = path.split("/", 2)
        if block == "feed_forward":  # LAVIS: intermediate_query / output_query from BERT's FFN
            params[f"{layer}/feed_forward_query/{rest}"] = value
    params.update(_lm_head(checkpoint, hf, vocab_size))
    return params


def load_component(
    checkpoint: HFCheckpoint,
    component_config: Mapping,
    expected: Mapping,
    component: str = "bridge",
) -> dict:
    """`{f"{component}/...": array or LeadingRows}`: the Q-Former parameters a BERT checkpoint
    fills. Fails naming every checkpoint tensor left unused (other than `bert.ignored_keys`) and
    every Q-Former parameter neither filled nor fresh (`FRESH`, and `LM_HEAD` without an MLM head).

    Args:
      checkpoint: the BERT directory. component_config: `config.bridge` (a Q-Former's).
      expected: `{path: shape-like}` of the whole model's parameters.
    """
    check_architecture(checkpoint.hf_config, component_config, checkpoint.directory, component)
    params = convert(checkpoint, component_config)
    checkpoint.finish(ignored=bert.ignored_keys(checkpoint))
    fresh = FRESH if "lm_head_bias" in params else FRESH + LM_HEAD
    fresh_path = re.compile("|".join(f"(?:{pattern})" for pattern in fresh))
    prefix = f"{component}/"
    loaded = {prefix + path: value for path, value in params.items()}
    wanted = {
        path: shape
        for path, shape in expected.items()
        if path.startswith(prefix) and not fresh_path.fullmatch(path[len(prefix) :])
    }
    check_filled(checkpoint.directory, loaded, wanted)
    return loaded
