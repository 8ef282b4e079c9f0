"""Parameter paths: `"encoder/layers_0/self_attn/q_proj/kernel"` names one leaf of a param tree.

Regexes over these names select what trains (`config.trainable`), flat `{path: leaf}` dicts are what
trainable-only checkpoints hold, and importers map checkpoint keys onto them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

PATH_SEPARATOR = "/"
_MAX_LISTED = 20


def path_string(path) -> str:
    """A pytree key path as `encoder/layers/attn/q_proj/kernel`: dict keys, attribute names
    (namedtuples, dataclasses) and indices alike, so Orbax's stored metadata (which turns namedtuples
    into dicts) and the live tree name a leaf the same way."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return PATH_SEPARATOR.join(parts)


def flatten_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Nested mappings → `{"a/b/c": leaf}`. Every non-mapping is a leaf; empty mappings vanish."""
    flat: dict[str, Any] = {}

    def visit(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if not isinstance(key, str) or PATH_SEPARATOR in key:
                raise ValueError(f"parameter key {prefix}{key!r} must be a str without '/'")
            if isinstance(value, Mapping):
                visit(value, f"{prefix}{key}{PATH_SEPARATOR}")
            else:
                flat[f"{prefix}{key}"] = value

    visit(params, "")
    return flat


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """`{"a/b/c": leaf}` → nested dicts (the inverse of `flatten_params`)."""
    nested: dict[str, Any] = {}
    for name in sorted(flat):
        *parents, last = name.split(PATH_SEPARATOR)
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = flat[name]
    return nested


def split_params(
    params: Mapping[str, Any], mask: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Splits nested params by a same-structure tree of bools into flat `(trainable, frozen)` dicts.

    Flat `{"a/b/c": leaf}` dicts hold only their own leaves, so Orbax saves (and restores with
    shardings) the trainable part alone. Works on arrays and on `jax.ShapeDtypeStruct`s alike, so
    `split_params(abstract_params, mask)[0]` is the matching restore target.
    """
    flat_params, flat_mask = flatten_params(params), flatten_params(mask)
    if flat_params.keys() != flat_mask.keys():
        raise ValueError(
            "the mask does not match the params: "
            f"without a mask entry: {abbreviated(sorted(flat_params.keys() - flat_mask.keys()))}; "
            "mask entries without a param: "
            f"{abbreviated(sorted(flat_mask.keys() - flat_params.keys()))}"
        )
    trainable = {name: leaf for name, leaf in flat_params.items() if bool(flat_mask[name])}
    frozen = {name: leaf for name, leaf in flat_params.items() if not bool(flat_mask[name])}
    return trainable, frozen


def merge_params(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict[str, Any]:
    """The nested params from the flat halves `split_params` made; a path in both is an error."""
    if overlap := sorted(trainable.keys() & frozen.keys()):
        raise ValueError(f"parameters both trainable and frozen: {abbreviated(overlap)}")
    return unflatten_params({**frozen, **trainable})


def abbreviated(names: Sequence[str]) -> str:
    """At most 20 names, comma-separated, then how many more (for error messages)."""
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")
