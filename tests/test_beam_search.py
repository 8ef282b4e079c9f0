"""Beam search with Hugging Face semantics (jaxvlm.decoding), and the generation defaults reader.

- Identical token ids (and lengths, and close scores) to transformers `generate` on the same
  weights: a tiny random `LlamaForCausalLM` built here, saved and imported; batch 2 with left
  padding; num_beams 1, 3, 5 × length_penalty -1, 0, 1 × early_stopping True, False, "never" ×
  min_new_tokens 0, 3; an EOS id that the model does emit, so that finished hypotheses matter.
- A hand-built decoder over a 3-token vocabulary (EOS = 2): a fixed random table of logits per
  prefix, no LLM. With enough beams and early_stopping="never", beam search is exhaustive, so its
  answer must be the best hypothesis of a brute-force enumeration (ties impossible: checked).
"""

import itertools
import json
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import assert_parity

from jaxvlm import decoding
from jaxvlm.decoding import Decoder, Decoding
from jaxvlm.importers import CheckpointImportError
from jaxvlm.importers.generation_config import GenerationDefaults, generation_defaults

VOCAB, NEW_TOKENS, PAD = 64, 8, 0
PENALTIES = (-1.0, 0.0, 1.0)
EARLY_STOPPING = (True, False, "never")
MIN_NEW_TOKENS = (0, 3)


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(transformers model, our decoder, our params, prompts int[2, 6], mask, eos ids): a tiny
    random Llama saved by transformers and imported; row 1 is left-padded by 2."""
    import flax.linen as nn
    import transformers

    from jaxvlm import importers
    from jaxvlm.llms.llama import Llama
    from jaxvlm.param_paths import flatten_params, unflatten_params

    directory = tmp_path_factory.mktemp("beam_llama")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        initializer_range=0.1,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(directory)
    arch = importers.architecture("llm", directory)
    model = Llama(**arch)
    boxed = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 4), np.int32))["params"]
    expected = {f"llm/{k}": v for k, v in flatten_params(nn.unbox(boxed)).items()}
    loaded = importers.load_component("llm", directory, {**arch, "scan_layers": True}, expected)
    params = unflatten_params({k[len("llm/") :]: v for k, v in loaded.items()})
    tokens = np.random.default_rng(0).integers(3, VOCAB, (2, 6)).astype(np.int32)
    mask = np.ones_like(tokens)
    tokens[1, :2], mask[1, :2] = PAD, 0
    greedy = _hf_generate(hf, tokens, mask, eos=None)[0]
    # Row 0's third greedy token: an EOS the model emits early. Row 1's first one is a second
    # EOS id for the multi-EOS test (there min_new_tokens=3 holds it back).
    return hf, decoding.llm_decoder(model, scope=None), params, tokens, mask, greedy


def _hf_generate(hf, tokens, mask, *, eos, num_beams=1, **kwargs):
    """transformers `generate` → (tokens int[B·R, N] padded with PAD, lengths, scores or None)."""
    with torch.no_grad():
        output = hf.generate(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            do_sample=False,
            num_beams=num_beams,
            max_new_tokens=NEW_TOKENS,
            pad_token_id=PAD,
            eos_token_id=eos,
            return_dict_in_generate=True,
            output_scores=True,
            **kwargs,
        )
    generated = output.sequences.numpy()[:, tokens.shape[1] :]
    if num_beams == 1:
        lengths = np.full(len(generated), generated.shape[1])
        eos_ids = [] if eos is None else np.atleast_1d(eos)
        for row, sequence in enumerate(generated):
            hits = np.flatnonzero(np.isin(sequence, eos_ids))
            lengths[row] = hits[0] + 1 if hits.size else generated.shape[1]
        scores = None
    else:  # beam_indices: -1 after each hypothesis's end
        lengths = (output.beam_indices.numpy() >= 0).sum(axis=1)
        scores = output.sequences_scores.numpy()
    padded = np.full((len(generated), NEW_TOKENS), PAD, np.int32)
    for row, length in enumerate(lengths):
        padded[row, :length] = generated[row, :length]
    return padded, lengths, scores


def _ours(llama, eos, decoding_settings, tokens=None, mask=None):
    _, decoder, params, all_tokens, all_mask, _ = llama
    output = decoding.generate(
        decoder,
        params,
        all_tokens if tokens is None else tokens,
        all_mask if mask is None else mask,
        max_new_tokens=NEW_TOKENS,
        eos_id=eos,
        pad_id=PAD,
        decoding=decoding_settings,
    )
    return np.asarray(output.tokens), np.asarray(output.lengths), output.scores


def _assert_same(ours, reference, context):
    tokens, lengths, scores = ours
    ref_tokens, ref_lengths, ref_scores = reference
    np.testing.assert_array_equal(lengths, ref_lengths, err_msg=f"lengths, {context}")
    np.testing.assert_array_equal(tokens, ref_tokens, err_msg=f"token ids, {context}")
    if ref_scores is not None:
        assert_parity(scores, ref_scores, context)


@pytest.mark.parametrize("num_beams", [1, 3, 5])
def test_ids_equal_transformers_generate(llama, num_beams):
    """Every (length_penalty, early_stopping, min_new_tokens) for one num_beams: the same ids,
    lengths and sequence scores as transformers; some hypotheses end at EOS before N tokens, and
    the settings change the answers (the comparison decides something)."""
    hf, *_, greedy = llama
    eos = int(greedy[0, 2])
    if num_beams == 1:  # greedy: length_penalty and early_stopping do not apply
        settings = [(1.0, False, m) for m in MIN_NEW_TOKENS]
    else:
        settings = list(itertools.product(PENALTIES, EARLY_STOPPING, MIN_NEW_TOKENS))
    answers = {}
    for alpha, early, min_new in settings:
        context = f"num_beams={num_beams} length_penalty={alpha} early_stopping={early}"
        context += f" min_new_tokens={min_new}"
        reference = _hf_generate(
            hf,
            *llama[3:5],
            eos=eos,
            num_beams=num_beams,
            min_new_tokens=min_new,
            **({} if num_beams == 1 else dict(length_penalty=alpha, early_stopping=early)),
        )
        ours = _ours(
            llama,
            eos,
            Decoding(
                num_beams=num_beams,
                length_penalty=alpha,
                early_stopping=early,
                min_new_tokens=min_new,
            ),
        )
        _assert_same(ours, reference, context)
        answers[alpha, early, min_new] = (ours[0].tobytes(), tuple(ours[1]))
    finished_early = [key for key, (_, lengths) in answers.items() if min(lengths) < NEW_TOKENS]
    assert finished_early, "no hypothesis ended at EOS: the test would not exercise finishing"
    held_back = [key for key in answers if answers[key] != answers[(*key[:2], 3)]]
    assert held_back, "min_new_tokens=3 changed no answer"
    assert len(set(answers.values())) >= (2 if num_beams == 1 else 3)
    if num_beams == 3:  # early_stopping=True stops with a shorter answer than False here
        assert answers[1.0, True, 0] != answers[1.0, False, 0]


def test_several_eos_ids_and_return_sequences_equal_transformers(llama):
    """eos_token_id as a list (3·K candidates per step, as HF keeps) and the 3 best hypotheses
    per example, in HF's order (example-major)."""
    hf, *_, greedy = llama
    eos = [int(greedy[0, 2]), int(greedy[1, 0])]
    for min_new in MIN_NEW_TOKENS:
        kwargs = dict(length_penalty=0.0, early_stopping="never", min_new_tokens=min_new)
        reference = _hf_generate(
            hf, *llama[3:5], eos=eos, num_beams=3, num_return_sequences=3, **kwargs
        )
        ours = _ours(llama, eos, Decoding(num_beams=3, num_return_sequences=3, **kwargs))
        assert ours[0].shape == (2 * 3, NEW_TOKENS)
        _assert_same(ours, reference, f"min_new_tokens={min_new}")
        if min_new == 0:
            assert reference[1][3] == 1  # row 1's best ends at once with the second EOS


def test_batched_equals_one_by_one(llama):
    """Each left-padded row alone (same padded length: one more compile) as in the batch."""
    *_, tokens, mask, greedy = llama
    settings = Decoding(num_beams=3, length_penalty=1.0, early_stopping=True)
    eos = int(greedy[0, 2])
    batched = _ours(llama, eos, settings)
    for row in range(2):
        alone = _ours(llama, eos, settings, tokens[row : row + 1], mask[row : row + 1])
        np.testing.assert_array_equal(alone[0][0], batched[0][row], err_msg=f"row {row}")
        assert alone[1][0] == batched[1][row]


# The hand-built decoder: vocabulary {0, 1, 2}, EOS 2. A sequence (prompt + generated) is coded
# in base 4 (digit = token + 1), and `table[code]` holds the logits of the next token, plus a
# per-example offset given as a decoder input (beam search must repeat it per beam).
TOY_VOCAB, TOY_EOS, TOY_NEW = 3, 2, 3
TOY_PROMPTS = [[0], [1, 0], [2, 1], [1]]


class _ToyOutput(NamedTuple):
    logits: Any  # float32[B, 1, 3]
    cache: Any


def _toy_init_cache(batch_size: int, max_length: int) -> dict:
    # "code" has a batch axis; "written" (a step counter) has none, so is shared by all rows.
    return {"code": jnp.zeros((batch_size,), jnp.int32), "written": jnp.zeros((), jnp.int32)}


def _toy_apply(table, *, tokens=None, embeddings=None, positions, kv_mask, cache, offsets):
    del embeddings, positions
    code = cache["code"]
    for i in range(tokens.shape[1]):
        code = jnp.where(kv_mask[:, i], code * 4 + tokens[:, i] + 1, code)
    logits = (table[code] + offsets)[:, None, :]
    return _ToyOutput(logits, {"code": code, "written": cache["written"] + tokens.shape[1]})


TOY_DECODER = Decoder(apply=_toy_apply, init_cache=_toy_init_cache)


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(7)
    length = max(map(len, TOY_PROMPTS)) + TOY_NEW
    table = (1.5 * rng.standard_normal((4**length, TOY_VOCAB))).astype(np.float32)
    offsets = (0.5 * rng.standard_normal((len(TOY_PROMPTS), TOY_VOCAB))).astype(np.float32)
    return table, offsets


def _toy_code(sequence) -> int:
    code = 0
    for token in sequence:
        code = code * 4 + token + 1
    return code


def _brute_force(table, offsets, prompt, alpha, min_new_tokens):
    """All hypotheses (ending in EOS, or N tokens long) best first: [(score, ids)], in float64."""
    hypotheses = []

    def extend(generated, total):
        logits = table[_toy_code(prompt + generated)].astype(np.float64) + offsets
        log_probs = logits - np.log(np.exp(logits).sum())
        for token in range(TOY_VOCAB):
            if token == TOY_EOS and len(generated) < min_new_tokens:
                continue
            sequence, score = generated + [token], total + log_probs[token]
            if token == TOY_EOS or len(sequence) == TOY_NEW:
                hypotheses.append((score / len(sequence) ** alpha, sequence))
            else:
                extend(sequence, score)

    extend([], 0.0)
    return sorted(hypotheses, key=lambda h: -h[0])


def _toy_generate(table, prompts, offsets, settings):
    length = max(map(len, prompts))
    tokens = np.zeros((len(prompts), length), np.int32)
    mask = np.zeros_like(tokens)
    for row, prompt in enumerate(prompts):
        tokens[row, length - len(prompt) :], mask[row, length - len(prompt) :] = prompt, 1
    output = decoding.generate(
        TOY_DECODER,
        jnp.asarray(table),
        tokens,
        mask,
        max_new_tokens=TOY_NEW,
        eos_id=TOY_EOS,
        pad_id=0,
        decoding=settings,
        decoder_inputs={"offsets": jnp.asarray(offsets)},
    )
    return np.asarray(output.tokens), np.asarray(output.lengths), output.scores


def _toy_greedy(table, offsets, prompt, min_new_tokens) -> list[int]:
    generated = []
    while len(generated) < TOY_NEW and TOY_EOS not in generated:
        logits = table[_toy_code(prompt + generated)] + offsets
        if len(generated) < min_new_tokens:
            logits[TOY_EOS] = -np.inf
        generated.append(int(np.argmax(logits)))
    return generated


@pytest.mark.parametrize("alpha", PENALTIES)
def test_hand_built_decoder_finds_the_brute_force_best(toy, alpha):
    """6 beams keep every prefix of this vocabulary for 3 steps (at most 4 running, 6
    candidates per step), so "never" stopping is exhaustive: the answer is the enumeration's best,
    with its score; batched rows (left-padded, own offsets) equal one-by-one runs."""
    table, offsets = toy
    beats_greedy = False
    for min_new in (0, 2):
        settings = Decoding(
            num_beams=6, length_penalty=alpha, early_stopping="never", min_new_tokens=min_new
        )
        batched = _toy_generate(table, TOY_PROMPTS, offsets, settings)
        for row, prompt in enumerate(TOY_PROMPTS):
            hypotheses = _brute_force(table, offsets[row], prompt, alpha, min_new)
            (best_score, best), (second_score, _) = hypotheses[:2]
            assert best_score - second_score > 1e-3, "a near tie: the test cannot decide"
            context = f"prompt {prompt}, length_penalty={alpha}, min_new_tokens={min_new}"
            assert batched[1][row] == len(best), context
            np.testing.assert_array_equal(batched[0][row, : len(best)], best, err_msg=context)
            assert (batched[0][row, len(best) :] == 0).all(), context
            np.testing.assert_allclose(batched[2][row], best_score, rtol=1e-5, err_msg=context)
            alone = _toy_generate(table, [prompt], offsets[row : row + 1], settings)
            np.testing.assert_array_equal(alone[0][0], batched[0][row], err_msg=context)
            beats_greedy |= _toy_greedy(table, offsets[row], prompt, min_new) != best
    assert beats_greedy, "beam search never differs from greedy here: a weak test"


def test_num_beams_one_is_the_greedy_loop(toy):
    """num_beams=1 runs the greedy program (no scores), with min_new_tokens honoured."""
    table, offsets = toy
    answers = set()
    for min_new in (0, 2):
        tokens, lengths, scores = _toy_generate(
            table, TOY_PROMPTS, offsets, Decoding(min_new_tokens=min_new)
        )
        assert scores is None
        for row, prompt in enumerate(TOY_PROMPTS):
            expected = _toy_greedy(table, offsets[row], prompt, min_new)
            assert lengths[row] == len(expected)
            np.testing.assert_array_equal(tokens[row, : len(expected)], expected)
        answers.add(tokens.tobytes())
    assert len(answers) == 2, "min_new_tokens=2 changed no greedy answer"


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(num_beams=0), "num_beams must be ≥ 1"),
        (dict(early_stopping="maybe"), "early_stopping must be True, False or 'never'"),
        (dict(early_stopping=1), "early_stopping must be"),
        (dict(num_beams=2, temperature=1.0), "needs temperature 0"),
        (dict(num_beams=2, num_return_sequences=3), r"num_return_sequences must be in \[1, "),
        (dict(min_new_tokens=-1), "min_new_tokens must be ≥ 0"),
    ],
)
def test_bad_decoding_values_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        Decoding(**fields)


def test_generation_defaults_prefer_generation_config_then_config(tmp_path):
    assert generation_defaults(tmp_path) == GenerationDefaults()  # neither file: HF's defaults
    config = {
        "model_type": "llava",
        "text_config": {"eos_token_id": 2, "bos_token_id": 1, "pad_token_id": 0},
        "pad_token_id": 32001,
        "num_beams": 2,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert generation_defaults(tmp_path) == GenerationDefaults(
        eos_ids=(2,), pad_id=32001, bos_id=1, num_beams=2
    )
    generation = {"eos_token_id": [7, 9], "num_beams": 4, "length_penalty": 0.6}
    generation |= {"early_stopping": "never", "decoder_start_token_id": 0, "pad_token_id": None}
    (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    assert generation_defaults(tmp_path) == GenerationDefaults(
        eos_ids=(7, 9),
        pad_id=32001,  # null in generation_config.json: config.json's
        bos_id=1,
        decoder_start_id=0,
        num_beams=4,
        length_penalty=0.6,
        early_stopping="never",
    )


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("early_stopping", "maybe", "early_stopping='maybe' must be true, false or \"never\""),
        ("num_beams", 0, "num_beams=0 must be an integer ≥ 1"),
        ("eos_token_id", "</s>", "eos_token_id='</s>' is not a token id"),
    ],
)
def test_bad_generation_config_values_name_file_and_field(tmp_path, field, value, message):
    (tmp_path / "generation_config.json").write_text(json.dumps({field: value}))
    with pytest.raises(CheckpointImportError, match="generation_config.json: " + message):
        generation_defaults(tmp_path)
