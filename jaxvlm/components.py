"""Builds a component (encoder, LLM, …) from its config block.

`name` picks the class from an explicit table (scenic style), the other keys are its fields. Shared
by `encoders.build_encoder` and `llms.build_llm`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

__all__ = ["build_component"]

# Keys of a component block that are not constructor fields: the table key, the weights source and
# a bridge's own tokenizer (`initialization.bridge_tokenizer`).
NON_FIELD_KEYS = ("name", "checkpoint", "tokenizer")
DTYPE_FIELDS = ("dtype", "param_dtype")


def build_component(table: Mapping[str, type], cfg: Mapping, where: str, **overrides: Any) -> Any:
    """`table[cfg.name](**fields)`, with errors that name the config key.

    Args:
      table: name → module class, e.g. `ENCODERS`.
      cfg: a mapping (dict or ConfigDict) with `name` plus the class's fields; `checkpoint` is
        ignored; `dtype`/`param_dtype` may be strings such as "bfloat16"; nested mappings (e.g.
        `rope_scaling`) become plain dicts and lists become tuples.
      where: the config path, for messages (`"config.encoder"` → `config.encoder.<field> is not
        a field of ViT`).
      **overrides: fields set by the caller (they win over `cfg`).
    """
    cfg = _to_python(cfg)
    name = cfg.get("name")
    if name not in table:
        raise ValueError(f"{where}.name={name!r} is unknown; known names: {sorted(table)}")
    module_class = table[name]
    fields = {k: v for k, v in cfg.items() if k not in NON_FIELD_KEYS}
    fields.update(overrides)
    for key in DTYPE_FIELDS:
        if isinstance(fields.get(key), str):
            fields[key] = jnp.dtype(fields[key])
    known = {f.name for f in dataclasses.fields(module_class) if f.init} - {"parent", "name"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(
            f"{where}.{unknown[0]} is not a field of {module_class.__name__} "
            f"(unknown: {unknown}; fields: {sorted(known)})"
        )
    return module_class(**fields)


def _to_python(value: Any) -> Any:
    """ConfigDicts and mappings → dicts, lists → tuples (module fields should be hashable-ish)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: _to_python(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_to_python(v) for v in value)
    return value
