"""Encoder-decoder generation (`llms.t5.t5_generate`: encoder once, decoder with its cache) gives
transformers' `T5ForConditionalGeneration.generate` token ids, greedy and beam search.

Two tiny random T5s built here, saved and imported: original T5 (relu, tied and scaled head,
scanned layers) and FlanT5-like (gated-gelu, untied head, head_dim != dim / heads, unscanned).
Batch 2 with left-padded encoder inputs of different lengths; num_beams 1, 3, 5 × length_penalty
-1, 0, 1 × early_stopping True, False, "never"; per model an EOS id the model does emit (chosen
once by running transformers over candidate ids), so that finished hypotheses matter and, for the
first model, early_stopping True and False give different answers. HF's output starts with `decoder_start_token_id` (dropped here) and pads
finished beams with the pad id, as ours does. Equal encoder and decoder depths: transformers 5.23's
cached T5 generate fails when the decoder is deeper (tests/importers/test_t5_importer.py).
"""

import itertools

import jax
import numpy as np
import pytest
import torch
from helpers import assert_parity

from jaxvlm import importers
from jaxvlm.decoding import Decoding
from jaxvlm.llms.t5 import T5, t5_generate

VOCAB, S, NEW_TOKENS = 96, 9, 8
START, PAD = 0, 0
PENALTIES = (-1.0, 0.0, 1.0)
EARLY_STOPPING = (True, False, "never")
CONFIGS = {
    "relu_tied": dict(
        hf=dict(feed_forward_proj="relu", tie_word_embeddings=True, d_kv=8),
        scan_layers=True,
        eos=84,
    ),
    "gated_gelu_untied": dict(
        hf=dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, d_kv=12),
        scan_layers=False,
        eos=48,
    ),
}


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module", params=list(CONFIGS))
def t5(request, tmp_path_factory):
    """(HF model, our T5, our params, encoder tokens int[2, S], mask, eos id)."""
    import flax.linen as nn
    import transformers

    from jaxvlm.param_paths import flatten_params, unflatten_params

    name = request.param
    config = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=12,
        decoder_start_token_id=START,
        pad_token_id=PAD,
        eos_token_id=1,
        attn_implementation="eager",
        **CONFIGS[name]["hf"],
    )
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(config).eval()
    if not config.tie_word_embeddings:  # transformers 5 ties lm_head; FlanT5 files carry their own
        hf.lm_head.weight = torch.nn.Parameter(torch.empty(VOCAB, 32))
    _redraw(hf)
    directory = tmp_path_factory.mktemp(name)
    hf.save_pretrained(directory)
    arch = importers.architecture("llm", directory)
    scan_layers = CONFIGS[name]["scan_layers"]
    model = T5(**arch, scan_layers=scan_layers)
    ids = np.zeros((1, 4), np.int32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), ids, ids)["params"]
    expected = {f"llm/{k}": v for k, v in flatten_params(nn.unbox(boxed)).items()}
    component = {**arch, "scan_layers": scan_layers}
    loaded = importers.load_component("llm", directory, component, expected)
    params = unflatten_params({k[len("llm/") :]: v for k, v in loaded.items()})
    rng = np.random.default_rng(1)
    tokens = rng.integers(2, VOCAB, (2, S)).astype(np.int32)
    mask = np.ones_like(tokens)
    tokens[1, :3], mask[1, :3] = PAD, 0  # row 1: 6 real tokens, left-padded
    return hf, model, params, tokens, mask, CONFIGS[name]["eos"]


def _redraw(hf):
    """Re-draws every weight: HF's init gives nearly flat logits (greedy repeats the pad id),
    where beam search would be decided by near ties. Projections std 0.5, norm scales 1 ± 0.2,
    the untied head std 0.3, the tied model's final decoder norm ×4 (its logits are scaled by
    dim**-0.5): |logits| up to ~20."""
    with torch.no_grad():
        for key, p in hf.named_parameters():
            if "layer_norm" in key:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif key == "lm_head.weight":
                p.copy_(0.3 * torch.randn_like(p))
            elif "shared" in key or "relative_attention_bias" in key:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(0.5 * torch.randn_like(p))
        if hf.config.tie_word_embeddings:
            hf.decoder.final_layer_norm.weight.mul_(4.0)


def _hf_generate(hf, tokens, mask, *, eos, num_beams=1, **kwargs):
    """transformers `generate` → (generated tokens int[B, N] padded with PAD, lengths, scores)."""
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
    sequences = output.sequences.numpy()
    assert (sequences[:, 0] == START).all()
    generated = sequences[:, 1:]  # after decoder_start_token_id
    if num_beams == 1:
        lengths = np.full(len(generated), generated.shape[1])
        if eos is not None:
            for row, sequence in enumerate(generated):
                hits = np.flatnonzero(sequence == eos)
                lengths[row] = hits[0] + 1 if hits.size else generated.shape[1]
        scores = None
    else:  # beam_indices: -1 after each hypothesis's end
        lengths = (output.beam_indices.numpy() >= 0).sum(axis=1)
        scores = output.sequences_scores.numpy()
    padded = np.full((len(generated), NEW_TOKENS), PAD, np.int32)
    for row, length in enumerate(lengths):
        padded[row, :length] = generated[row, :length]
    return padded, lengths, scores


def _ours(t5, settings):
    _, model, params, tokens, mask, eos = t5
    output = t5_generate(
        model,
        params,
        tokens,
        mask,
        max_new_tokens=NEW_TOKENS,
        eos_id=eos,
        pad_id=PAD,
        decoder_start_id=START,
        decoding=settings,
        scope=None,
    )
    scores = None if output.scores is None else np.asarray(output.scores)
    return np.asarray(output.tokens), np.asarray(output.lengths), scores


@pytest.mark.parametrize("num_beams", [1, 3, 5])
def test_t5_ids_equal_transformers_generate(t5, num_beams):
    """Every (length_penalty, early_stopping) for one num_beams (length_penalty is traced, and
    early_stopping False and "never" share a program: two compiles per num_beams): the same ids,
    lengths and sequence scores as transformers; some hypotheses end at EOS before N tokens, and
    the settings change the answers (the comparison decides something)."""
    hf, _, _, tokens, mask, eos = t5
    if num_beams == 1:  # greedy: length_penalty and early_stopping do not apply
        settings = [(1.0, False)]
    else:
        settings = list(itertools.product(PENALTIES, EARLY_STOPPING))
    answers = {}
    for alpha, early in settings:
        context = f"num_beams={num_beams} length_penalty={alpha} early_stopping={early}"
        extra = {} if num_beams == 1 else dict(length_penalty=alpha, early_stopping=early)
        ref_tokens, ref_lengths, ref_scores = _hf_generate(
            hf, tokens, mask, eos=eos, num_beams=num_beams, **extra
        )
        ours, lengths, scores = _ours(
            t5, Decoding(num_beams=num_beams, length_penalty=alpha, early_stopping=early)
        )
        np.testing.assert_array_equal(lengths, ref_lengths, err_msg=f"lengths, {context}")
        np.testing.assert_array_equal(ours, ref_tokens, err_msg=f"token ids, {context}")
        if ref_scores is not None:
            assert_parity(scores, ref_scores, context)
        answers[alpha, early] = (ours.tobytes(), tuple(lengths))
    finished_early = [key for key, (_, lengths) in answers.items() if min(lengths) < NEW_TOKENS]
    assert finished_early, "no hypothesis ended at EOS: the test would not exercise finishing"
    if num_beams > 1:
        assert len(set(answers.values())) >= 2, "the settings changed no answer"
    if num_beams == 3 and eos == CONFIGS["relu_tied"]["eos"]:  # True stops with another answer
        assert any(answers[alpha, True] != answers[alpha, False] for alpha in PENALTIES)
