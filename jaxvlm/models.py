"""The `MODELS` table: what a job trains, built from the config by one explicit factory.

- `lm`: a decoder-only language model; parameters under `llm/` (as in a VLM, so a pretrained LM drops in).
- `seq2seq_lm`: an encoder-decoder language model (T5), parameters under `llm/`: the world's T5,
  pretrained with the prefix-LM split for BLIP-2's encoder-decoder stage 2.
- `dual_encoder`: CLIP-style image tower + text tower with projections and a learned temperature;
  the image tower's parameters live under `encoder/` (as in a VLM, so the pretrained ViT drops in).

- `vlm`: image encoder → bridge → LLM (`jaxvlm/vlm.py`); parameters under `encoder/`, `bridge/`
  and `llm/`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxvlm import config_utils
from jaxvlm.encoders import build_encoder
from jaxvlm.llms import ENCODER_DECODER_LLMS, build_llm
from jaxvlm.vlm import build_vlm, decoder_example_inputs, vlm_example_inputs


class LanguageModel(nn.Module):
    """A decoder-only LM: `tokens int[B, T]` → `DecoderOutput(logits float[B, T, V], ...)`."""

    llm: nn.Module

    def __call__(self, tokens, *, mask=None, positions=None):
        return self.llm(tokens, positions=positions, kv_mask=mask)


class Seq2SeqLanguageModel(nn.Module):
    """An encoder-decoder LM: encoder `tokens int[B, S]` and `decoder_tokens int[B, T]` (start
    token first) → `DecoderOutput(logits float[B, T, V], ...)` (T5 teacher forcing)."""

    llm: nn.Module

    def __call__(self, tokens, *, mask=None, decoder_tokens, decoder_mask=None):
        return self.llm(tokens, decoder_tokens, mask=mask, decoder_mask=decoder_mask)


def is_encoder_decoder(config: ml_collections.ConfigDict) -> bool:
    """Whether `config.llm` is an encoder-decoder (its batches split between the two stacks)."""
    return config.llm.name in ENCODER_DECODER_LLMS


def encoder_decoder_split(config: ml_collections.ConfigDict, tokenizer, mode: str | None = None):
    """The host transform that lays a batch out for an encoder-decoder `config.llm`
    (`mode` default `config.data.prefix_split`; the decoder starts from the pad id, as HF T5's
    `decoder_start_token_id`), or None for a decoder-only one."""
    from jaxvlm.data import transforms

    if not is_encoder_decoder(config):
        return None
    pad_id = 0 if tokenizer.pad_id is None else tokenizer.pad_id
    return transforms.SplitForEncoderDecoder(
        config.data.prefix_split if mode is None else mode,
        decoder_max_len=config.data.decoder_max_len,
        decoder_start_id=pad_id,
        eos_id=tokenizer.eos_id,
        pad_id=pad_id,
    )


class DualEncoder(nn.Module):
    """CLIP (Radford et al., 2021): image and text embeddings in one space, L2-normalised.

    The text tower is a causal Llama stack read at the last real token (CLIP reads its EOS token).
    """

    encoder: nn.Module
    text_encoder: nn.Module
    projection_dim: int
    temperature_init: float = 0.07
    learn_temperature: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        dense = lambda name: nn.Dense(
            self.projection_dim,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("embed", "mlp")
            ),
            name=name,
        )
        self.image_projection = dense("image_projection")
        self.text_projection = dense("text_projection")
        # CLIP's learned temperature, stored as log(1/τ).
        init = nn.initializers.constant(np.log(1.0 / self.temperature_init))
        self.log_inverse_temperature = self.param(
            "log_inverse_temperature", nn.with_logical_partitioning(init, ()), (), self.param_dtype
        )

    def embed_image(self, images):
        """`images float[B, H, W, 3]` → `float[B, E]`, unit norm."""
        pooled = self.encoder(images).pooled
        return _normalize(self.image_projection(pooled))

    def embed_text(self, tokens, mask):
        """`tokens int[B, T]`, `mask int[B, T]` (1 = real) → `float[B, E]`, unit norm."""
        hidden = self.text_encoder(tokens, kv_mask=mask, return_hidden=True).hidden
        last = jnp.maximum(jnp.sum(mask, axis=-1) - 1, 0)
        pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        return _normalize(self.text_projection(pooled))

    def logit_scale(self):
        scale = self.log_inverse_temperature
        if not self.learn_temperature:
            scale = jnp.asarray(np.log(1.0 / self.temperature_init), scale.dtype)
        # CLIP clips the scale at 100 for stability.
        return jnp.minimum(jnp.exp(scale.astype(jnp.float32)), 100.0)

    def __call__(self, images, tokens, mask):
        return self.embed_image(images), self.embed_text(tokens, mask), self.logit_scale()


def _normalize(x):
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def build_lm(config: ml_collections.ConfigDict) -> nn.Module:
    return LanguageModel(llm=build_llm(config.llm))


def lm_example_inputs(config: ml_collections.ConfigDict) -> tuple[tuple, dict]:
    tokens = jnp.zeros((1, config.data.max_text_len), jnp.int32)
    return (tokens,), {"mask": jnp.ones_like(tokens)}


def build_seq2seq_lm(config: ml_collections.ConfigDict) -> nn.Module:
    if not is_encoder_decoder(config):
        raise config_utils.ConfigError(
            f"config.model='seq2seq_lm' needs an encoder-decoder config.llm "
            f"({', '.join(sorted(ENCODER_DECODER_LLMS))}); got config.llm.name={config.llm.name!r}"
        )
    return Seq2SeqLanguageModel(llm=build_llm(config.llm))


def seq2seq_lm_example_inputs(config: ml_collections.ConfigDict) -> tuple[tuple, dict]:
    (tokens,), kwargs = lm_example_inputs(config)
    return (tokens,), {**kwargs, **decoder_example_inputs(config)}


def build_dual_encoder(config: ml_collections.ConfigDict) -> nn.Module:
    return DualEncoder(
        encoder=build_encoder(config.encoder),
        text_encoder=build_llm(config.text_encoder, where="config.text_encoder"),
        projection_dim=config.contrastive.projection_dim,
        temperature_init=config.contrastive.temperature_init,
        learn_temperature=config.contrastive.learn_temperature,
    )


def dual_encoder_example_inputs(config: ml_collections.ConfigDict) -> tuple[tuple, dict]:
    size = config.preprocessing.image_size
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    tokens = jnp.zeros((1, config.data.max_text_len), jnp.int32)
    return (images, tokens, jnp.ones_like(tokens)), {}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to build a model, what inputs initialise it, and which config components it needs."""

    build: Callable[[ml_collections.ConfigDict], nn.Module]
    example_inputs: Callable[[ml_collections.ConfigDict], tuple[tuple, dict]]
    components: tuple[str, ...]
    # Components that may be "none" when config.objective is one of `bridge_only_objectives`.
    optional_components: tuple[str, ...] = ()
    bridge_only_objectives: tuple[str, ...] = ()


MODELS: dict[str, ModelSpec] = {
    "lm": ModelSpec(build_lm, lm_example_inputs, ("llm",)),
    "seq2seq_lm": ModelSpec(build_seq2seq_lm, seq2seq_lm_example_inputs, ("llm",)),
    "dual_encoder": ModelSpec(
        build_dual_encoder, dual_encoder_example_inputs, ("encoder", "text_encoder")
    ),
    # BLIP-2 stage 1 trains the bridge with no LLM (INTERFACES.md §4: config.llm.name="none").
    "vlm": ModelSpec(
        build_vlm,
        vlm_example_inputs,
        ("encoder", "llm", "bridge"),
        optional_components=("llm",),
        bridge_only_objectives=("bridge_pretrain",),
    ),
}


def get_model_spec(config: ml_collections.ConfigDict) -> ModelSpec:
    if config.model not in MODELS:
        raise config_utils.ConfigError(
            f"config.model={config.model!r} is unknown; known: {', '.join(sorted(MODELS))}"
        )
    return MODELS[config.model]


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
    return get_model_spec(config).build(config)


def init_fn(model: nn.Module, config: ml_collections.ConfigDict) -> Callable:
    """`rng → boxed params` (logical names kept, for shardings); jit or eval_shape it."""
    args, kwargs = get_model_spec(config).example_inputs(config)
    return lambda rng: model.init(rng, *args, **kwargs)["params"]


def validate_components(config: ml_collections.ConfigDict) -> None:
    """Every component the model needs is named, and every field is a field of its module."""
    spec = get_model_spec(config)
    for component in spec.components:
        if config[component].name != "none":
            continue
        if component in spec.optional_components:
            if config.objective in spec.bridge_only_objectives:
                continue
            raise config_utils.ConfigError(
                f"config.{component}.name is 'none' but config.objective={config.objective!r} "
                f"needs it (only {', '.join(spec.bridge_only_objectives)} trains without one)"
            )
        raise config_utils.ConfigError(
            f"config.{component}.name is 'none' but config.model={config.model!r} needs it"
        )
    build_model(config)  # constructing the modules checks names and fields; nothing is initialised
