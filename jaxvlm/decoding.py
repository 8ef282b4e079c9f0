"""The KV-cache decode loop: `generate(decoder, params, prompt_tokens, prompt_mask, ...)`.

Greedy, temperature, top-k and top-p decoding, and beam search, of left-padded prompts (token ids,
or input embeddings with image tokens spliced in) by any `Decoder`, two callables so the loop never
knows a parameter layout (`llm_decoder` wraps a Llama-API LM). The cache is prefilled with the
prompts, then one token per step is decoded in a jitted `jax.lax.while_loop` that ends early once
every example has emitted EOS or the stop ids (a template's stop string, tokenised). It is the one
decode path: the evaluators and `generate.answer` run it through `predict.generate_fn`. Sampling
keys are per example (INTERFACES.md §5), so batching does not change samples.

Beam search (`Decoding(num_beams=K)`, K > 1) follows transformers 5.23
`GenerationMixin._beam_search` step for step (generation/utils.py, `_get_top_k_continuations`,
`_get_running_beams_for_next_iteration`, `_update_finished_beams`, `_check_early_stop_heuristic`,
`_beam_search_has_unfinished_sequences`), so that it gives HF's token ids:
  1. running beams start with log-prob 0 for beam 0 and -1e9 for the others (only beam 0's
     tokens compete at the first step); finished hypotheses start at -1e9;
  2. each step, `log_softmax` of the logits (EOS at -inf while fewer than `min_new_tokens` are
     generated) is added to each running beam's score, and the top C = max(2, 1 + #EOS) · K
     candidates over (beam, token) are kept;
  3. a candidate "hits" when its token is an EOS (or it ends with the stop ids), and every
     candidate hits at the last step (max_new_tokens);
  4. the next running beams are the top K candidates after adding -1e9 to the ones that hit;
  5. a hit among the first K candidates becomes a finished hypothesis scored
     `sum log p / L ** length_penalty`, L the generated length counting the EOS and not the
     prompt; it is refused (-1e9 added) once the example's K finished slots are full and
     `early_stopping is True`, or once improvement is impossible; the K best finished are kept;
  6. the cache is reordered by the chosen beams' origins;
  7. improvement is impossible for an example (for good) when no finished slot is empty and the
     best running score / L' ** length_penalty is not above the worst finished score, with
     L' = the generated length, or max_new_tokens when `early_stopping == "never"` and
     length_penalty > 0;
  8. the loop stops when no example can improve, or (early_stopping True) every example has K
     finished hypotheses, or every candidate of the step hit; the output is the best finished
     hypothesis per example (or the `num_return_sequences` best).
The prompts are prefilled once (B rows) and the cache is then repeated to B·K rows; the float32
arithmetic (the -1e9 sums, the divisions by L ** length_penalty computed in double then rounded)
is HF's, so scores tie and round as there. jax is imported inside the functions, so that importing
this module, and `python -m jaxvlm.generate --help`, stay instant.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import flax.linen as nn
    import jax

__all__ = [
    "EARLY_STOPPING",
    "Decoder",
    "Decoding",
    "GenerateOutput",
    "generate",
    "llm_decoder",
    "sample_tokens",
    "top_k_filter",
    "top_p_filter",
]

# HF's `early_stopping` values: True stops an example once it has num_beams finished hypotheses;
# False stops once the heuristic says the best running beam cannot beat the worst finished one;
# "never" runs until that is impossible (the canonical beam search, with length_penalty 0).
EARLY_STOPPING = (True, False, "never")
# HF's "minus infinity" in beam scores: finite, so that sums with it stay ordered.
_LARGE_NEGATIVE = -1.0e9


@dataclasses.dataclass(frozen=True)
class Decoding:
    """How the next token is chosen from the logits.

    temperature: 0 is greedy (argmax; top_k and top_p are ignored); > 0 samples from
      softmax(logits / temperature) after filtering.
    top_k: keep the k most likely tokens (0: no limit).
    top_p: keep the smallest set of most likely tokens whose probability is ≥ top_p (1: all).
    num_beams: K > 1 is beam search (needs temperature 0); 1 is the greedy or sampling loop.
    length_penalty: α in a finished hypothesis's score `sum log p / length ** α` (beam search).
    early_stopping: True, False or "never" (beam search; see `EARLY_STOPPING` and the module
      docstring).
    num_return_sequences: R ≤ num_beams best hypotheses returned per example (beam search).
    min_new_tokens: EOS cannot be generated before this many new tokens (HF's
      `MinNewTokensLengthLogitsProcessor`); any decoding.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    min_new_tokens: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"Decoding.temperature must be ≥ 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"Decoding.top_k must be ≥ 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"Decoding.top_p must be in (0, 1], got {self.top_p}")
        if self.num_beams < 1:
            raise ValueError(f"Decoding.num_beams must be ≥ 1, got {self.num_beams}")
        if self.num_beams > 1 and self.temperature > 0:
            raise ValueError(
                f"Decoding.num_beams={self.num_beams} is beam search, which is deterministic: "
                f"it needs temperature 0, got {self.temperature}"
            )
        # `x is y` for True/False: 1 and 0 are not early_stopping values (as in HF's checks).
        if not any(self.early_stopping is value for value in (True, False)) and (
            self.early_stopping != "never"
        ):
            raise ValueError(
                "Decoding.early_stopping must be True, False or 'never', got "
                f"{self.early_stopping!r}"
            )
        if not 1 <= self.num_return_sequences <= self.num_beams:
            raise ValueError(
                f"Decoding.num_return_sequences must be in [1, num_beams={self.num_beams}], "
                f"got {self.num_return_sequences}"
            )
        if self.min_new_tokens < 0:
            raise ValueError(f"Decoding.min_new_tokens must be ≥ 0, got {self.min_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def beam_search(self) -> bool:
        return self.num_beams > 1


@dataclasses.dataclass(frozen=True)
class Decoder:
    """A model as `generate` sees it: two callables, so the loop never knows a parameter layout.

    apply: `(params, *, tokens=None, embeddings=None, positions, kv_mask, cache, **extra)
      -> DecoderOutput` — tokens int[B, T] or embeddings float[B, T, D]; positions int[B, T];
      kv_mask bool[B, T]; `extra` are the `decoder_inputs` given to `generate` (e.g. media for
      cross-attention, or an encoder's outputs float[B, S, D] and their mask bool[B, S]), passed
      to every call (beam search repeats every array whose leading dimension is B to B·K rows).
    init_cache: `(batch_size, max_length) -> cache`, an empty cache (no parameters needed). Any
      pytree: beam search finds each array's batch axis as the one whose size follows
      `batch_size`, and reorders and repeats the cache along it (arrays without one, such as a
      write index, are shared by all rows).
    """

    apply: Callable[..., Any]
    init_cache: Callable[[int, int], Any]


class GenerateOutput(NamedTuple):
    """tokens: int32[B·R, max_new_tokens] — generated ids, `pad_id` after an example's EOS; R is
      `num_return_sequences` (1 unless beam search asks for more: example b's r-th best is row
      b·R + r, as HF orders them).
    lengths: int32[B·R] — generated tokens per row, counting its EOS (or stop ids).
    scores: float32[B·R] — beam search: each hypothesis's score, `sum log p / length **
      length_penalty` (HF's `sequences_scores`); None otherwise."""

    tokens: Any
    lengths: Any
    scores: Any = None


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


def _is_any(tokens: jax.Array, ids: jax.Array) -> jax.Array:
    """tokens: int[...]; ids: int32[E]. bool[...]: the token is one of `ids` (E = 0: none)."""
    import jax.numpy as jnp

    return jnp.any(tokens[..., None] == ids, axis=-1)


def _ends_with(tokens: jax.Array, step: jax.Array, stop_ids: tuple[int, ...]) -> jax.Array:
    """tokens: int32[..., N]. bool[...]: the tokens written at [step - k + 1, step] are
    `stop_ids` (k of them)."""
    import jax
    import jax.numpy as jnp

    width = len(stop_ids)
    if not width:
        return jnp.zeros(tokens.shape[:-1], bool)
    start = jnp.maximum(step - width + 1, 0)
    window = jax.lax.dynamic_slice_in_dim(tokens, start, width, axis=-1)
    return (step >= width - 1) & jnp.all(window == jnp.asarray(stop_ids, jnp.int32), axis=-1)


def _mask_early_eos(scores: jax.Array, step, min_new_tokens, eos_ids) -> jax.Array:
    """scores: float[..., V]. EOS at -inf while fewer than `min_new_tokens` are generated."""
    import jax.numpy as jnp

    is_eos = _is_any(jnp.arange(scores.shape[-1]), eos_ids)
    return jnp.where((step < min_new_tokens) & is_eos, -jnp.inf, scores)


class _State(NamedTuple):
    step: Any  # int32[]: index of the next token to write
    tokens: Any  # int32[B, N]
    lengths: Any  # int32[B]
    finished: Any  # bool[B]
    positions: Any  # int32[B]: position of the next token
    cache: Any


def _prefill(decoder, params, prompt_tokens, prompt_embeddings, prompt_mask, max_length, extra):
    """Runs the prompts into a fresh cache. Returns (logits float32[B, V] of each prompt's last
    token, the cache, the next position int32[B])."""
    import jax.numpy as jnp

    prompt = prompt_tokens if prompt_embeddings is None else prompt_embeddings
    batch_size = prompt.shape[0]
    prompt_mask = prompt_mask.astype(bool)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0).astype(jnp.int32)
    output = decoder.apply(
        params,
        tokens=prompt_tokens,
        embeddings=prompt_embeddings,
        positions=positions,
        kv_mask=prompt_mask,
        cache=decoder.init_cache(batch_size, max_length),
        **extra,
    )
    return output.logits[:, -1].astype(jnp.float32), output.cache, positions[:, -1] + 1


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

    def choose(state: _State, logits, example_keys, eos_ids, pad_id, min_new_tokens) -> _State:
        step_keys = jax.vmap(lambda key: jax.random.fold_in(key, state.step))(example_keys)
        logits = _mask_early_eos(logits, state.step, min_new_tokens, eos_ids)
        token = sample_tokens(logits, step_keys, decoding)
        token = jnp.where(state.finished, pad_id, token)
        tokens = state.tokens.at[:, state.step].set(token)
        finished = state.finished | _is_any(token, eos_ids)
        finished = finished | (~state.finished & _ends_with(tokens, state.step, stop_ids))
        return state._replace(
            step=state.step + 1,
            tokens=tokens,
            lengths=state.lengths + (~state.finished).astype(jnp.int32),
            finished=finished,
        )

    def run(
        params, prompt_tokens, prompt_embeddings, prompt_mask, seed, example_indices, ids, extra
    ):
        eos_ids, pad_id, min_new_tokens = ids
        batch_size, prompt_length = prompt_mask.shape
        logits, cache, positions = _prefill(
            decoder,
            params,
            prompt_tokens,
            prompt_embeddings,
            prompt_mask,
            prompt_length + max_new_tokens,
            extra,
        )
        base_key = jax.random.key(seed)
        example_keys = jax.vmap(lambda index: jax.random.fold_in(base_key, index))(example_indices)
        state = _State(
            step=jnp.zeros((), jnp.int32),
            tokens=jnp.full((batch_size, max_new_tokens), pad_id, jnp.int32),
            lengths=jnp.zeros((batch_size,), jnp.int32),
            finished=jnp.zeros((batch_size,), bool),
            positions=positions,
            cache=cache,
        )
        state = choose(state, logits, example_keys, eos_ids, pad_id, min_new_tokens)

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
            return choose(
                state, output.logits[:, -1], example_keys, eos_ids, pad_id, min_new_tokens
            )

        state = jax.lax.while_loop(keep_going, decode_step, state)
        return GenerateOutput(tokens=state.tokens, lengths=state.lengths)

    return jax.jit(run)


class _BeamState(NamedTuple):
    """Beam search state; B examples, K beams, N = max_new_tokens (HF's names in comments)."""

    step: Any  # int32[]: tokens generated so far (cur_len - decoder_prompt_len)
    running_tokens: Any  # int32[B, K, N]: running_sequences (generated part), pad_id after
    running_scores: Any  # float32[B, K]: running_beam_scores, summed log-probs
    finished_tokens: Any  # int32[B, K, N]: sequences
    finished_scores: Any  # float32[B, K]: beam_scores, length-penalised; best first
    finished_lengths: Any  # int32[B, K]
    is_finished: Any  # bool[B, K]: is_sent_finished
    improvable: Any  # bool[B]: is_early_stop_heuristic_unsatisfied
    all_hit: Any  # bool[]: every candidate of the last step hit a stopping criterion
    positions: Any  # int32[B·K]: position of the next token
    cache: Any  # B·K rows, beam k of example b in row b·K + k


def _cache_batch_axes(decoder: Decoder, max_length: int) -> Any:
    """Per cache array, the axis whose size is the batch size (-1: none, the array is shared):
    found by comparing the shapes of empty caches for batch sizes 2 and 3."""
    import jax

    two = jax.eval_shape(lambda: decoder.init_cache(2, max_length))
    three = jax.eval_shape(lambda: decoder.init_cache(3, max_length))

    def batch_axis(a, b):
        axes = [i for i, (m, n) in enumerate(zip(a.shape, b.shape, strict=True)) if m != n]
        if len(axes) > 1:
            raise ValueError(f"a cache array of shape {a.shape} has more than one batch axis")
        return axes[0] if axes else -1

    return jax.tree.map(batch_axis, two, three)


@functools.cache
def _compiled_beam_search(
    decoder: Decoder,
    max_new_tokens: int,
    num_beams: int,
    early_stopping_true: bool,
    num_return_sequences: int,
    stop_ids: tuple[int, ...] = (),
) -> Callable:
    """One jitted beam search per static setting; length_penalty enters through the traced
    divisor tables, and early_stopping False vs "never" only through them, so changing those
    does not recompile."""
    import jax
    import jax.numpy as jnp

    n, k = max_new_tokens, num_beams

    def gather(values, indices):
        """values: [B, X, ...]; indices: int[B, Y] along axis 1. Returns [B, Y, ...]."""
        indices = indices.reshape(indices.shape + (1,) * (values.ndim - 2))
        return jnp.take_along_axis(values, indices, axis=1)

    def along_batch(cache, axes, fn):
        return jax.tree.map(lambda a, axis: a if axis < 0 else fn(a, axis), cache, axes)

    def select(state: _BeamState, logits, cache, tables) -> _BeamState:
        """One step of HF's loop body after the forward pass (steps b–g), from logits
        float32[B·K, V] of the running beams."""
        eos_ids, min_new_tokens, finish_divisors, heuristic_divisors, cache_axes = tables
        batch_size, step = state.running_scores.shape[0], state.step
        vocab = logits.shape[-1]
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        log_probs = _mask_early_eos(log_probs, step, min_new_tokens, eos_ids)
        scores = log_probs.reshape(batch_size, k, vocab) + state.running_scores[..., None]
        num_candidates = max(2, 1 + eos_ids.shape[0]) * k  # HF's beams_to_keep
        # _get_top_k_continuations
        candidate_scores, flat = jax.lax.top_k(
            scores.reshape(batch_size, k * vocab), num_candidates
        )
        origins, candidate_tokens = flat // vocab, (flat % vocab).astype(jnp.int32)
        candidates = gather(state.running_tokens, origins)
        candidates = candidates.at[:, :, step].set(candidate_tokens)
        hit = (
            _is_any(candidate_tokens, eos_ids)
            | _ends_with(candidates, step, stop_ids)
            | (step + 1 >= n)
        )
        # _get_running_beams_for_next_iteration
        running_candidates = candidate_scores + hit.astype(jnp.float32) * _LARGE_NEGATIVE
        running_scores, keep = jax.lax.top_k(running_candidates, k)
        running_tokens = gather(candidates, keep)
        running_origins = gather(origins, keep)
        # _update_finished_beams: only the first K candidates may finish
        did_finish = hit & (jnp.arange(num_candidates) < k)
        penalised = candidate_scores / finish_divisors[step]
        full = jnp.all(state.is_finished, axis=1, keepdims=True) & early_stopping_true
        penalised = penalised + full.astype(jnp.float32) * _LARGE_NEGATIVE
        penalised = penalised + (~state.improvable[:, None]).astype(jnp.float32) * _LARGE_NEGATIVE
        penalised = penalised + (~did_finish).astype(jnp.float32) * _LARGE_NEGATIVE
        merged_scores = jnp.concatenate([state.finished_scores, penalised], axis=1)
        finished_scores, best = jax.lax.top_k(merged_scores, k)
        candidate_lengths = jnp.full(candidate_scores.shape, step + 1, jnp.int32)
        pick = lambda old, new: gather(jnp.concatenate([old, new], axis=1), best)
        finished_tokens = pick(state.finished_tokens, candidates)
        finished_lengths = pick(state.finished_lengths, candidate_lengths)
        is_finished = pick(state.is_finished, did_finish)
        # the cache follows the chosen beams (HF's reorder_cache)
        rows = (jnp.arange(batch_size)[:, None] * k + running_origins).reshape(-1)
        cache = along_batch(cache, cache_axes, lambda a, axis: jnp.take(a, rows, axis=axis))
        # _check_early_stop_heuristic, with cur_len already advanced
        best_possible = running_scores[:, :1] / heuristic_divisors[step]
        worst_finished = jnp.where(
            is_finished, jnp.min(finished_scores, axis=1, keepdims=True), _LARGE_NEGATIVE
        )
        improvable = state.improvable & jnp.any(best_possible > worst_finished, axis=1)
        return _BeamState(
            step=step + 1,
            running_tokens=running_tokens,
            running_scores=running_scores,
            finished_tokens=finished_tokens,
            finished_scores=finished_scores,
            finished_lengths=finished_lengths,
            is_finished=is_finished,
            improvable=improvable,
            all_hit=jnp.all(hit),
            positions=state.positions,
            cache=cache,
        )

    def keep_going(state: _BeamState):
        """_beam_search_has_unfinished_sequences (over the whole batch, as HF)."""
        all_full = jnp.all(state.is_finished) & early_stopping_true
        return (state.step < n) & jnp.any(state.improvable) & ~all_full & ~state.all_hit

    def run(params, prompt_tokens, prompt_embeddings, prompt_mask, ids, tables, extra):
        pad_id, eos_ids, min_new_tokens = ids
        batch_size, prompt_length = prompt_mask.shape
        max_length = prompt_length + n
        logits, cache, positions = _prefill(
            decoder, params, prompt_tokens, prompt_embeddings, prompt_mask, max_length, extra
        )
        # Prefilled once per example, then repeated to the K beams (rows b·K + k).
        cache_axes = _cache_batch_axes(decoder, max_length)
        cache = along_batch(cache, cache_axes, lambda a, axis: jnp.repeat(a, k, axis=axis))
        beam_extra = jax.tree.map(
            lambda a: (
                jnp.repeat(a, k, axis=0)
                if getattr(a, "ndim", 0) and a.shape[0] == batch_size
                else a
            ),
            extra,
        )
        tables = (eos_ids, min_new_tokens, *tables, cache_axes)
        state = _BeamState(
            step=jnp.zeros((), jnp.int32),
            running_tokens=jnp.full((batch_size, k, n), pad_id, jnp.int32),
            running_scores=jnp.zeros((batch_size, k), jnp.float32).at[:, 1:].set(_LARGE_NEGATIVE),
            finished_tokens=jnp.full((batch_size, k, n), pad_id, jnp.int32),
            finished_scores=jnp.full((batch_size, k), _LARGE_NEGATIVE, jnp.float32),
            finished_lengths=jnp.zeros((batch_size, k), jnp.int32),
            is_finished=jnp.zeros((batch_size, k), bool),
            improvable=jnp.ones((batch_size,), bool),
            all_hit=jnp.zeros((), bool),
            positions=jnp.repeat(positions, k),
            cache=cache,
        )
        state = select(state, jnp.repeat(logits, k, axis=0), state.cache, tables)

        def decode_step(state: _BeamState) -> _BeamState:
            output = decoder.apply(
                params,
                tokens=state.running_tokens[:, :, state.step - 1].reshape(-1, 1),
                positions=state.positions[:, None],
                kv_mask=jnp.ones((batch_size * k, 1), bool),  # generated pads are real tokens
                cache=state.cache,
                **beam_extra,
            )
            state = state._replace(positions=state.positions + 1)
            return select(state, output.logits[:, -1], output.cache, tables)

        state = jax.lax.while_loop(keep_going, decode_step, state)
        r = num_return_sequences
        return GenerateOutput(
            tokens=state.finished_tokens[:, :r].reshape(batch_size * r, n),
            lengths=state.finished_lengths[:, :r].reshape(-1),
            scores=state.finished_scores[:, :r].reshape(-1),
        )

    return jax.jit(run)


def _length_divisors(decoding: Decoding, max_new_tokens: int):
    """(finish float32[N], heuristic float32[N]): at step t, a hypothesis finishing with t + 1
    tokens is divided by `finish[t]`, and the best running score by `heuristic[t]` (HF's
    `best_hypothetical_length ** length_penalty`). Python's int ** float in double, rounded to
    float32, as torch divides a float32 tensor by a Python float."""
    import numpy as np

    alpha = decoding.length_penalty
    lengths = range(1, max_new_tokens + 1)
    finish = np.asarray([length**alpha for length in lengths], np.float32)
    if decoding.early_stopping == "never" and alpha > 0.0:
        heuristic = np.full(max_new_tokens, max_new_tokens**alpha, np.float32)
    else:
        heuristic = finish
    return finish, heuristic


def generate(
    decoder: Decoder,
    params: Any,
    prompt_tokens: jax.Array | None,
    prompt_mask: jax.Array,
    *,
    max_new_tokens: int,
    eos_id: int | Sequence[int] | None,
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
    `jax.lax.while_loop` that ends early once every example has emitted `eos_id` or `stop_ids`
    (beam search: once HF's stopping rule holds; see the module docstring). Sampling keys
    (INTERFACES.md §5): example b at step s draws with
    `fold_in(fold_in(key(seed), example_indices[b]), s)`, so batching does not change samples.
    Greedy and beam search give the same ids batched and one by one.

    Args:
      decoder: the model (see `Decoder`; `llm_decoder` for a Llama-API LM).
      params: passed to `decoder.apply` unchanged.
      prompt_tokens: int[B, T], left-padded; or None with `prompt_embeddings` float[B, T, D]
        (input embeddings, e.g. with image tokens spliced in). Every prompt needs ≥ 1 real token.
      prompt_mask: int or bool[B, T] — 1 for real prompt tokens, 0 for left padding.
      max_new_tokens: N, the generated length; the cache holds T + N slots.
      eos_id: an example stops after emitting it (later tokens are `pad_id`); several ids (as a
        generation_config.json may list): any of them; None: never stops.
      pad_id: written after EOS.
      decoding: greedy (default), sampling or beam search settings, and min_new_tokens.
      seed: the sampling seed. seed, eos_id, pad_id, min_new_tokens and length_penalty are
        traced: changing them does not recompile.
      example_indices: int[B], each example's index for its sampling key; default arange(B).
      decoder_inputs: extra keyword arguments for every `decoder.apply` call (e.g. media, or an
        encoder's outputs); beam search repeats each array with leading dimension B to B·K rows.
      stop_ids: an example also stops once its last generated tokens are these ids (a stop
        string such as LLaVA's "###", tokenised); they are kept in `tokens` and `lengths`. In
        beam search they end a hypothesis as EOS does.

    Returns:
      GenerateOutput(tokens int32[B·R, N], lengths int32[B·R], scores float32[B·R] or None); R
      is `decoding.num_return_sequences`, 1 unless beam search asks for more.
    """
    import jax.numpy as jnp

    if (prompt_tokens is None) == (prompt_embeddings is None):
        raise ValueError("generate: pass exactly one of prompt_tokens and prompt_embeddings")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be ≥ 1, got {max_new_tokens}")
    batch_size = (prompt_tokens if prompt_embeddings is None else prompt_embeddings).shape[0]
    if eos_id is None:
        eos_ids = []
    elif isinstance(eos_id, int) or getattr(eos_id, "ndim", None) == 0:
        eos_ids = [int(eos_id)]
    else:
        eos_ids = [int(i) for i in eos_id]
    stop_ids = tuple(int(i) for i in stop_ids)
    prompt_tokens = None if prompt_tokens is None else jnp.asarray(prompt_tokens, jnp.int32)
    prompt_mask = jnp.asarray(prompt_mask)
    extra = dict(decoder_inputs or {})
    min_new_tokens = jnp.asarray(decoding.min_new_tokens, jnp.int32)
    eos_array = jnp.asarray(eos_ids, jnp.int32)  # int32[0] without EOS: no token matches
    if decoding.beam_search:
        run = _compiled_beam_search(
            decoder,
            max_new_tokens,
            decoding.num_beams,
            decoding.early_stopping is True,
            decoding.num_return_sequences,
            stop_ids,
        )
        divisors = tuple(jnp.asarray(d) for d in _length_divisors(decoding, max_new_tokens))
        ids = (jnp.asarray(pad_id, jnp.int32), eos_array, min_new_tokens)
        return run(params, prompt_tokens, prompt_embeddings, prompt_mask, ids, divisors, extra)
    if example_indices is None:
        example_indices = jnp.arange(batch_size, dtype=jnp.int32)
    # The beam-only fields do not change the greedy/sampling program: one compile for all.
    loop_decoding = dataclasses.replace(decoding, min_new_tokens=0, length_penalty=1.0)
    loop_decoding = dataclasses.replace(loop_decoding, early_stopping=False)
    run = _compiled_generate(decoder, max_new_tokens, loop_decoding, stop_ids)
    return run(
        params,
        prompt_tokens,
        prompt_embeddings,
        prompt_mask,
        jnp.asarray(seed, jnp.uint32),
        jnp.asarray(example_indices, jnp.int32),
        (eos_array, jnp.asarray(pad_id, jnp.int32), min_new_tokens),
        extra,
    )
