"""LLaVA's projector: patch features → LLM word-embedding space, one token per patch.

LLaVA (Liu et al., 2023; papers.md §3): a projection W maps the CLIP ViT grid features to visual
tokens `H_v = W · Z_v`, one per patch, prepended to (placed into) the text; LLaVA-1.5 makes W a
2-layer MLP with GELU (`projector="mlp2x_gelu"`). `projector="linear"` is the original LLaVA.

Submodules are named as in the HF `LlavaMultiModalProjector` (`linear_1`, `linear_2`), so an
importer is a table. LLaVA uses the patch features only: with `drop_class_token=True` (the config
sets it when the encoder has a class token) the first of the P encoder tokens is dropped.

Deviations: frames of a clip are flattened into the token axis (N = F·P), which LLaVA (still images
only) does not define; image slots with `image_mask` False give zero tokens.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvlm.bridges.base import BridgeOutput, BridgeText, Injection
from jaxvlm.layers.mlp import logical_dense

__all__ = ["PROJECTORS", "Bridge"]

PROJECTORS = ("linear", "mlp2x_gelu")


class Bridge(nn.Module):
    """Projects each patch feature into the LLM embedding space (LLaVA's W).

    Attributes:
      llm_dim: Dllm, the LLM's embedding width.
      projector: `"mlp2x_gelu"` (LLaVA-1.5: Dense, exact GELU, Dense) or `"linear"` (LLaVA).
      drop_class_token: drop the first encoder token (the ViT's class token).
      dtype: computation dtype; param_dtype: storage dtype.
    """

    injection: ClassVar[Injection] = Injection.PREFIX

    llm_dim: int
    projector: str = "mlp2x_gelu"
    drop_class_token: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def __post_init__(self):
        if self.projector not in PROJECTORS:
            raise ValueError(
                f"config.bridge.projector={self.projector!r} is unknown; known: {list(PROJECTORS)}"
            )
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        image_features: jax.Array,
        *,
        image_mask: jax.Array,
        text: BridgeText | None = None,
        train: bool = False,
    ) -> BridgeOutput:
        """Projects the features of every image.

        Args:
          image_features: float[B, M, F, P, Dv] — M images, F frames, P encoder tokens.
          image_mask: bool[B, M]; False slots give zero tokens.
          text: unused (this bridge does not read the prompt).
          train: unused (no dropout).

        Returns:
          BridgeOutput with tokens float[B, M, N, Dllm] in `dtype`, N = F·(P − 1) with
          `drop_class_token`, else F·P; `media` None, `aux` empty.
        """
        del text, train
        if image_features.ndim != 5:
            raise ValueError(
                f"image_features must be float[B, M, F, P, Dv]; got shape {image_features.shape}"
            )
        if self.drop_class_token:
            image_features = image_features[:, :, :, 1:]
        batch, images, frames, patches, vision_dim = image_features.shape
        x = image_features.reshape(batch, images, frames * patches, vision_dim)
        x = logical_dense(
            self.llm_dim, ("embed", "mlp"), True, self.dtype, self.param_dtype, "linear_1"
        )(x)
        if self.projector == "mlp2x_gelu":
            x = jax.nn.gelu(x, approximate=False)  # HF `projector_hidden_act="gelu"`, exact erf.
            x = logical_dense(
                self.llm_dim, ("mlp", "embed"), True, self.dtype, self.param_dtype, "linear_2"
            )(x)
        x = jnp.where(image_mask[:, :, None, None], x, jnp.zeros((), x.dtype))
        x = nn.with_logical_constraint(x, ("batch", "media", "length", "embed"))
        return BridgeOutput(tokens=x, media=None, aux={})
