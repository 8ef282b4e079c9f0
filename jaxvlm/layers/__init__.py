"""Shared math for encoders, LLMs and bridges: one attention, one mask builder, MLP, norms,
embeddings (with RoPE). Layers know nothing about configs, encoders, LLMs or bridges."""

from jaxvlm.layers.attention import Attention, AttentionOutput, KVCache
from jaxvlm.layers.embeddings import Embed, LMHead, PositionEmbedding, apply_rope
from jaxvlm.layers.masks import make_attention_mask, make_media_mask, qformer_masks
from jaxvlm.layers.mlp import ACTIVATIONS, Mlp
from jaxvlm.layers.norms import LayerNorm, RMSNorm, make_norm
from jaxvlm.layers.remat import REMAT_POLICIES, maybe_remat

__all__ = [
    "ACTIVATIONS",
    "REMAT_POLICIES",
    "Attention",
    "AttentionOutput",
    "Embed",
    "KVCache",
    "LMHead",
    "LayerNorm",
    "Mlp",
    "PositionEmbedding",
    "RMSNorm",
    "apply_rope",
    "make_attention_mask",
    "make_media_mask",
    "make_norm",
    "maybe_remat",
    "qformer_masks",
]
