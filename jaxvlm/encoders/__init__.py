"""Image encoders behind one table: `ENCODERS[name]` and `build_encoder(config.encoder)`."""

from collections.abc import Mapping
from typing import Any

from jaxvlm.components import build_component
from jaxvlm.encoders import vit
from jaxvlm.encoders.vit import EncoderOutput, ViT

__all__ = ["ENCODERS", "EncoderOutput", "ViT", "build_encoder"]

ENCODERS = {"vit": vit.ViT}


def build_encoder(cfg: Mapping, *, where: str = "config.encoder", **overrides: Any) -> ViT:
    """`ENCODERS[cfg.name](**fields)`; `where` names the config block in errors."""
    return build_component(ENCODERS, cfg, where, **overrides)
