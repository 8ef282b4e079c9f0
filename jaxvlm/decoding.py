"""The KV-cache decode loop: `generate(decoder, params, prompt_tokens, prompt_mask, ...)`.

Greedy, temperature, top-k and top-p decoding of left-padded prompts (token ids, or input
embeddings with image tokens spliced in) by any `Decoder`, two callables so the loop never knows a
parameter layout (`llm_decoder` wraps a Llama-API LM). The cache is prefilled with the prompts,
then one token per step is decoded in a jitted `jax.lax.while_loop` that ends early once every
example has emitted EOS or the stop ids (a template's stop string, tokenised). It is the one decode
path: the evaluators and `generate.answer` run it through `predict.generate_fn`. Sampling keys are
per example (INTERFACES.md §5), so batching does not change samples. jax is imported inside the
functions, so that importing this module, and `python -m jaxvlm.generate --help`, stay instant.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import flax.linen as nn
    import jax

__all__ = [
    "Decoder",
    "Decoding",
    "GenerateOutput",
    "generate",
    "llm_decoder",
    "sample_tokens",
    "top_k_filter",
    "top_p_filter",
]


@dataclasses.dataclass(frozen=True)
class Decoding:
    """How the next token is chosen from the logits.

    temperature: 0 is greedy (argmax; top_k and top_p are ignored); > 0 samples from
      softmax(logits / temperature) after filtering.
    top_k: keep the k most likely tokens (0: no limit).
    top_p: keep the smallest set of most likely tokens whose probability is ≥ top_p (1: all).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"Decoding.temperature must be ≥ 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"Decoding.top_k must be ≥ 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"Decoding.top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass(frozen=True)
class Decoder:
    """A model as `generate` sees it: two callables, so the loop never knows a parameter layout.

    apply: `(params, *, tokens=None, embeddings=None, positions, kv_mask, cache, **extra)
      -> DecoderOutput` — tokens int[B, T] or embeddings float[B, T, D]; positions int[B, T];
      kv_mask bool[B, T]; `extra` are the `decoder_inputs` given to `generate` (e.g. media for
      cross-attention), passed unchanged to every call.
    init_cache: `(batch_size, max_length) -> cache`, an empty cache (no parameters needed).
    """

    apply: Callable[..., Any]
    init_cache: Callable[[int, int], Any]


class GenerateOutput(NamedTuple):
    """tokens: int32[B, max_new_tokens] — generated ids, `pad_id` after an example's EOS.
    lengths: int32[B] — generated tokens per example, counting its EOS (or stop ids)."""

    tokens: Any
    lengths: Any


@functools.cache
def llm_decoder(llm: nn.Module, scope: str | None = "llm") -> Decoder:
    """A `Decoder` for a `Llama`-API module whose parameters are `params[scope]` (all if None).

    Cached per (module, scope), so the compiled programs of `generate` are reused.
    """

    def apply(params, **kwargs):
        return llm.apply({"params": params if scope is None else params[scope]}, **kwargs)

    return Decoder(apply=apply, init_cache=llm.init_cache)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """logits: float[..., V]. Sets all but the k largest (ties at the k-th kept) to -inf."""
    import jax
    import jax.numpy as jnp

    if k <= 0 or k >= logits.shape[-1]:
        return logits
    threshold = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < threshold, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """logits: float[..., V]. Keeps the smallest set of most likely tokens whose probability
    (under softmax(logits)) is ≥ p, sets the rest to -inf; ties with the least likely kept token
    are kept too."""
    import jax
    import jax.numpy as jnp

    if p >= 1:
        return logits
    sorted_logits = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
    probabilities = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probabilities, axis=-1) - probabilities
    num_kept = jnp.maximum(jnp.sum(mass_before < p, axis=-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(sorted_logits, num_kept - 1, axis=-1)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def sample_tokens(logits: jax.Array, keys: jax.Array, decoding: Decoding) -> jax.Array:
    """logits: float[B, V]; keys: key[B] (one per example). Returns int32[B]."""
    import jax
    import jax.numpy as jnp

    if decoding.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / decoding.temperature
    logits = top_p_filter(top_k_filter(logits, decoding.top_k), decoding.top_p)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


class _State(NamedTuple):
    step: Any  # int32[]: index of the next token to write
    tokens: Any  # int32[B, N]
    lengths: Any  # int32[B]
    finished: Any  # bool[B]
    positions: Any  # int32[B]: position of the next token
    cache: Any


@functools.cache
def _compiled_generate(
    decoder: Decoder,
    max_new_tokens: int,
    decoding: Decoding,
    stop_ids: tuple[int, ...] = (),
) -> Callable:
    """One jitted program per (decoder, N, decoding, stop ids); jax.jit adds one per input shapes."""
    import jax
    import jax.numpy as jnp

    def ends_with_stop(tokens, step):
        """bool[B]: the tokens written at [step - k + 1, step] are `stop_ids` (k of them)."""
        width = len(stop_ids)
        if not width:
            return jnp.zeros(tokens.shape[0], bool)
        start = jnp.maximum(step - width + 1, 0)
        window = jax.lax.dynamic_slice_in_dim(tokens, start, width, axis=1)
        return (step >= width - 1) & jnp.all(window == jnp.asarray(stop_ids, jnp.int32), axis=1)

    def choose(state: _State, logits, example_keys, eos_id, pad_id) -> _State:
        step_keys = jax.vmap(lambda key: jax.random.fold_in(key, state.step))(example_keys)
        token = sample_tokens(logits, step_keys, decoding)
        token = jnp.where(state.finished, pad_id, token)
        tokens = state.tokens.at[:, state.step].set(token)
        finished = state.finished | (token == eos_id)  # eos_id -1: never
        finished = finished | (~state.finished & ends_with_stop(tokens, state.step))
        return state._replace(
            step=state.step + 1,
            tokens=tokens,
            lengths=state.lengths + (~state.finished).astype(jnp.int32),
            finished=finished,
        )

    def run(
        params, prompt_tokens, prompt_embeddings, prompt_mask, seed, example_indices, ids, extra
    ):
        eos_id, pad_id = ids
        prompt = prompt_tokens if prompt_embeddings is None else prompt_embeddings
        batch_size, prompt_length = prompt.shape[:2]
        prompt_mask = prompt_mask.astype(bool)
        positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0).astype(jnp.int32)
        cache = decoder.init_cache(batch_size, prompt_length + max_new_tokens)
        output = decoder.apply(
            params,
            tokens=prompt_tokens,
            embeddings=prompt_embeddings,
            positions=positions,
            kv_mask=prompt_mask,
            cache=cache,
            **extra,
        )
        base_key = jax.random.key(seed)
        example_keys = jax.vmap(lambda index: jax.random.fold_in(base_key, index))(example_indices)
        state = _State(
            step=jnp.zeros((), jnp.int32),
            tokens=jnp.full((batch_size, max_new_tokens), pad_id, jnp.int32),
            lengths=jnp.zeros((batch_size,), jnp.int32),
            finished=jnp.zeros((batch_size,), bool),
            positions=positions[:, -1] + 1,
            cache=output.cache,
        )
        state = choose(state, output.logits[:, -1], example_keys, eos_id, pad_id)

        def keep_going(state: _State):
            return (state.step < max_new_tokens) & ~jnp.all(state.finished)

        def decode_step(state: _State) -> _State:
            output = decoder.apply(
                params,
                tokens=state.tokens[:, state.step - 1, None],
                positions=state.positions[:, None],
                kv_mask=jnp.ones((batch_size, 1), bool),  # generated pads are real tokens
                cache=state.cache,
                **extra,
            )
            state = state._replace(positions=state.positions + 1, cache=output.cache)
            return choose(state, output.logits[:, -1], example_keys, eos_id, pad_id)

        state = jax.lax.while_loop(keep_going, decode_step, state)
        return GenerateOutput(tokens=state.tokens, lengths=state.lengths)

    return jax.jit(run)


def generate(
    decoder: Decoder,
    params: Any,
    prompt_tokens: jax.Array | None,
    prompt_mask: jax.Array,
    *,
    max_new_tokens: int,
    eos_id: int | None,
    pad_id: int,
    decoding: Decoding = Decoding(),
    seed: int = 0,
    example_indices: jax.Array | None = None,
    prompt_embeddings: jax.Array | None = None,
    decoder_inputs: dict[str, Any] | None = None,
    stop_ids: tuple[int, ...] = (),
) -> GenerateOutput:
    """Generates up to `max_new_tokens` tokens after each left-padded prompt.

    The cache is prefilled with the prompts, then one token per step is decoded in a jitted
    `jax.lax.while_loop` that ends early once every example has emitted `eos_id` or `stop_ids`.
    Sampling keys (INTERFACES.md §5): example b at step s draws with
    `fold_in(fold_in(key(seed), example_indices[b]), s)`, so batching does not change samples.

    Args:
      decoder: the model (see `Decoder`; `llm_decoder` for a Llama-API LM).
      params: passed to `decoder.apply` unchanged.
      prompt_tokens: int[B, T], left-padded; or None with `prompt_embeddings` float[B, T, D]
        (input embeddings, e.g. with image tokens spliced in). Every prompt needs ≥ 1 real token.
      prompt_mask: int or bool[B, T] — 1 for real prompt tokens, 0 for left padding.
      max_new_tokens: N, the generated length; the cache holds T + N slots.
      eos_id: an example stops after emitting it (later tokens are `pad_id`); None: never stops.
      pad_id: written after EOS.
      decoding: greedy (default) or sampling settings.
      seed: the sampling seed. seed, eos_id and pad_id are traced: changing them does not
        recompile.
      example_indices: int[B], each example's index for its sampling key; default arange(B).
      decoder_inputs: extra keyword arguments for every `decoder.apply` call (e.g. media).
      stop_ids: an example also stops once its last generated tokens are these ids (a stop
        string such as LLaVA's "###", tokenised); they are kept in `tokens` and `lengths`.

    Returns:
      GenerateOutput(tokens int32[B, N], lengths int32[B]).
    """
    import jax.numpy as jnp

    if (prompt_tokens is None) == (prompt_embeddings is None):
        raise ValueError("generate: pass exactly one of prompt_tokens and prompt_embeddings")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be ≥ 1, got {max_new_tokens}")
    batch_size = (prompt_tokens if prompt_embeddings is None else prompt_embeddings).shape[0]
    if example_indices is None:
        example_indices = jnp.arange(batch_size, dtype=jnp.int32)
    run = _compiled_generate(decoder, max_new_tokens, decoding, tuple(int(i) for i in stop_ids))
    ids = jnp.asarray([-1 if eos_id is None else eos_id, pad_id], jnp.int32)
    return run(
        params,
        None if prompt_tokens is None else jnp.asarray(prompt_tokens, jnp.int32),
        prompt_embeddings,
        jnp.asarray(prompt_mask),
        jnp.asarray(seed, jnp.uint32),
        jnp.asarray(example_indices, jnp.int32),
        (ids[0], ids[1]),
        dict(decoder_inputs or {}),
    )
