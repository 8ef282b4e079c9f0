"""Decoder layer stacks: scanning, grouping around a cross-attention hook, layout conversion.

Shared by the decoders in `llms/` (Llama now; OPT or T5's decoder later), so the hook contract and
the parameter layouts are defined once; `llama.py`'s docstring states both. `split_layers` and
`merge_layers` convert between layouts (unscanned, scanned, scanned in hook groups): importers
produce one tree per layer and `merge_layers` places them; a checkpoint of a plain scanned LM goes
into a hooked (Flamingo) decoder via `merge_layers(*split_layers(...), every_n_layers=n)`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "PLACEMENTS",
    "CrossAttentionHook",
    "LayerGroup",
    "hook_layer_indices",
    "layer_slice",
    "merge_group_axis",
    "merge_layers",
    "scanned",
    "split_layers",
    "stack_trees",
]

PLACEMENTS = ("paper", "openflamingo")


class CrossAttentionHook(Protocol):
    """What `Llama(cross_attention=...)` calls; the contract is in `llama.py`'s docstring."""

    every_n_layers: int
    placement: str

    def cross_attention_block(self, index: int | None) -> nn.Module: ...


def hook_layer_indices(depth: int, every_n_layers: int, placement: str) -> list[int]:
    """The layers before which a cross-attention block runs, in order."""
    if placement not in PLACEMENTS:
        raise ValueError(f"cross-attention placement={placement!r} is unknown; known: {PLACEMENTS}")
    if not 1 <= every_n_layers <= depth:
        raise ValueError(
            f"cross-attention every_n_layers={every_n_layers} must be in [1, depth={depth}]"
        )
    if placement == "paper":
        return list(range(0, depth, every_n_layers))
    return [i for i in range(depth) if (i + 1) % every_n_layers == 0]


class LayerGroup(nn.Module):
    """n decoder layers with the hook's block before layer `hook_position` (the scanned body)."""

    make_layer: Callable[..., nn.Module]
    num_layers: int
    hook_position: int
    hook_block: nn.Module

    @nn.compact
    def __call__(self, x, cache, mask, positions, media, media_mask):
        new_caches = []
        for j in range(self.num_layers):
            if j == self.hook_position:
                x = self.hook_block(x, media, media_mask).astype(x.dtype)
            layer_cache = None if cache is None else jax.tree.map(lambda a, j=j: a[j], cache)
            x, layer_cache = self.make_layer(name=f"layers_{j}")(x, layer_cache, mask, positions)
            new_caches.append(layer_cache)
        return x, stack_trees(new_caches)


def stack_trees(trees: Sequence) -> object:
    """Stacks equal-structure trees on a new leading axis (None stays None)."""
    return None if trees[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *trees)


def scanned(module_class: type[nn.Module], length: int, num_broadcast: int) -> type[nn.Module]:
    """`module_class` scanned `length` times: params stacked on a leading `layers` axis; the
    first call argument after the carry is scanned (a per-layer cache), the next
    `num_broadcast` are broadcast."""
    return nn.scan(
        module_class,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(0,) + (nn.broadcast,) * num_broadcast,
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


def layer_slice(cache, i: int):
    """Layer i's slice of a per-layer stacked tree (None stays None)."""
    return None if cache is None else jax.tree.map(lambda a: a[i], cache)


def merge_group_axis(a: jax.Array) -> jax.Array:
    """[G, n, ...] → [G·n, ...]."""
    return a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])


def split_layers(
    params: Mapping, *, depth: int, scan_layers: bool, every_n_layers: int | None = None
) -> tuple[dict, list[dict]]:
    """A Llama's (unboxed) params → (the non-layer params, one param tree per layer, in order).

    `every_n_layers` is the hook's (None without a hook); it only matters with `scan_layers`.
    """
    params = dict(params)
    if not scan_layers:
        return _params_without(params, [f"layers_{i}" for i in range(depth)]), [
            params[f"layers_{i}"] for i in range(depth)
        ]
    if every_n_layers is None:
        stacked = params["layers"]
        layers = [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(depth)]
        return _params_without(params, ["layers"]), layers
    n = every_n_layers
    first = depth // n * n
    groups = params["groups"]
    layers = [
        jax.tree.map(lambda a, g=i // n: a[g], groups[f"layers_{i % n}"]) for i in range(first)
    ]
    layers += [params[f"layers_{i}"] for i in range(first, depth)]
    remainder = [f"layers_{i}" for i in range(first, depth)]
    return _params_without(params, ["groups", *remainder]), layers


def merge_layers(
    other: Mapping,
    layers: Sequence[Mapping],
    *,
    scan_layers: bool,
    every_n_layers: int | None = None,
) -> dict:
    """The inverse of `split_layers`: per-layer trees placed in the layout the flags select.

    numpy leaves stay numpy (importers stack on the host, then place shards on devices).
    """
    params, depth = dict(other), len(layers)
    stack = lambda trees: jax.tree.map(
        lambda *a: np.stack(a) if isinstance(a[0], np.ndarray) else jnp.stack(a), *trees
    )
    if not scan_layers:
        params.update({f"layers_{i}": layer for i, layer in enumerate(layers)})
    elif every_n_layers is None:
        params["layers"] = stack(layers)
    else:
        n = every_n_layers
        first = depth // n * n
        params["groups"] = {f"layers_{j}": stack(layers[j:first:n]) for j in range(n)}
        params.update({f"layers_{i}": layers[i] for i in range(first, depth)})
    return params


def _params_without(params: Mapping, keys: Sequence[str]) -> dict:
    return {k: v for k, v in params.items() if k not in keys}
