"""Language models behind one table: `LLMS[name]` and `build_llm(config.llm)`.

`name="none"` (no LLM, e.g. BLIP-2 stage 1) is the caller's case, not an entry here.
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from jaxvlm.components import build_component
from jaxvlm.llms import llama, opt, t5
from jaxvlm.llms.llama import DecoderCache, DecoderOutput, Llama
from jaxvlm.llms.opt import Opt

__all__ = [
    "ENCODER_DECODER_LLMS",
    "LLMS",
    "DecoderCache",
    "DecoderOutput",
    "Llama",
    "Opt",
    "build_llm",
]

LLMS = {"llama": llama.Llama, "opt": opt.Opt, "t5": t5.T5}
# LLMs with an encoder and a decoder: their batches split the text between the two stacks
# (`models.encoder_decoder_split`) and they decode through `t5.t5_generate`.
ENCODER_DECODER_LLMS = frozenset({"t5"})


def build_llm(cfg: Mapping, *, where: str = "config.llm", **overrides: Any) -> nn.Module:
    """`LLMS[cfg.name](**fields)`; `where` names the config block in errors (e.g.
    `config.text_encoder`)."""
    return build_component(LLMS, cfg, where, **overrides)
