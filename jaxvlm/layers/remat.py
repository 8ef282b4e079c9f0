"""Rematerialisation policies by name, shared by every layer stack (`remat` config field)."""

from __future__ import annotations

import flax.linen as nn
import jax

__all__ = ["REMAT_POLICIES", "maybe_remat"]

# "full": save nothing, recompute the whole block in the backward pass; "dots": save matmul outputs
# without batch dimensions (MaxText's "minimal"), recompute the elementwise work.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def maybe_remat(module_class: type[nn.Module], remat: str, *, scanned: bool) -> type[nn.Module]:
    """`module_class` wrapped in `nn.remat` under the named policy ("none" returns it unchanged)."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r} is unknown; known: {sorted(REMAT_POLICIES)}")
    if remat == "none":
        return module_class
    # Inside a scan the loop already prevents CSE across layers; outside, keep remat's guard.
    return nn.remat(module_class, policy=REMAT_POLICIES[remat], prevent_cse=not scanned)
