"""Bridges between image encoder and LLM behind one table: `BRIDGES[name]` and `build_bridge`.

Each entry is a module that exports `Bridge` with the contract in `bridges/base.py` (STYLE.md §4).
"""

import dataclasses
from collections.abc import Mapping

import flax.linen as nn

from jaxvlm.bridges import mlp_projector, qformer
from jaxvlm.bridges.base import BridgeOutput, BridgeText, Injection
from jaxvlm.components import build_component

__all__ = ["BRIDGES", "BridgeOutput", "BridgeText", "Injection", "build_bridge"]

BRIDGES = {"mlp_projector": mlp_projector, "qformer": qformer}


def build_bridge(
    cfg: Mapping, *, vision_dim: int, llm_dim: int, where: str = "config.bridge"
) -> nn.Module:
    """`BRIDGES[cfg.name].Bridge(**fields, llm_dim=llm_dim)`; errors name `where`.

    `vision_dim` (Dv) is passed only to a bridge that has a `vision_dim` field; the others (the MLP
    projector) take it from the input shape.
    """
    table = {name: module.Bridge for name, module in BRIDGES.items()}
    overrides = {"llm_dim": llm_dim}
    # An unknown name is reported by build_component; only a known class is inspected here.
    bridge_class = table.get(cfg["name"]) if "name" in cfg else None
    if bridge_class is not None:
        if "vision_dim" in {field.name for field in dataclasses.fields(bridge_class)}:
            overrides["vision_dim"] = vision_dim
    return build_component(table, cfg, where, **overrides)
