"""The decode loop: cache vs full forwards, batching, padding, EOS, stop ids, sampling, top-k/p."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxvlm.decoding import Decoding, generate, llm_decoder, sample_tokens, top_p_filter
from jaxvlm.llms.llama import Llama
from jaxvlm.models import LanguageModel

VOCAB, NEW_TOKENS, PAD = 64, 8, 0
PROMPTS = [[5, 9, 3], [7, 1, 2, 8, 4, 6], [11, 12, 13, 14, 15, 16]]  # two lengths: two compiles
SAMPLING = Decoding(temperature=1.0, top_k=20, top_p=0.9)


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def language_model():
    model = LanguageModel(
        llm=Llama(
            vocab_size=VOCAB,
            dim=32,
            depth=2,
            num_heads=4,
            num_kv_heads=2,
            mlp_dim=64,
            rope_theta=100.0,
        )  # fmt: skip
    )
    tokens = jnp.zeros((1, 4), jnp.int32)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens))["params"]
    rng = np.random.default_rng(0)  # scaled random params: logits far from flat
    params = jax.tree.map(lambda s: 0.5 * rng.standard_normal(s.shape, np.float32), shapes)
    return model, params


def _left_pad(prompts):
    length = max(map(len, prompts))
    tokens = np.full((len(prompts), length), PAD, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, length - len(prompt) :] = prompt
        mask[row, length - len(prompt) :] = 1
    return tokens, mask


def _generate(language_model, prompts, **kwargs):
    model, params = language_model
    tokens, mask = _left_pad(prompts)
    kwargs = dict(max_new_tokens=NEW_TOKENS, eos_id=None, pad_id=PAD) | kwargs
    output = generate(llm_decoder(model.llm), params, tokens, mask, **kwargs)
    return np.asarray(output.tokens), np.asarray(output.lengths)


def test_greedy_cache_equals_full_forwards(language_model):
    model, params = language_model
    tokens, lengths = _generate(language_model, PROMPTS[1:2])
    np.testing.assert_array_equal(lengths, [NEW_TOKENS])
    # One compile: right-pad to a fixed length; causal attention makes the padding invisible.
    forward = jax.jit(lambda p, t: model.apply({"params": p}, t).logits)
    sequence = list(PROMPTS[1])
    for step in range(NEW_TOKENS):
        padded = np.full((1, len(PROMPTS[1]) + NEW_TOKENS), PAD, np.int32)
        padded[0, : len(sequence)] = sequence
        next_token = int(jnp.argmax(forward(params, padded)[0, len(sequence) - 1]))
        assert tokens[0, step] == next_token, f"step {step}"
        sequence.append(next_token)


@pytest.mark.parametrize("decoding", [Decoding(), SAMPLING], ids=["greedy", "sampling"])
def test_batched_left_padded_equals_one_by_one(language_model, decoding):
    batched, batched_lengths = _generate(language_model, PROMPTS, decoding=decoding, seed=3)
    for index, prompt in enumerate(PROMPTS):
        alone, alone_lengths = _generate(
            language_model, [prompt], decoding=decoding, seed=3, example_indices=[index]
        )
        np.testing.assert_array_equal(batched[index], alone[0], err_msg=f"example {index}")
        np.testing.assert_array_equal(batched_lengths[index], alone_lengths[0])


def test_eos_stops_an_example(language_model):
    free, _ = _generate(language_model, PROMPTS)
    eos = int(free[0, 3])
    stopped, lengths = _generate(language_model, PROMPTS, eos_id=eos)
    for row in range(len(PROMPTS)):
        hits = np.flatnonzero(free[row] == eos)
        length = int(hits[0]) + 1 if hits.size else NEW_TOKENS
        assert lengths[row] == length
        np.testing.assert_array_equal(stopped[row, :length], free[row, :length])
        assert (stopped[row, length:] == PAD).all()
    assert lengths[0] <= 4


def test_all_finished_pads_to_the_end(language_model):
    free, _ = _generate(language_model, PROMPTS[:1])
    stopped, lengths = _generate(language_model, PROMPTS[:1], eos_id=int(free[0, 0]))
    np.testing.assert_array_equal(lengths, [1])
    np.testing.assert_array_equal(stopped[0], [free[0, 0]] + [PAD] * (NEW_TOKENS - 1))


def test_top_k_one_is_greedy_and_seeds(language_model):
    greedy, _ = _generate(language_model, PROMPTS)
    top_one, _ = _generate(language_model, PROMPTS, decoding=Decoding(1.0, top_k=1), seed=7)
    np.testing.assert_array_equal(top_one, greedy)
    hot = Decoding(temperature=2.0)
    first, _ = _generate(language_model, PROMPTS, decoding=hot, seed=0)
    again, _ = _generate(language_model, PROMPTS, decoding=hot, seed=0)
    other, _ = _generate(language_model, PROMPTS, decoding=hot, seed=1)
    np.testing.assert_array_equal(first, again)
    assert (first != other).any()


def test_top_p_filter_keeps_smallest_set_reaching_p():
    logits = jnp.log(jnp.asarray([[0.1, 0.4, 0.2, 0.3]]))
    for p, kept in [(0.3, [1]), (0.6, [1, 3]), (0.75, [1, 2, 3]), (0.95, [0, 1, 2, 3])]:
        filtered = top_p_filter(logits, p)
        np.testing.assert_array_equal(np.flatnonzero(np.isfinite(filtered[0])), kept, f"p={p}")
        np.testing.assert_array_equal(filtered[0, kept], logits[0, kept])
    np.testing.assert_array_equal(top_p_filter(logits, 1.0), logits)


def test_sample_tokens_respects_filters():
    logits = jnp.log(jnp.asarray([[0.1, 0.4, 0.2, 0.3]] * 64))
    keys = jax.random.split(jax.random.key(0), 64)
    tokens = sample_tokens(logits, keys, Decoding(temperature=1.0, top_p=0.6))
    assert set(np.asarray(tokens).tolist()) == {1, 3}
    tokens = sample_tokens(logits, keys, Decoding(temperature=1.0, top_k=3))
    assert set(np.asarray(tokens).tolist()) == {1, 2, 3}


def test_prefill_from_embeddings_equals_tokens(language_model):
    model, params = language_model
    tokens, mask = _left_pad(PROMPTS)
    embeddings = model.apply({"params": params}, tokens, method=lambda m, t: m.llm.embed(t))
    from_tokens, _ = _generate(language_model, PROMPTS)
    output = generate(
        llm_decoder(model.llm), params, None, mask, prompt_embeddings=embeddings,
        max_new_tokens=NEW_TOKENS, eos_id=None, pad_id=PAD,
    )  # fmt: skip
    np.testing.assert_array_equal(output.tokens, from_tokens)


@pytest.fixture(scope="module")
def free_generations(language_model):
    """Greedy generations of PROMPTS without EOS or stop ids."""
    return _generate(language_model, PROMPTS)[0]


def _stop(free, row, start):
    """The two tokens example `row` generates at steps start, start + 1."""
    return tuple(free[row, start : start + 2].tolist())


def _stop_lengths(free, stop):
    """Per row, the generated length up to and including the first `stop` run (else all)."""
    stop, lengths = list(stop), []
    for row in free.tolist():
        ends = [
            i + len(stop) for i in range(len(row) - len(stop) + 1) if row[i : i + len(stop)] == stop
        ]
        lengths.append(ends[0] if ends else len(row))
    return lengths


@pytest.mark.parametrize("row, start", [(0, 1), (2, 0)], ids=["later", "first-tokens"])
def test_stop_ids_end_each_example_after_the_stop_sequence(
    language_model, free_generations, row, start
):
    free, stop = free_generations, _stop(free_generations, row, start)
    stopped, lengths = _generate(language_model, PROMPTS, stop_ids=stop)
    expected = _stop_lengths(free, stop)
    assert expected[row] <= start + 2
    np.testing.assert_array_equal(lengths, expected)  # the stop ids are counted
    for index, length in enumerate(expected):
        np.testing.assert_array_equal(stopped[index, :length], free[index, :length])
        assert (stopped[index, length:] == PAD).all(), f"example {index}"


def test_stop_ids_batched_equals_one_by_one(language_model, free_generations):
    """Example 0 stops early; the others go on as they do alone (alone: a batch of copies, so
    the shapes, and the compiled program, are those of the mixed batch)."""
    stop = _stop(free_generations, 0, 1)
    batched, batched_lengths = _generate(language_model, PROMPTS, stop_ids=stop)
    for index, prompt in enumerate(PROMPTS):
        copies = [prompt] * len(PROMPTS)
        if len(prompt) < max(map(len, PROMPTS)):  # the same left-padded shape
            copies[-1] = max(PROMPTS, key=len)
        alone, alone_lengths = _generate(language_model, copies, stop_ids=stop)
        np.testing.assert_array_equal(batched[index], alone[0], err_msg=f"example {index}")
        np.testing.assert_array_equal(batched_lengths[index], alone_lengths[0])


def test_eos_or_stop_whichever_comes_first(language_model, free_generations):
    free, stop = free_generations, _stop(free_generations, 0, 1)
    eos = int(free[1, 1])  # example 1 ends on EOS by step 1, example 0 on the stop at step 2
    stopped, lengths = _generate(language_model, PROMPTS, stop_ids=stop, eos_id=eos)
    by_stop = _stop_lengths(free, stop)
    for row in range(len(PROMPTS)):
        hits = np.flatnonzero(free[row] == eos)
        by_eos = int(hits[0]) + 1 if hits.size else NEW_TOKENS
        assert lengths[row] == min(by_eos, by_stop[row]), f"example {row}"
        np.testing.assert_array_equal(stopped[row, : lengths[row]], free[row, : lengths[row]])
        assert (stopped[row, lengths[row] :] == PAD).all()
    assert lengths[0] <= 3 and lengths[1] <= 2
