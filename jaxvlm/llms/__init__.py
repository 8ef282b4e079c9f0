"""Language models behind one table: `LLMS[name]` and `build_llm(config.llm)`.

`name="none"` (no LLM, e.g. BLIP-2 stage 1) is the caller's case, not an entry here.
"""

from collections.abc import Mapping
from typing import Any

from jaxvlm.components import build_component
from jaxvlm.llms import llama
from jaxvlm.llms.llama import DecoderCache, DecoderOutput, Llama

__all__ = ["LLMS", "DecoderCache", "DecoderOutput", "Llama", "build_llm"]

LLMS = {"llama": llama.Llama}


def build_llm(cfg: Mapping, *, where: str = "config.llm", **overrides: Any) -> Llama:
    """`LLMS[cfg.name](**fields)`; `where` names the config block in errors (e.g.
    `config.text_encoder`)."""
    return build_component(LLMS, cfg, where, **overrides)
